"""Block-local healing (heal/local.py) through heal(): each layer trained to give the teacher's output."""

import pytest
import torch

from conftest import CALIB, CORE, EVAL
from vlora_compress import compress, expand
from vlora_compress.evaluate.scoring import EvalConfig, evaluate
from vlora_compress.io.fileformat import VloraFile
from vlora_compress.heal.distill import HealConfig, heal
from vlora_compress.report.compress_report import healing_line, human_bytes, markdown_heal

LOCAL = dict(steps=0, batch_size=8, max_length=32, local_samples=64, local_batch_size=8, local_lr=1e-3, eval_samples=16)


@pytest.fixture
def llama_start(tiny_llama, tmp_path):
    start = tmp_path / "l.vlora.safetensors"
    compress(tiny_llama, start, rank=4, chunks=2, **CORE)  # VLoRA chains: bases shared down each chunk
    return start


def test_layer_by_layer_healing_lowers_held_out_perplexity_and_is_what_is_written(tiny_llama, llama_start, tmp_path):
    out = tmp_path / "h.vlora.safetensors"
    report = heal(llama_start, tiny_llama, CALIB, out, HealConfig(**LOCAL, local_steps=24), eval_data=EVAL)
    local = report.local
    assert report.steps == 0 and local["layers"] == 4 and local["steps"] == 4 * 24 and local["tokens"] > 0
    assert [e.get("phase") for e in report.evals] == [None, "layer by layer"]
    assert all(a <= b for a, b in zip(local["after"], local["before"])) and any(local["kept"])
    assert sum(b - a for a, b in zip(local["after"], local["before"])) > 0.05 * sum(local["before"])
    assert report.after < 0.98 * report.before
    scored = evaluate(out, EVAL, EvalConfig(task="perplexity", samples=16), config_dir=tiny_llama)
    assert scored.metrics[0].model == pytest.approx(report.after, rel=1e-3)  # the written file is what was scored
    a, b = VloraFile(llama_start), VloraFile(out)
    assert a.plan == b.plan and out.stat().st_size == llama_start.stat().st_size
    assert torch.isfinite(expand(out)["model.layers.3.mlp.down_proj.weight"]).all()
    md = markdown_heal(report.to_dict())  # the report shows the pass and each layer's held-out error
    assert "| 0 (layer by layer) |" in md and md.count("| yes |") == sum(local["kept"])
    assert f"layer by layer: {4 * 24} steps over 4 layers" in healing_line(report.to_dict())


def test_a_layer_whose_training_hurts_on_held_out_data_is_put_back(tiny_llama, llama_start, tmp_path):
    """A learning rate of 10 wrecks every layer it trains; each is undone, so the file is the start."""
    out = tmp_path / "h.vlora.safetensors"
    report = heal(llama_start, tiny_llama, CALIB, out, HealConfig(**{**LOCAL, "local_steps": 3, "local_lr": 10.0}), eval_data=EVAL)
    assert report.local["kept"] == [False] * 4 and report.local["after"] == report.local["before"]
    a, b = VloraFile(llama_start), VloraFile(out)
    for name in a.checkpoint.infos:
        assert torch.equal(a.get(name), b.get(name)), name


def test_causal_lms_heal_layer_by_layer_first_by_default_and_encoders_do_not(tiny_llama, llama_start, minilm_dir,
                                                                             tmp_path):
    lm = heal(llama_start, tiny_llama, CALIB, tmp_path / "a.vlora.safetensors",
              HealConfig(**{**LOCAL, "steps": 2, "local_samples": 16}))
    assert lm.local is not None and lm.local["steps"] == 4 * 32 and lm.steps == 2
    start = tmp_path / "m.vlora.safetensors"
    compress(minilm_dir, start, rank=4, chunks=2, **CORE)
    encoder = heal(start, minilm_dir, CALIB, tmp_path / "b.vlora.safetensors", HealConfig(**{**LOCAL, "steps": 2}))
    assert encoder.local is None and encoder.steps == 2


def test_bf16_heals_with_a_bf16_teacher_and_float32_masters_for_what_trains(tiny_llama, llama_start, tmp_path):
    """--precision bf16 on the CPU runs the code a GPU runs: half the teacher's bytes, float32 for the trained."""
    cfg = {**LOCAL, "steps": 4, "local_steps": 12}
    full = heal(llama_start, tiny_llama, CALIB, tmp_path / "f.vlora.safetensors", HealConfig(**cfg, precision="fp32"),
                eval_data=EVAL)
    out = tmp_path / "h.vlora.safetensors"
    half = heal(llama_start, tiny_llama, CALIB, out, HealConfig(**cfg, precision="bf16"), eval_data=EVAL)
    assert 2 * half.memory["teacher"] == full.memory["teacher"] > 0
    assert half.memory["trained"] == full.memory["trained"] > 0  # the masters stay float32
    frozen = full.memory["student"] - full.memory["trained"]  # embeddings and head: bf16 when frozen
    assert half.memory["student"] == half.memory["trained"] + frozen // 2
    assert half.after < 0.99 * half.before and half.after == pytest.approx(full.after, rel=0.005)
    assert half.local["after"] == pytest.approx(full.local["after"], rel=0.02, abs=1e-6)
    scored = evaluate(out, EVAL, EvalConfig(task="perplexity", samples=16), config_dir=tiny_llama)
    assert scored.metrics[0].model == pytest.approx(half.after, rel=0.02)  # scored in bf16, written as stored
    md = markdown_heal(half.to_dict())
    assert "precision bf16" in md and f"teacher {human_bytes(half.memory['teacher'])}" in md
