"""The default plan weighs every storage (issue 38): what it resolves to, what it picks where a
dense integer scheme or a quantized base under low rank is best, --max-drop's search, and the sweep
on one calibration."""

from __future__ import annotations

import json

import pytest

from conftest import CALIB, EVAL, tiny_model
from vlora_compress import CalibConfig, CompressConfig, compress, synthetic
from vlora_compress.cli.app import compress_main
from vlora_compress.io.checkpoint import open_checkpoint
from vlora_compress.io.fileformat import VloraFile
from vlora_compress.io.stacks import find_stacks
from vlora_compress.pipelines import registry
from vlora_compress.planning.space import default_storage
from vlora_compress.run import run
from vlora_compress.evaluate.scoring import EvalConfig
from vlora_compress.sweep import parse_points, sweep

SMALL = CalibConfig(samples=16, max_length=32, holdout=4, batch_size=8)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("default") / "llama", "llama")


def stacks_of(path):
    with open_checkpoint(path) as ckpt:
        return find_stacks(ckpt.infos)


def test_the_default_weighs_every_storage_only_when_calibrated_and_sized(llama):
    stacks = stacks_of(llama)
    sized = CompressConfig(target_bits=3.0)
    got, note = default_storage(sized, True, stacks)
    assert (got.quantize, got.dtype) == ("auto", "fp16")  # float32 families: floats in 16 bits
    assert "every storage" in note
    assert default_storage(sized, False, stacks)[0].quantize == "none"  # data-free stays as asked
    assert default_storage(CompressConfig(rank=4), True, stacks)[0].quantize == "none"  # no size to fill
    assert default_storage(CompressConfig(method="svd", target_bits=3.0), True, stacks)[0].quantize == "none"
    pinned, _ = default_storage(CompressConfig(quantize="int4", target_bits=3.0), True, stacks)
    assert (pinned.quantize, pinned.dtype) == ("int4", None)  # --quantize pins the storage


def test_at_two_and_a_half_bits_a_quantized_base_under_low_rank_is_picked_where_it_measures_better(llama, tmp_path):
    report = compress(llama, tmp_path / "q.vlora.safetensors", target_bits=2.5, calib=CALIB, calibration=SMALL,
                      device="cpu")
    assert report.quantize == "auto"
    assert report.stack_compressed_bytes * 8 <= 2.5 * sum(f["shape"][0] * f["shape"][1] * len(f["layers"])
                                                          for f in report.families)
    stored = [f["storage"] for f in report.families]
    assert any("bases" in s for s in stored), stored  # an integer base under low-rank factors
    based = [d for d in report.decisions if d["candidates"][d["chosen"]]["form"] == "quantized + low rank"
             and d.get("allocated") is None]
    for d in based:  # chosen by measurement: below every dense integer candidate of its family
        mine = d["candidates"][d["chosen"]]["error"]
        dense = [c["error"] for c in d["candidates"] if c["form"] == "dense" and c["error"] is not None]
        assert dense and mine < min(dense)


def test_just_under_a_schemes_size_wider_groups_measure_better_than_a_mix_of_schemes(llama, tmp_path, monkeypatch):
    """At 4.3 bits a weight with scales every 32 values int4 is 4.5 bits: no family fits it, and
    the families' mix took int3 or int2 for some. int4 with a scale every 128 values (4.125 bits)
    fits: allowed, the allocation takes it and the plan measures better."""
    from vlora_compress.planning import allocate

    def plan(wider):
        monkeypatch.setattr(allocate, "WIDER", wider)  # 1: the wider groups are the config's own
        return compress(llama, tmp_path / f"w{wider}.vlora.safetensors", target_bits=4.3, group_size=32, calib=CALIB,
                        device="cpu")

    wider = allocate.WIDER
    narrow, wide = plan(1), plan(wider)
    assert not any("/g128" in f["storage"] for f in narrow.families)
    assert any("int4/g128" == f["storage"] for f in wide.families), [f["storage"] for f in wide.families]
    (a,), (b,) = (VloraFile(r.output).plan.allocations for r in (narrow, wide))
    assert a.outcome == b.outcome == "allocated" and b.error < a.error  # measured with every family compressed
    for report in (narrow, wide):
        assert report.stack_compressed_bytes * 8 <= 4.3 * sum(f["shape"][0] * f["shape"][1] * len(f["layers"])
                                                              for f in report.families)


def test_max_drop_lands_within_its_bound_and_the_next_size_down_breaks_it(llama, tmp_path):
    bound = 2e-4
    report = compress(llama, tmp_path / "m.vlora.safetensors", max_drop=bound, calib=CALIB, calibration=SMALL,
                      device="cpu")
    search = report.target["max_drop"]
    assert search["error"] <= bound and search["measure"] == "logits"
    below = [t for t in search["tried"] if t["bits"] < search["bits"]]
    assert below and not below[-1]["within"]  # the next size tried below it breaks the bound
    assert search["bits"] - below[-1]["bits"] <= 0.25
    weights = sum(f["shape"][0] * f["shape"][1] * len(f["layers"]) for f in report.families)
    assert report.stack_compressed_bytes * 8 <= search["bits"] * weights
    assert any(n.startswith(f"max drop {bound:g}") for n in report.notes)


def test_a_sweep_calibrates_once_for_every_point(llama, tmp_path, monkeypatch):
    loads = []
    original = registry.load_original
    monkeypatch.setattr(registry, "load_original", lambda *a, **k: loads.append(1) or original(*a, **k))
    result = sweep(llama, tmp_path / "sw", "8,3", calib=CALIB, calibration=SMALL, device="cpu")
    assert len(loads) == 1 and result.calibrations == 1
    assert [p["point"] for p in result.points] == ["8bits", "3bits"]
    assert result.points[0]["bytes"] > result.points[1]["bytes"]
    for p in result.points:  # each at or under its size
        assert p["stack_bits"] <= p["target_bits"] + 1e-9
        assert json.loads((tmp_path / "sw" / p["report"].split("/")[-1]).read_text())["target"]["size"]
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["calibrations"] == 1


@pytest.mark.slow
def test_a_scored_sweep_draws_the_curve_beside_gptq_alone(llama, tmp_path):
    result = sweep(llama, tmp_path / "sw", "16,2.5", calib=CALIB, calibration=SMALL, eval_data=EVAL,
                   eval_config=EvalConfig(task="perplexity", samples=8, device="cpu"), device="cpu")
    assert result.calibrations == 2  # the points' and the yardsticks' (GPTQ alone holds no samples back)
    names = [r["name"] for r in result.yardsticks]
    assert names == ["original", "int8 alone, GPTQ", "int4 alone, GPTQ", "int3 alone, GPTQ", "int2 alone, GPTQ"]
    assert all(p["value"] is not None and p["best"] for p in result.points)
    assert (tmp_path / "sw" / "tradeoff.png").stat().st_size > 0
    assert "int2 alone, GPTQ" in (tmp_path / "sw" / "sweep.md").read_text()


@pytest.mark.slow
def test_minilm_at_half_the_stack_picks_int8_or_better_and_no_verdict_against_it(minilm_dir, tmp_path):
    report = run(minilm_dir, tmp_path / "m.vlora.safetensors", target_size="0.5", target_of="stack", calib=CALIB,
                 calibration=CalibConfig(samples=48, holdout=16), eval_data=EVAL,
                 eval_config=EvalConfig(task="embedding", samples=48, device="cpu"), device="cpu")
    assert {f["storage"] for f in report.families} <= {"int8", "F16"}, [f["storage"] for f in report.families]
    rows = report.alternatives["rows"]
    mine = next(r for r in rows if r["name"] == "this file")
    assert not [r for r in rows if r["name"] != "this file" and r["bytes"] <= mine["bytes"] and r["value"] > mine["value"]]
    assert report.alternatives["verdict"].startswith("This file is the best")


@pytest.mark.parametrize("args, words", [
    (["--sweep", "16,abc"], ["abc"]),
    (["--sweep", "4,4"], ["twice"]),
    (["--sweep", "4,2", "--target-bits", "3"], ["--sweep"]),
    (["--max-drop", "-1"], ["--max-drop"]),
    (["--max-drop", "0.1", "--target-size", "0.5"], ["--max-drop"]),
])
def test_bad_sweep_or_max_drop_is_one_line_and_exit_2(args, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compress_main([str(CALIB.parent), "--calib", str(CALIB), "-o", str(tmp_path / "o"), *args])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_max_drop_without_calibration_is_refused(llama, tmp_path):
    from vlora_compress.errors import VloraError

    with pytest.raises(VloraError, match="--calib"):
        compress(llama, tmp_path / "x.vlora.safetensors", max_drop=0.01, device="cpu")


def test_parse_points():
    assert parse_points("16, 2.5,0.5,40MB") == [
        {"target_bits": 16.0, "target_size": None}, {"target_bits": 2.5, "target_size": None},
        {"target_bits": None, "target_size": "0.5"}, {"target_bits": None, "target_size": "40MB"}]
