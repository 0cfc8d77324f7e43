"""Planning by blocks: each block of layers planned on its own Grams and output error, fitted, passed on."""

import importlib
import json

import pytest
import torch
from safetensors import safe_open

from conftest import CALIB, EVAL, hidden_error, tiny_model
from vlora_compress import CalibConfig, compress, expand
from vlora_compress.calibrate.grams import read_calibration
from vlora_compress.errors import VloraError
from vlora_compress.io.models import load_preprocessor


@pytest.fixture
def llama6(tmp_path):
    return tiny_model(tmp_path / "llama6", "llama", num_hidden_layers=6)


def _plan(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["vlora.plan"])


def test_a_plan_with_nothing_to_choose_fitted_by_blocks_is_the_one_fitted_on_the_model(llama6, tmp_path):
    """Whitened-mean bases, one chunk per block, uniform ranks, the original activations: nothing is
    left to choose, so planning by blocks writes what planning on the model writes (the same Grams,
    taken a block at a time), each block's base stored under its own place in the family; and it
    holds one block's Grams, not the model's, with the model loaded a layer at a time."""
    opts = dict(rank=6, chunks=3, base="mean", topology="star", bounds="equal", ranks="uniform", calib=CALIB,
                calibration=CalibConfig(samples=32), feedback="none")
    files, reports = {}, {}
    for planning in ("model", "blocks"):
        files[planning] = tmp_path / f"{planning}.vlora.safetensors"
        reports[planning] = compress(llama6, files[planning], planning=planning, **opts)
    a, b = expand(files["model"]), expand(files["blocks"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-3), key
    with safe_open(str(files["blocks"]), "pt") as f:
        bases = {k for k in f.keys() if "vlora_base" in k and "q_proj" in k}
    assert bases == {f"model.layers.vlora_base{i}.self_attn.q_proj.weight" for i in range(3)}
    assert reports["blocks"].calibration["model_loaded"] == "by layer"
    assert reports["model"].calibration["model_loaded"] == "whole"
    assert reports["blocks"].calibration["gram_bytes"] * 2 < reports["model"].calibration["gram_bytes"]


def test_the_default_plan_by_blocks_beats_per_layer_svd_and_lands_on_its_target(llama6, tmp_path):
    """The default plan, by blocks, at 0.6 of the stack: within 1% under the target, every chunk
    inside its block, every decision noted with its block, and a lower error on held-out text than
    whitened per-layer SVD at the same bytes."""
    tok = load_preprocessor(llama6)
    held_out, _ = read_calibration(tok, EVAL, CalibConfig(samples=24, holdout=0), causal=True)
    common = dict(target_size="0.6", target_of="stack", calib=CALIB, calibration=CalibConfig(samples=64),
                  planning="blocks")
    plan_file, svd_file = tmp_path / "plan.vlora.safetensors", tmp_path / "svd.vlora.safetensors"
    report = compress(llama6, plan_file, **common)
    baseline = compress(llama6, svd_file, method="svd", ranks="uniform", **common)
    assert 0.594 <= report.stack_size_ratio <= 0.6
    assert baseline.stack_compressed_bytes <= report.stack_compressed_bytes
    plan = _plan(plan_file)
    assert plan["stacks"][0]["bounds"] == [[0, 2], [2, 4], [4, 6]]
    for fp in plan["families"]:
        for chunk in fp["chunks"]:
            assert len({layer // 2 for layer in chunk["layers"]}) == 1, chunk  # never across a block's bounds
    assert report.notes[0] == "planned by blocks of layers"
    assert all(note.startswith(("layers 0-1: ", "layers 2-3: ", "layers 4-5: ")) for note in report.notes[1:])
    # each block's families decided on the block's own measure, and recorded so
    assert {d["scope"] for d in report.decisions} == {"layers 0-1", "layers 2-3", "layers 4-5"}
    assert len(report.decisions) == 3 * len(plan["families"])
    assert hidden_error(llama6, plan_file, held_out) < 0.5 * hidden_error(llama6, svd_file, held_out)


def test_shared_bases_planned_by_blocks_keep_their_places_in_the_family(llama6, tmp_path):
    """A shared basis per block (planned by blocks, each block one group): three bases per family,
    named by their chunk's place in the whole family, and the file expands to a working model."""
    tok = load_preprocessor(llama6)
    held_out, _ = read_calibration(tok, EVAL, CalibConfig(samples=16, holdout=0), causal=True)
    path = tmp_path / "s.vlora.safetensors"
    compress(llama6, path, rank=8, base="none", topology="shared", calib=CALIB, calibration=CalibConfig(samples=32),
             planning="blocks")
    with safe_open(str(path), "pt") as f:
        bases = {k for k in f.keys() if "vlora_basis" in k and "q_proj" in k}
    assert bases == {f"model.layers.vlora_basis{i}.self_attn.q_proj.weight" for i in range(3)}
    assert all(c["topology"] == "shared" for fp in _plan(path)["families"] for c in fp["chunks"])
    assert 0 < hidden_error(llama6, path, held_out) < 0.5


def test_a_mean_base_fitted_before_the_layers_under_input_feedback(llama6, tmp_path):
    """Under ``inputs`` a family on a whitened-mean base is fitted from the block's Grams before
    the block's layers, so the compressed stream passes it: a working model, not a broken one."""
    tok = load_preprocessor(llama6)
    held_out, _ = read_calibration(tok, EVAL, CalibConfig(samples=16, holdout=0), causal=True)
    path = tmp_path / "f.vlora.safetensors"
    report = compress(llama6, path, rank=6, chunks=2, base="mean", topology="star", calib=CALIB,
                      calibration=CalibConfig(samples=32), planning="blocks")
    assert report.calibration["sequential_layers"] == 42 and report.calibration["whitened_layers"] == 42
    assert 0 < hidden_error(llama6, path, held_out) < 0.5


def test_a_failure_in_a_later_block_leaves_no_file_and_no_spool(llama6, tmp_path, monkeypatch):
    import vlora_compress.pipelines.blocks as blockwise

    real, calls = blockwise.plan_measured, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise VloraError("a block could not be planned")
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise, "plan_measured", failing)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(VloraError, match="could not be planned"):
        compress(llama6, out / "f.vlora.safetensors", rank=4, calib=CALIB, calibration=CalibConfig(samples=16),
                 planning="blocks")
    assert list(out.iterdir()) == []


def test_auto_plans_on_the_model_where_it_and_its_grams_fit_half_the_memory(llama6, tmp_path, monkeypatch):
    """The checkpoint (1.0 MB) and its Grams (2.0 MB in float64, counted per family) against the device's memory:
    within half of it, planned on the model (loaded whole); past it, by blocks (loaded by layer);
    with the Grams on disk (``gram_dir``) only the model counts. The note says which and why."""
    pipeline = importlib.import_module("vlora_compress.pipelines.registry")  # where choose reads the memory

    opts = dict(rank=4, calib=CALIB, calibration=CalibConfig(samples=16), force=True)
    seen = {}
    for memory, gram_dir in ((2**40, None), (4 * 2**20, None), (4 * 2**20, tmp_path)):
        monkeypatch.setattr(pipeline, "device_memory", lambda device: memory)
        calibration = CalibConfig(samples=16, gram_dir=gram_dir)
        report = compress(llama6, tmp_path / "f.vlora.safetensors", **{**opts, "calibration": calibration})
        seen[memory, gram_dir] = (report.calibration["planning"], report.calibration["model_loaded"], report.notes[0])
    assert seen[2**40, None][:2] == ("model", "whole") and seen[2**40, None][2].startswith("planned on the model")
    assert seen[4 * 2**20, None][:2] == ("blocks", "by layer")
    assert seen[4 * 2**20, None][2].startswith("planned by blocks of layers: the model and its Grams")
    assert seen[4 * 2**20, tmp_path][:2] == ("model", "whole")


def test_bad_planning_is_refused_naming_the_flag(llama6, tmp_path, capsys):
    from vlora_compress.cli.app import compress_main

    with pytest.raises(SystemExit) as exc:
        compress_main([str(llama6), "--planning", "sideways", "-o", str(tmp_path / "o.vlora.safetensors")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--planning" in err and "sideways" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.vlora.safetensors").exists()
