"""The packed runtime: a file's integers held as stored, dequantized inside the forward."""

from __future__ import annotations

import pytest
import torch

from conftest import CALIB, tiny_model
from test_guard import make
from vlora_compress import CalibConfig, compress
from vlora_compress.errors import VloraError
from vlora_compress.fit.integers import SCHEMES, dequantize, quantize
from vlora_compress.io.fileformat import VloraFile
from vlora_compress.io.models import load_model
from vlora_compress.runtime.factored import factored_bytes, load_factored
from vlora_compress.runtime.packed import PackedEmbedding, PackedLinear, PackedMatrix, dequantize_packed

INTEGER = [s for s in SCHEMES if s != "none"]


@pytest.mark.parametrize("scheme", INTEGER)
@pytest.mark.parametrize("shape,group", [((5, 37), 8), ((4, 32), 16), ((3, 9), 128)])
def test_unpacking_gives_the_reference_values(scheme, shape, group):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(scheme)))
    q, s = quantize(x, scheme, group)
    expected = dequantize(q, s, shape, scheme, group)
    assert torch.equal(dequantize_packed(q, s, shape, scheme, group), expected)
    m = PackedMatrix(q, s, shape, scheme, group, torch.float32)
    rows = torch.tensor([[2, 0], [2, 1]])
    assert torch.equal(m.rows(rows), expected[rows])
    assert m.nbytes == q.numel() * q.element_size() + 2 * s.numel()


@pytest.mark.parametrize("scheme,group,cols", [("int8", 128, 48), ("int4", 32, 96), ("int4", 128, 192),
                                              ("int3", 64, 64), ("int2-midrise", 64, 128), ("int3-midrise", 32, 96)])
def test_integer_kernels_compute_the_dequantized_product(scheme, group, cols):
    w = torch.randn(48, cols, generator=torch.Generator().manual_seed(0))
    q, s = quantize(w, scheme, group)
    exact = dequantize(q, s, (48, cols), scheme, group)
    m = PackedMatrix(q, s, (48, cols), scheme, group, torch.float32)
    assert m.use_kernels() and m.kernel == ("int8" if scheme == "int8" else "int4")
    x = torch.randn(2, 3, cols, generator=torch.Generator().manual_seed(1))
    # bfloat16 activations and scales: within bfloat16's rounding of the exact product
    assert torch.allclose(m.linear(x), x @ exact.T, rtol=0.02, atol=0.02 * (x @ exact.T).abs().max().item())
    assert torch.allclose(m.dequantize(), exact, rtol=0.01, atol=1e-6)


def test_int8_rows_the_kernel_cannot_read_stay_as_stored():
    """torch's int8 kernel crashes on AVX512 where a row is not a multiple of 16 values long."""
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    q, s = quantize(w, "int8", 128)
    m = PackedMatrix(q, s, (8, 40), "int8", 128, torch.float32)
    assert not m.use_kernels() and m.kernel is None and torch.equal(m.q, q)
    x = torch.randn(3, 40)
    assert torch.allclose(m.linear(x), x @ dequantize(q, s, (8, 40), "int8", 128).T, atol=1e-5)


def test_int8_integers_read_at_an_odd_offset_are_aligned_for_the_kernel():
    """A file's integers can sit at any offset of its mapping; torch's int8 kernel on AVX512 crashes
    on rows that do not start 16-byte aligned, so they are copied to an allocation of their own."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    q, s = quantize(w, "int8", 128)
    shifted = torch.empty(q.numel() + 1, dtype=torch.int8)[1:].view(64, 64)  # one byte off its allocation
    shifted.copy_(q)
    assert shifted.data_ptr() % 16
    m = PackedMatrix(shifted, s, (64, 64), "int8", 128, torch.float32)
    assert m.use_kernels() and m.kernel == "int8" and m.q.data_ptr() % 64 == 0 and torch.equal(m.q, q)
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    exact = x @ dequantize(q, s, (64, 64), "int8", 128).T
    assert torch.allclose(m.linear(x), exact, rtol=0.02, atol=0.02 * exact.abs().max().item())


def test_rows_that_no_kernel_group_divides_stay_as_stored():
    q, s = quantize(torch.randn(8, 40), "int4", 16)  # 40 columns: no group of 32 to 256 divides them
    m = PackedMatrix(q, s, (8, 40), "int4", 16, torch.float32)
    assert not m.use_kernels() and m.kernel is None and torch.equal(m.q, q)


def test_scales_that_no_writer_makes_are_refused():
    q, s = quantize(torch.randn(4, 16), "int4", 8)
    with pytest.raises(VloraError, match="corrupted scales"):
        PackedMatrix(q, torch.zeros_like(s), (4, 16), "int4", 8, torch.float32, name="f: w")
    with pytest.raises(VloraError, match="does not hold"):
        PackedMatrix(q[:, :-1], s, (4, 16), "int4", 8, torch.float32, name="f: w")


# every form the file stores in integers, and one in floats
FORMS = ["llama-int8-gptq", "llama-int4-gptq", "llama-int3-gptq", "llama-int2-midrise-nearest",
         "llama-q-plus-ba", "llama-vlora-int4-base", "llama-shared-residual-int4", "llama-int4-passthrough",
         "llama-svd-inputs"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return {"llama": tiny_model(tmp_path_factory.mktemp("packed") / "llama", "llama")}


def _ids() -> dict:
    return {"input_ids": torch.randint(5, 250, (2, 12), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("name", FORMS)
def test_a_packed_model_holds_the_file_and_computes_its_expansion(name, llama, tmp_path):
    path = make(name, llama, tmp_path)
    vfile = VloraFile(path)
    packed, expanded = load_factored(path, llama["llama"]), load_model(path, llama["llama"])
    with torch.no_grad():
        a, b = expanded(**_ids()).logits, packed(**_ids()).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    store = packed.vlora_store
    held_as_ints = {n for n in vfile.quantized if n in store._packed_index}
    assert held_as_ints == {n for n in vfile.quantized if n not in {q.key for q in vfile.plan.passthrough}}
    assert all(p.dtype.is_floating_point for p in packed.parameters())  # integers are buffers, never trained
    assert factored_bytes(packed) <= 1.10 * path.stat().st_size
    if vfile.quantized:  # the same file dequantized to floats holds more
        assert factored_bytes(packed) < factored_bytes(load_factored(path, llama["llama"], packed=False))


@pytest.mark.parametrize("name", ["llama-int8-gptq", "llama-int4-gptq", "llama-q-plus-ba"])
def test_a_packed_model_through_integer_kernels_computes_its_expansion_in_bfloat16(name, llama, tmp_path):
    path = make(name, llama, tmp_path)
    packed, expanded = load_factored(path, llama["llama"], kernels=True), load_model(path, llama["llama"])
    store = packed.vlora_store
    assert all(m.kernel in ("int8", "int4") for name, m in zip(store._packed_index, store.packed) if name in store.bases)
    assert all(m.kernel for m in store.packed)  # factors without a kernel are held as bfloat16 values
    with torch.no_grad():
        a, b = expanded(**_ids()).logits, packed(**_ids()).logits
    assert (a - b).abs().max() <= 0.03 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    if name == "llama-int8-gptq":  # int8 rows as stored, bfloat16 scales: the file's bytes
        assert factored_bytes(packed) <= 1.10 * path.stat().st_size


def test_quantized_embeddings_and_a_tied_head_run_packed(tmp_path):
    # a vocabulary large enough that the embedding is quantized with the stacks (PASSTHROUGH_MIN values)
    folder = tiny_model(tmp_path / "tied", "llama", vocab_size=1024, tie_word_embeddings=True)
    path = tmp_path / "m.vlora.safetensors"
    compress(folder, path, method="svd", rank=8, ranks="uniform", quantize="int4", group_size=32,
             quantize_passthrough=True, calib=CALIB, calibration=CalibConfig(samples=8, max_length=32, holdout=2),
             device="cpu")
    assert [q.key for q in VloraFile(path).plan.passthrough] == ["model.embed_tokens.weight"]
    packed, expanded = load_factored(path, folder), load_model(path, folder)
    assert isinstance(packed.model.embed_tokens, PackedEmbedding)
    assert isinstance(packed.lm_head, PackedLinear) and packed.lm_head.matrix is packed.model.embed_tokens.matrix
    with torch.no_grad():
        a, b = expanded(**_ids()).logits, packed(**_ids()).logits
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert factored_bytes(packed) <= 1.10 * path.stat().st_size


def test_a_file_whose_scales_are_corrupt_is_one_line(llama, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from vlora_compress.cli.app import eval_main

    path = make("llama-int4-gptq", llama, tmp_path)
    meta = VloraFile(path).checkpoint.metadata
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith(".scale"))
    tensors[name] = -tensors[name]
    save_file(tensors, path, metadata=meta)
    with pytest.raises(VloraError, match="corrupted scales"):
        load_factored(path, llama["llama"])
    text = tmp_path / "t.txt"
    text.write_text("a b c d e f g h i j k l m n o p\n" * 20)
    with pytest.raises(SystemExit) as exc:
        eval_main([str(path), "--data", str(text), "--config", str(llama["llama"]), "--runtime", "packed",
                   "--task", "perplexity", "--max-length", "8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "corrupted scales" in err[0]


def test_vlora_eval_scores_a_file_packed_as_expanded(llama, tmp_path):
    from vlora_compress.evaluate.scoring import EvalConfig, evaluate

    path = make("llama-q-plus-ba", llama, tmp_path)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(400)) + "\n")
    runs = {rt: evaluate(path, text, EvalConfig(task="perplexity", max_length=16, runtime=rt, device="cpu"),
                         config_dir=llama["llama"]) for rt in ("expanded", "packed")}
    a, b = (runs[rt].metrics[0].model for rt in ("expanded", "packed"))
    assert abs(a - b) <= 1e-4 * a
    assert runs["expanded"].runtime is None
    assert runs["packed"].runtime["file_bytes"] == path.stat().st_size
    assert runs["packed"].runtime["held_bytes"] <= 1.10 * path.stat().st_size
