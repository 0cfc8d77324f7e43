"""Block-sequential calibration and fitting: the same math as the classic path, a layer at a time."""

import pytest
import torch

from conftest import CALIB, EVAL, tiny_model
from vlora_compress import CalibConfig, compress, expand
from vlora_compress.calibrate import OutputMeter, read_calibration
from vlora_compress.models import load_model, load_preprocessor

PER_LAYER = dict(method="svd", ranks="uniform")


def _hidden_error(folder, path, texts) -> float:
    """Relative squared error of the final hidden states of the file's model on ``texts``."""
    model, tok = load_model(folder, head="base"), load_preprocessor(folder)
    meter = OutputMeter(model, tok, texts, 64)
    return meter({k: v for k, v in expand(path).items() if k.endswith("proj.weight")})


def test_without_feedback_it_fits_what_the_classic_path_fits(tiny_llama, tmp_path):
    """feedback none: every Gram from the original activations, a layer at a time; the file is the
    classic path's up to float rounding of the Grams, and only one layer's Grams are held."""
    calib = CalibConfig(samples=48)
    files = {}
    for sequential in (False, True):
        files[sequential] = tmp_path / f"{sequential}.vlora.safetensors"
        report = compress(tiny_llama, files[sequential], rank=6, calib=CALIB, calibration=calib, sequential=sequential,
                          feedback="none", **PER_LAYER)
        assert report.calibration["sequential_layers"] == (28 if sequential else 0)
        assert report.calibration["whitened_layers"] == 28
        if sequential:
            assert report.calibration["gram_bytes"] * 2 < classic_gram_bytes  # one layer of four
        else:
            classic_gram_bytes = report.calibration["gram_bytes"]
    a, b = expand(files[False]), expand(files[True])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-3), key


def test_output_feedback_undoes_upstream_error_where_data_suffices(tmp_path):
    """With far more calibration tokens than a layer has inputs (600 sentences for inputs of 64 and
    128 dims), fitting each layer to the original's outputs from the compressed model's inputs
    lowers the final error on held-out text (measured 0.239 against 0.257); whitening by the
    compressed inputs alone stays near none on this random model (0.274); on SmolLM2 it is the one
    that pays (bench/llm.py). Measured on lines (600 sentences); packed in windows the same text
    gives fewer, longer samples."""
    folder = tiny_model(tmp_path / "llama", "llama", num_hidden_layers=4)
    tok = load_preprocessor(folder)
    held, _ = read_calibration(tok, EVAL, CalibConfig(samples=64, holdout=0))
    errors = {}
    for feedback in ("none", "inputs", "outputs"):
        path = tmp_path / f"{feedback}.vlora.safetensors"
        compress(folder, path, rank=8, calib=CALIB, calibration=CalibConfig(samples=600, packing="lines"),
                 feedback=feedback,
                 **PER_LAYER)
        errors[feedback] = _hidden_error(folder, path, held)
    assert errors["outputs"] < 0.95 * errors["none"], errors
    assert errors["inputs"] < 1.1 * errors["none"], errors  # a working fit, not a broken one


def test_conv1d_and_planned_families_take_the_sequential_path_or_the_classic_one(tiny_gpt2, tmp_path):
    """GPT-2's Conv1D weights (stored in x out) fit sequentially too; a family the planner gives a
    whitened-mean base is fitted after the pass, from the original model's Grams."""
    path = tmp_path / "g.vlora.safetensors"
    report = compress(tiny_gpt2, path, rank=8, chunks=2, base="mean", topology="star", bounds="equal",
                      ranks="uniform", calib=CALIB, calibration=CalibConfig(samples=32), feedback="outputs")
    assert report.calibration["sequential_layers"] == 0 and report.calibration["whitened_layers"] == 16
    report = compress(tiny_gpt2, path, rank=8, calib=CALIB, calibration=CalibConfig(samples=32), feedback="outputs",
                      force=True, **PER_LAYER)
    assert report.calibration["sequential_layers"] == 16 and report.calibration["feedback"] == "outputs"
    model, tok = load_model(tiny_gpt2, head="base"), load_preprocessor(tiny_gpt2)
    texts, _ = read_calibration(tok, EVAL, CalibConfig(samples=8, holdout=0))
    meter = OutputMeter(model, tok, texts, 64)
    fitted = {k: v for k, v in expand(path).items() if k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))}
    assert 0 < meter(fitted) < 0.5  # a working model, not a broken one


def test_bad_feedback_is_refused_naming_the_flag(tiny_llama, tmp_path, capsys):
    from vlora_compress.cli import compress_main

    with pytest.raises(SystemExit) as exc:
        compress_main([str(tiny_llama), "--feedback", "sideways", "-o", str(tmp_path / "o.vlora.safetensors")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--feedback must be one of none, inputs, outputs" in err


def test_device_cpu_runs_every_stage_and_bf16_stays_bf16(tmp_path, capsys):
    """--device cpu through alignment, calibration, planning by measurement, the sequential fit and
    the eval; a bf16 model is calibrated in bf16 and its file stores bf16."""
    from safetensors import safe_open

    from vlora_compress.cli import compress_main

    folder = tiny_model(tmp_path / "llama", "llama", dtype=torch.bfloat16)
    model = load_model(folder, head="base")
    assert next(model.parameters()).dtype == torch.bfloat16
    out = tmp_path / "o.vlora.safetensors"
    with pytest.raises(SystemExit) as exc:
        compress_main([str(folder), "-o", str(out), "--device", "cpu", "--align", "--calib", str(CALIB),
                       "--calib-samples", "24", "--target-size", "0.6", "--eval", str(EVAL), "--eval-samples", "8",
                       "--eval-task", "perplexity", "--json"])
    assert exc.value.code == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["whitened_layers"] == 28 and report["evaluation"]["metrics"][0]["model"] > 0
    with safe_open(str(out), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if "layers" in k} == {"BF16"}
    with pytest.raises(SystemExit) as exc:
        compress_main([str(folder), "-o", str(tmp_path / "x.vlora.safetensors"), "--device", "tpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--device 'tpu'" in err and not (tmp_path / "x.vlora.safetensors").exists()
