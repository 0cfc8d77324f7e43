import pytest
import torch

from conftest import CALIB, tiny_model
from vlora_compress import compress, expand
from vlora_compress.fit.align import align_stack, detect_layout, read_config
from vlora_compress.io.checkpoint import open_checkpoint
from vlora_compress.io.models import load_model, load_preprocessor
from vlora_compress.io.stacks import find_stacks

TEXTS = ["It is a truth universally acknowledged that a single man must be in want of a wife.",
         "Anne Elliot had been forced into prudence in her youth."]


def _outputs(model, tok):
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).last_hidden_state


def _aligned(folder):
    with open_checkpoint(folder) as ckpt:
        (stack,) = find_stacks(ckpt.infos)
        layout, note = detect_layout(stack, read_config(folder))
        assert layout is not None, note
        aligned = align_stack(stack, layout, ckpt.read)
        original = {k: ckpt.read(k) for k in aligned}
    return stack, layout, aligned, original


def _mean_delta(stack, read):
    rel = [float((read(f.key(b)) - read(f.key(a))).norm() / read(f.key(b)).norm())
           for f in stack.families for a, b in zip(f.layers, f.layers[1:])]
    return sum(rel) / len(rel)


ARCHS = {  # arch: (overrides, heads aligned, rotary dims of the 16-dim heads)
    "gpt2": ({}, True, 0),
    "llama": ({}, True, 16),
    "llama-mha": ({"num_key_value_heads": 4}, True, 16),
    "llama-yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                        "original_max_position_embeddings": 32}}, True, 16),
    "stablelm": ({"partial_rotary_factor": 0.25}, True, 4),  # rotates 4 dims of 16; 12 pass through
    "stablelm-qk-norm": ({"partial_rotary_factor": 0.5, "qk_layernorm": True}, False, 8),
    "qwen3": ({"head_dim": 16}, False, 16),  # RMSNorm on queries and keys
    "cohere": ({}, False, 16),  # interleaved rotary pairs
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_alignment_preserves_outputs(tmp_path, arch):
    """Every layout alignment accepts computes what the original does, heads rotated or not."""
    overrides, heads, rotary = ARCHS[arch]
    folder = tiny_model(tmp_path / arch, arch.split("-")[0] if arch.startswith(("stablelm", "llama")) else arch,
                        **overrides)
    stack, layout, aligned, original = _aligned(folder)
    assert (layout.align_heads, layout.rotary_dim, layout.conv1d) == (heads, rotary, arch == "gpt2")
    changed = [k for k in aligned if not torch.equal(aligned[k], original[k])]
    assert any("mlp" in k for k in changed)
    assert any("attn" in k for k in changed) == heads
    model, tok = load_model(folder, head="base"), load_preprocessor(folder)
    ref = _outputs(model, tok)
    from vlora_compress.io.models import set_tensors

    set_tensors(model, aligned)
    assert torch.allclose(_outputs(model, tok), ref, atol=1e-4)


def test_partial_rotary_the_model_cannot_take_leaves_heads_alone(tmp_path):
    """A Llama config with a partial rotary factor: no proof that pair rotations commute, so none."""
    folder = tiny_model(tmp_path / "llama", "llama")
    config = read_config(folder)
    config["rope_parameters"] = {**config["rope_parameters"], "partial_rotary_factor": 0.5}
    with open_checkpoint(folder) as ckpt:
        (stack,) = find_stacks(ckpt.infos)
    layout, note = detect_layout(stack, config)
    assert not layout.align_heads
    assert note == "model.layers: aligned as llama, MLP neurons only: partial rotary embeddings (factor 0.5) in a 'llama' model"


def test_alignment_preserves_minilm_and_shrinks_its_deltas(minilm_dir):
    stack, layout, aligned, original = _aligned(minilm_dir)
    with open_checkpoint(minilm_dir) as ckpt:
        before = _mean_delta(stack, ckpt.read)
        after = _mean_delta(stack, lambda k: aligned[k] if k in aligned else ckpt.read(k))
    assert before > 1.35 and after < before - 0.15  # measured: 1.42 -> 1.19
    model, tok = load_model(minilm_dir, head="base"), load_preprocessor(minilm_dir)
    ref = _outputs(model, tok)
    from vlora_compress.io.models import set_tensors

    set_tensors(model, aligned)
    assert torch.allclose(_outputs(model, tok), ref, atol=1e-4)


def test_aligned_file_expands_to_an_equivalent_model(minilm_dir, tmp_path):
    out = tmp_path / "a.vlora.safetensors"
    report = compress(minilm_dir, out, rank=384, chunks=2, base="first", topology="chain", bounds="equal",
                      align=True)
    assert report.notes[0] == "encoder.layer: aligned as bert"
    from vlora_compress.io.fileformat import VloraFile

    assert VloraFile(out).plan.aligned
    model, tok = load_model(minilm_dir, head="base"), load_preprocessor(minilm_dir)
    ref = _outputs(model, tok)
    got = load_model(out, minilm_dir, head="base")
    assert torch.allclose(_outputs(got, tok), ref, atol=1e-4)
    dense = expand(out)
    with open_checkpoint(minilm_dir) as ckpt:  # outside the stack: untouched
        assert torch.equal(dense["embeddings.word_embeddings.weight"], ckpt.read("embeddings.word_embeddings.weight"))


def test_unknown_layout_or_heads_is_skipped_with_a_note(gpt2_file, tmp_path):
    report = compress(gpt2_file, tmp_path / "g.vlora.safetensors", rank=2, chunks=1, base="first",
                      topology="chain", align=True)
    assert report.notes[0].startswith("not aligned: transformer.h: the head count is unknown")


def test_calibrated_aligned_compression_runs(tiny_llama, tmp_path):
    from vlora_compress.calibrate.grams import CalibConfig

    report = compress(tiny_llama, tmp_path / "l.vlora.safetensors", rank=8, chunks=2, align=True, calib=CALIB,
                      calibration=CalibConfig(samples=24, holdout=8))
    assert report.calibration["whitened_layers"] == 28
    assert report.notes[0] == "model.layers: aligned as llama"
