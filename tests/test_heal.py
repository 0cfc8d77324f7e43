import json

import pytest
import torch

from conftest import CALIB, CORE, EVAL
from vlora_compress import VloraError, compress, expand
from vlora_compress.cli import compress_main
from vlora_compress.evaluate import EvalConfig, evaluate
from vlora_compress.fileformat import VloraFile
from vlora_compress.heal import HealConfig, heal


def test_healing_improves_the_held_out_metric_and_keeps_the_file_shape(minilm_dir, tmp_path):
    start = tmp_path / "s.vlora.safetensors"
    compress(minilm_dir, start, rank=8, chunks=2, **CORE)
    healed = tmp_path / "h.vlora.safetensors"
    report = heal(start, minilm_dir, CALIB, healed, HealConfig(steps=20, batch_size=16, lr=1e-3))
    assert report.steps == 20 and report.losses[-1] < report.losses[0]
    cfg = EvalConfig(samples=64)
    before = evaluate(start, EVAL, cfg, reference=minilm_dir).metric("cosine_to_reference").model
    after = evaluate(healed, EVAL, cfg, reference=minilm_dir).metric("cosine_to_reference").model
    assert after > before + 0.05  # Persuasion was never trained on
    a, b = VloraFile(start), VloraFile(healed)
    assert a.plan == b.plan and a.checkpoint.infos.keys() == b.checkpoint.infos.keys()
    assert healed.stat().st_size == start.stat().st_size
    dense = expand(healed)  # round-trips through expand
    assert torch.isfinite(dense["encoder.layer.3.output.dense.weight"]).all()


def test_frozen_tensors_do_not_move(minilm_dir, tmp_path):
    start = tmp_path / "s.vlora.safetensors"
    compress(minilm_dir, start, rank=4, chunks=2, **CORE)
    healed = tmp_path / "h.vlora.safetensors"
    heal(start, minilm_dir, CALIB, healed, HealConfig(steps=3, batch_size=8, train=("increments",)))
    a, b = VloraFile(start), VloraFile(healed)
    assert torch.equal(a.get("encoder.layer.0.output.dense.weight"), b.get("encoder.layer.0.output.dense.weight"))
    assert torch.equal(a.get("encoder.layer.1.output.dense.bias"), b.get("encoder.layer.1.output.dense.bias"))
    inc = "encoder.layer.1.output.dense.weight.vlora_A"
    assert not torch.equal(a.get(inc), b.get(inc))


def test_heal_cli_and_bad_input(minilm_dir, gpt2_file, tmp_path, capsys):
    start = tmp_path / "s.vlora.safetensors"
    compress(minilm_dir, start, rank=4, chunks=2, **CORE)
    with pytest.raises(SystemExit) as exc:
        compress_main(["heal", str(start), "--teacher", str(minilm_dir), "--data", str(CALIB), "-o",
                       str(tmp_path / "h.vlora.safetensors"), "--steps", "2", "--batch-size", "4", "--json"])
    out, _ = capsys.readouterr()
    assert exc.value.code == 0 and json.loads(out)["steps"] == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    other = tmp_path / "g.vlora.safetensors"
    compress(gpt2_file, other, rank=2, **CORE)
    for args, words in (
        (["--data", str(empty)], "holds no text"),
        (["--data", str(CALIB), "--device", "cuda:7"], "is not available"),
        (["--data", str(CALIB), "--freeze", "everything"], "--freeze takes"),
    ):
        with pytest.raises(SystemExit) as exc:
            compress_main(["heal", str(start), "--teacher", str(minilm_dir), "-o", str(tmp_path / "x.safetensors"),
                           *args])
        out, err = capsys.readouterr()
        assert exc.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(VloraError, match="does not match"):
        heal(other, minilm_dir, CALIB, tmp_path / "y.safetensors", HealConfig(steps=1))
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_compress_distill_heals_the_written_file(minilm_dir, tmp_path):
    out = tmp_path / "d.vlora.safetensors"
    plain = compress(minilm_dir, tmp_path / "p.vlora.safetensors", rank=8, chunks=2, eval_data=EVAL,
                     eval_config=EvalConfig(samples=32), **CORE)
    report = compress(minilm_dir, out, rank=8, chunks=2, distill=CALIB, heal_config=HealConfig(steps=12,
                      batch_size=16, lr=1e-3), eval_data=EVAL, eval_config=EvalConfig(samples=32), **CORE)
    assert report.healing["steps"] == 12 and report.healing["losses"][-1] < report.healing["losses"][0]
    assert report.evaluation["metrics"][0]["model"] > plain.evaluation["metrics"][0]["model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.vlora.safetensors", "p.vlora.safetensors"]
