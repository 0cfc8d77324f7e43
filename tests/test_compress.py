import shutil

import pytest
import torch
from safetensors import safe_open

from vlora_compress import compress, expand, expand_to_file, synthetic
from vlora_compress.io.checkpoint import open_checkpoint

from conftest import CORE


def _dense(path):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt.read(k) for k in ckpt.infos}


def test_minilm_compresses_expands_and_runs_in_transformers(minilm_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "mini.vlora.safetensors"
    report = compress(minilm_dir, out, rank=4, chunks=3, **CORE)
    # 3 dense bases of 6 layers plus rank-4 increments: just over half of the stack's bytes
    assert 0.50 < report.stack_size_ratio < 0.52
    assert report.size_ratio < 0.8
    assert [s["chunks"] for s in report.stacks] == [[[0, 1], [2, 3], [4, 5]]]
    assert len(report.families) == 6

    original = _dense(minilm_dir / "model.safetensors")
    restored = expand(out)
    assert list(restored) == list(original)
    for key, t in original.items():
        assert restored[key].shape == t.shape and restored[key].dtype == t.dtype
        if not key.startswith("encoder.layer.") or t.dim() != 2:
            assert torch.equal(restored[key], t), f"{key} should pass through bit-identical"
    # bases are stored dense, increments are not exact
    assert torch.equal(restored["encoder.layer.2.output.dense.weight"], original["encoder.layer.2.output.dense.weight"])
    assert not torch.equal(restored["encoder.layer.3.output.dense.weight"], original["encoder.layer.3.output.dense.weight"])

    model_dir = tmp_path / "expanded"
    model_dir.mkdir()
    shutil.copy(minilm_dir / "config.json", model_dir / "config.json")
    expand_to_file(out, model_dir / "model.safetensors")
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    assert hidden.shape == (1, 4, 384) and torch.isfinite(hidden).all()


def test_minilm_at_full_rank_gives_the_original_model(minilm_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "full.vlora.safetensors"
    report = compress(minilm_dir, out, rank=2000, chunks=2, **CORE)
    assert any("clipped to 384" in n for n in report.notes)
    assert max(t["rel_error"] for t in report.tensors) < 1e-5
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copy(minilm_dir / "config.json", model_dir)
    expand_to_file(out, model_dir / "model.safetensors")
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    ref = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    got = transformers.AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        a, b = ref(input_ids=ids).last_hidden_state, got(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4)


def test_report_errors_match_what_expand_returns(gpt2_file, tmp_path):
    out = tmp_path / "g.vlora.safetensors"
    report = compress(gpt2_file, out, rank=3, chunks=2)
    original, restored = _dense(gpt2_file), expand(out)
    for t in report.tensors:
        w, w_hat = original[t["key"]].double(), restored[t["key"]].double()
        assert abs(float((w - w_hat).norm() / w.norm()) - t["rel_error"]) < 1e-6


def test_gpt2_layout_keeps_conv1d_orientation_and_4d_buffers(gpt2_file, tmp_path):
    out = tmp_path / "g.vlora.safetensors"
    report = compress(gpt2_file, out, rank=2, chunks=1)
    fams = {f["suffix"]: f["shape"] for f in report.families}
    assert fams == {"attn.c_attn.weight": [64, 192], "attn.c_proj.weight": [64, 64],
                    "mlp.c_fc.weight": [64, 256], "mlp.c_proj.weight": [256, 64]}
    original, restored = _dense(gpt2_file), expand(out)
    assert torch.equal(restored["transformer.h.3.attn.bias"], original["transformer.h.3.attn.bias"])
    assert torch.equal(restored["transformer.h.3.mlp.c_fc.bias"], original["transformer.h.3.mlp.c_fc.bias"])


def test_llama_bf16_sharded_round_trips_and_stores_bf16(llama_index, tmp_path):
    out = tmp_path / "l.vlora.safetensors"
    compress(llama_index, out, rank=16, chunks=2, **CORE)  # factors pay below mn/(m+n) (21 to 47 here)
    with safe_open(str(out), "pt") as f:
        assert f.get_slice("model.layers.1.mlp.up_proj.weight.vlora_A").get_dtype() == "BF16"
    assert all(t.dtype == torch.bfloat16 for t in expand(out).values())
    full = tmp_path / "full.vlora.safetensors"
    report = compress(llama_index, full, rank=200, chunks=2, **CORE)  # full rank: stored dense, in bf16
    original, restored = _dense(llama_index), expand(full)
    assert set(restored) == set(original)
    for key, t in original.items():
        assert restored[key].dtype == torch.bfloat16 and torch.equal(restored[key], t), key
    assert max(t["rel_error"] for t in report.tensors) == 0.0
    # GQA: k/v families have their own shape, planned on their own
    fams = {f["suffix"]: f["shape"] for f in report.families}
    assert fams["self_attn.k_proj.weight"] == [32, 64] and fams["self_attn.q_proj.weight"] == [64, 64]


def test_dtype_option_stores_fp16_and_expand_restores_fp32(gpt2_file, tmp_path):
    out = tmp_path / "g.vlora.safetensors"
    compress(gpt2_file, out, rank=4, chunks=2, dtype="fp16", **CORE)
    with safe_open(str(out), "pt") as f:
        assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_dtype() == "F16"
        assert f.get_slice("transformer.wte.weight").get_dtype() == "F32"  # pass-through untouched
    assert expand(out)["transformer.h.1.attn.c_attn.weight"].dtype == torch.float32


def test_two_stacks_are_planned_on_their_own(t5_file, tmp_path):
    report = compress(t5_file, tmp_path / "t5.vlora.safetensors", rank=2, chunks=3, **CORE)
    chunks = {s["prefix"]: s["chunks"] for s in report.stacks}
    assert chunks == {"encoder.block": [[0, 1], [2, 2], [3, 3]], "decoder.block": [[0, 0], [1, 1], [2, 2]]}
    suffixes = {f["suffix"] for f in report.families if f["stack"] == "decoder.block"}
    assert "layer.1.EncDecAttention.q.weight" in suffixes


def test_planted_rank_r_chain_is_recovered(tmp_path):
    specs = synthetic.llama_keys(layers=6, d=48, ffn=96)
    src = synthetic.write_checkpoint(tmp_path / "p.safetensors", specs, synthetic.planted_chain(1, 3, {0, 2, 4}))
    out = tmp_path / "p.vlora.safetensors"
    report = compress(src, out, rank=3, chunks=3)
    assert max(t["rel_error"] for t in report.tensors) < 1e-5
    original, restored = _dense(src), expand(out)
    for key, t in original.items():
        assert torch.allclose(restored[key], t, atol=1e-5), key
    # one rank lower cannot hold a rank-3 delta
    low = compress(src, tmp_path / "low.vlora.safetensors", rank=2, chunks=3)
    assert max(t["rel_error"] for t in low.tensors) > 1e-2


def test_same_input_and_options_give_identical_bytes(tmp_path):
    # big enough that auto picks the randomised SVD for some families
    specs = synthetic.llama_keys(layers=3, d=1100, ffn=1200, heads=4, kv_heads=4, vocab=8)
    src = synthetic.write_checkpoint(tmp_path / "big.safetensors", specs)
    a, b = tmp_path / "a.vlora.safetensors", tmp_path / "b.vlora.safetensors"
    compress(src, a, rank=4, chunks=1, **CORE)
    compress(src, b, rank=4, chunks=1, **CORE)
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.vlora.safetensors"
    compress(src, c, rank=4, chunks=1, seed=1, **CORE)
    assert c.read_bytes() != a.read_bytes()


def test_chain_is_closed_loop_so_errors_do_not_compound(tmp_path):
    specs = synthetic.llama_keys(layers=8, d=64, ffn=128)
    src = synthetic.write_checkpoint(tmp_path / "c.safetensors", specs, synthetic.planted_chain(2, 6, {0}))
    report = compress(src, tmp_path / "c.vlora.safetensors", rank=4, chunks=1, **CORE)
    q = [t["rel_error"] for t in report.tensors if t["key"].endswith("q_proj.weight")]
    # each layer loses only its own truncation: the last layer is no worse than a few times the first increment
    assert q[0] == 0.0 and q[-1] < 4 * q[1]


def test_per_layer_svd_method_round_trips_and_loads(gpt2_file, tmp_path):
    out = tmp_path / "s.vlora.safetensors"
    report = compress(gpt2_file, out, method="svd", rank=20)  # below every family's mn/(m+n) (32 to 51)
    assert report.method == "svd" and all(f["bases"] == ["none"] for f in report.families)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
    # no dense base anywhere: every layer is its own factors
    assert "transformer.h.0.attn.c_attn.weight" not in keys
    assert "transformer.h.0.attn.c_attn.weight.vlora_A" in keys
    full = tmp_path / "full.vlora.safetensors"
    compress(gpt2_file, full, method="svd", rank=500)  # full rank: factors would cost more than the matrices
    with safe_open(str(full), "pt") as f:
        assert not any(k.endswith(".vlora_A") for k in f.keys())
    original, restored = _dense(gpt2_file), expand(full)
    for key, t in original.items():
        assert torch.equal(restored[key], t), key


@pytest.mark.parametrize("method,chunks", [("svd", 1), ("vlora", 2)])
def test_target_size_picks_the_largest_rank_that_fits(gpt2_file, tmp_path, method, chunks):
    core = CORE if method == "vlora" else {}
    for target, of in ((0.6, "stack"), (0.8, "model"), ("450KB", "stack")):
        r = compress(gpt2_file, tmp_path / "t.vlora.safetensors", method=method, chunks=chunks, **core,
                     target_size=target, target_of=of, force=True)
        budget = r.target["budget_bytes"]
        used = r.stack_compressed_bytes if of == "stack" else r.compressed_bytes
        assert used <= budget
        bigger = compress(gpt2_file, tmp_path / "b.vlora.safetensors", method=method, chunks=chunks, **core,
                          rank=r.rank + 1, force=True)
        assert (bigger.stack_compressed_bytes if of == "stack" else bigger.compressed_bytes) > budget


def test_target_below_what_the_bases_take_is_refused(gpt2_file, tmp_path):
    from vlora_compress import VloraError

    with pytest.raises(VloraError, match="need at least"):
        compress(gpt2_file, tmp_path / "t.vlora.safetensors", chunks=2, target_size=0.4, target_of="stack", **CORE)
    with pytest.raises(VloraError, match="`target_size` must be"):
        compress(gpt2_file, tmp_path / "t.vlora.safetensors", target_size="lots")


def test_one_config_carries_every_option_and_the_file_records_it_whole(gpt2_file, tmp_path):
    """compress(source, out, config) and compress(source, out, **fields) write the same bytes, and
    the header's vlora.config reads back as the config that was asked for (target, align, calibration)."""
    from vlora_compress import CalibConfig, CompressConfig
    from vlora_compress.io.fileformat import VloraFile

    config = CompressConfig(rank=3, chunks=2, base="first", topology="chain", bounds="equal", ranks="uniform",
                            target_size="0.6", target_of="stack", align=True, quantize="int8",
                            calibration=CalibConfig(samples=7, max_length=33))
    a, b = tmp_path / "a.vlora.safetensors", tmp_path / "b.vlora.safetensors"
    report = compress(gpt2_file, a, config)
    compress(gpt2_file, b, CompressConfig(rank=3), chunks=2, base="first", topology="chain", bounds="equal",
             ranks="uniform", target_size=0.6, target_of="stack", align=True, quantize="int8",
             calibration=CalibConfig(samples=7, max_length=33))
    assert a.read_bytes() == b.read_bytes()
    recorded = VloraFile(a).config
    assert CompressConfig.from_dict(recorded) == config
    assert recorded["target_size"] == "0.6" and recorded["calibration"]["samples"] == 7 and recorded["align"]
    assert report.rank != 3  # the target chose the rank; the plan holds it, the config what was asked
    with pytest.raises(TypeError):
        compress(gpt2_file, tmp_path / "c.vlora.safetensors", no_such_option=1)
