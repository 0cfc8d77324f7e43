import pytest
import torch

from conftest import CORE, tiny_model
from vlora_compress import compress
from vlora_compress.runtime.factored import FactoredStore, VloraLinear, factored_bytes, load_factored
from vlora_compress.io.models import load_model

PLANS = {
    "chain over the first layer": dict(rank=6, chunks=2, **CORE),
    "star over a mean base": dict(rank=6, chunks=2, base="mean", topology="star", bounds="equal", ranks="uniform"),
    "per-layer SVD": dict(rank=6, method="svd", ranks="uniform"),
    "a shared basis per 3 layers": dict(rank=6, chunks=2, base="none", topology="shared", ranks="uniform"),
    "a shared left factor per 3 layers, int4": dict(rank=6, chunks=2, base="none", topology="shared-left",
                                                    ranks="uniform", quantize="int4", group_size=32),
}


def _inputs(vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab - 1, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("plan", PLANS)
def test_factored_model_computes_what_the_expanded_one_does(minilm_dir, tmp_path, plan):
    path = tmp_path / "m.vlora.safetensors"
    compress(minilm_dir, path, **PLANS[plan])
    dense, factored = load_model(path, minilm_dir), load_factored(path, minilm_dir)
    x = _inputs(30000)
    with torch.no_grad():
        a, b = dense(**x).last_hidden_state, factored(**x).last_hidden_state
    assert (a - b).abs().max() < 1e-3
    swapped = [m for m in factored.modules() if isinstance(m, VloraLinear)]
    assert len(swapped) == 6 * 6  # q, k, v, attention output, intermediate, output in every layer


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_factored_causal_lms_match_their_expansion(tmp_path, arch):
    folder = tiny_model(tmp_path / arch, arch)
    path = tmp_path / "m.vlora.safetensors"
    compress(folder, path, rank=4, chunks=1, **CORE)
    dense, factored = load_model(path, folder), load_factored(path, folder)
    assert type(factored).__name__.endswith(("LMHeadModel", "ForCausalLM"))
    x = _inputs(256)
    with torch.no_grad():
        a, b = dense(**x).logits, factored(**x).logits
    assert (a - b).abs().max() < 1e-4
    if arch == "gpt2":  # Conv1D keeps its (in, out) weight layout
        attn = factored.transformer.h[2].attn.c_attn
        assert isinstance(attn, VloraLinear) and attn.conv1d and attn.weight.shape == (64, 192)


def test_shared_bases_are_held_once_and_memory_is_the_file(minilm_dir, tmp_path):
    path = tmp_path / "m.vlora.safetensors"
    compress(minilm_dir, path, rank=8, chunks=2, base="mean", topology="star", bounds="equal", ranks="uniform")
    factored, dense = load_factored(path, minilm_dir), load_model(path, minilm_dir)
    layers = factored.encoder.layer
    assert layers[0].output.dense.base == layers[2].output.dense.base  # one chunk, one base name
    store = factored.vlora_store
    assert isinstance(store, FactoredStore)
    names = [n for n, _ in store.items()]
    assert len(names) == len(set(names))
    # every parameter is real memory (no broadcast placeholder survives) and none is a dense weight copy
    for p in factored.parameters():
        assert p.untyped_storage().nbytes() >= p.numel() * p.element_size()
    held = factored_bytes(factored)
    file_bytes = path.stat().st_size
    assert abs(held - file_bytes) < 0.02 * file_bytes  # the header and the pooler aside
    assert held < 0.8 * factored_bytes(dense)


def test_chain_weights_sum_the_path_from_the_base(minilm_dir, tmp_path):
    path = tmp_path / "m.vlora.safetensors"
    compress(minilm_dir, path, rank=4, chunks=1, **CORE)
    f = load_factored(path, minilm_dir)
    ranks = [f.encoder.layer[i].intermediate.dense.rank for i in range(6)]
    assert ranks == [0, 4, 8, 12, 16, 20]
    dense = load_model(path, minilm_dir)
    w = f.encoder.layer[5].intermediate.dense.weight
    assert torch.allclose(w, dense.encoder.layer[5].intermediate.dense.weight, atol=1e-5)


def _chain_of_eight(tmp_path):
    """A tiny Llama of 8 layers as one chain of rank 16 a step: from the third layer on, the summed
    rank costs more than the weight, so those layers form their weights."""
    folder = tiny_model(tmp_path / "llama8", "llama", num_hidden_layers=8)
    path = tmp_path / "chain8.vlora.safetensors"
    compress(folder, path, rank=16, chunks=1, **CORE)
    return folder, path


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.vlora_store.items() if p.grad is not None}


def test_a_chain_forms_each_weight_from_the_one_before_it(tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    folder, path = _chain_of_eight(tmp_path)
    factored, x = load_factored(path, folder), _inputs(256)
    short = {k: v[:1, :3] for k, v in x.items()}  # few tokens: forming the weights is the work
    with torch.no_grad():
        expected = load_model(path, folder)(**x).logits
        runs = {}
        for partial in (True, False):
            factored.vlora_store.partial_sums = partial
            with FlopCounterMode(display=False) as flops:
                factored(**short)
            runs[partial] = factored(**x).logits, flops.get_total_flops()
    assert (runs[True][0] - expected).abs().max() < 1e-4
    assert (runs[True][0] - runs[False][0]).abs().max() < 1e-4
    # forming a chain's weights: one product a layer against the whole path's product a layer
    assert runs[True][1] < 0.4 * runs[False][1]
    assert not factored.vlora_store._partial  # nothing dense outlives the pass

    # gradients through the shared partial sums are the ones of forming every weight afresh
    grads = {}
    for partial in (True, False):
        factored.zero_grad(set_to_none=True)
        factored.vlora_store.partial_sums = partial
        factored(**x).logits.square().mean().backward()
        grads[partial] = _grads(factored)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 8
    for name, g in grads[True].items():
        assert torch.allclose(g, grads[False][name], rtol=1e-4, atol=1e-6), name


def test_partial_sums_stay_exact_across_layer_calls_steps_and_checkpointing(tmp_path):
    from vlora_compress.heal.student import train_mode

    folder, path = _chain_of_eight(tmp_path)
    f = load_factored(path, folder)
    chain = [layer.mlp.down_proj for layer in f.model.layers]
    assert [m.feeds for m in chain] == [False] + [True] * 6 + [False]  # the base is read as it is
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))

    def layer_by_layer():  # module calls, no model forward to end the pass, as localheal makes them
        return sum(m(x).square().mean() for m in chain)

    first = layer_by_layer()
    first.backward()
    once = _grads(f)
    layer_by_layer().backward()  # the same tensors again
    for name, g in _grads(f).items():
        assert torch.allclose(g, 2 * once[name], rtol=1e-5, atol=1e-7), name
    grads = {}
    for partial in (True, False):  # the last layer alone, after a backward spent its upstream graph
        f.zero_grad(set_to_none=True)
        f.vlora_store.partial_sums = partial
        chain[-1](x).square().mean().backward()
        grads[partial] = _grads(f)
    for name, g in grads[True].items():
        assert torch.allclose(g, grads[False][name], rtol=1e-5, atol=1e-7), name
    with torch.no_grad():  # a step moves every version: the next pass builds on the new values
        for _, p in f.vlora_store.items():
            p.mul_(0.5)
    f.vlora_store.partial_sums = False
    fresh = layer_by_layer()
    f.vlora_store.partial_sums = True
    assert torch.allclose(layer_by_layer(), fresh, rtol=1e-5)

    # heal's gradient checkpointing trains the same gradients as a plain pass with partial sums
    ids = _inputs(256)
    f.zero_grad(set_to_none=True)
    f(**ids).logits.square().mean().backward()
    plain = _grads(f)
    train_mode(f, checkpointing=True)
    f.zero_grad(set_to_none=True)
    f(**ids).logits.square().mean().backward()
    for name, g in _grads(f).items():
        assert torch.allclose(g, plain[name], rtol=1e-4, atol=1e-6), name


def test_load_model_in_bf16_casts_parameters_and_keeps_rotary_frequencies(tmp_path):
    folder = tiny_model(tmp_path / "llama", "llama")
    path = tmp_path / "m.vlora.safetensors"
    compress(folder, path, rank=4, chunks=1, **CORE)
    for source in (folder, path):  # a model folder through from_pretrained, a file through its state dict
        model = load_model(source, folder if source == path else None, dtype=torch.bfloat16)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32, source
