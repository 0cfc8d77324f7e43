"""--report FILE.json|.md from every command, and every plot kind as a real picture."""

import json

import pytest

from conftest import CALIB, CORE, EVAL
from vlora_compress import compress
from vlora_compress import run as run_all
from vlora_compress.calibrate.grams import CalibConfig
from vlora_compress.cli.app import compress_main, eval_main, inspect_main
from vlora_compress.evaluate.scoring import EvalConfig


def run(main, args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    capsys.readouterr()
    return exc.value.code


def test_every_command_writes_json_and_markdown_reports(gpt2_file, minilm_dir, tmp_path, capsys):
    v = tmp_path / "g.vlora.safetensors"
    for suffix in ("json", "md"):
        r = tmp_path / f"compress.{suffix}"
        assert run(compress_main, [gpt2_file, "-o", v, "-r", 2, "-c", 2, "--base", "first", "--topology", "chain",
                                   "--force", "-q", "--report", r], capsys) == 0
        text = r.read_text()
        if suffix == "json":
            assert json.loads(text)["families"][0]["bases"] == [0, 2]
        else:
            assert text.startswith("### VLoRA") and "| size ratio |" in text
        for args in ([v], [gpt2_file], [gpt2_file, "--spectra"]):
            out = tmp_path / f"inspect.{suffix}"
            assert run(inspect_main, [*args, "--report", out], capsys) == 0
            assert out.stat().st_size > 100
    m = tmp_path / "m.vlora.safetensors"
    compress(minilm_dir, m, rank=8, chunks=2, **CORE)
    ev = tmp_path / "eval.md"
    assert run(eval_main, [m, "--data", EVAL, "--reference", minilm_dir, "--samples", 8, "--report", ev], capsys) == 0
    assert "| cosine_to_reference |" in ev.read_text()
    assert run(compress_main, [gpt2_file, "-o", tmp_path / "x.vlora.safetensors", "--report",
                               tmp_path / "r.txt"], capsys) == 2


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_every_plot_kind_renders_a_real_picture(minilm_dir, tmp_path, capsys):
    reports = []
    for i, size in enumerate((0.5, 0.7)):
        r = run_all(minilm_dir, tmp_path / f"m{i}.vlora.safetensors", method="svd", ranks="uniform",
                     target_size=size, target_of="stack", calib=CALIB, calibration=CalibConfig(samples=32),
                     eval_data=EVAL, eval_config=EvalConfig(samples=8))
        path = tmp_path / f"m{i}.json"
        path.write_text(r.to_json())
        reports.append(path)
    jobs = {
        "spectra": [minilm_dir],
        "bytes": [tmp_path / "m0.vlora.safetensors"],
        "ranks": [reports[0]],
        "errors": [reports[0]],
        "tradeoff": reports,
    }
    for kind, inputs in jobs.items():
        out = tmp_path / f"{kind}.png"
        assert run(inspect_main, ["plot", kind, *inputs, "-o", out], capsys) == 0
        width, height = _png_size(out)
        assert width >= 400 and height >= 250 and out.stat().st_size > 10_000, kind
    svg = tmp_path / "bytes.svg"
    assert run(inspect_main, ["plot", "bytes", tmp_path / "m0.vlora.safetensors", "-o", svg], capsys) == 0
    assert svg.read_text().lstrip().startswith("<?xml")
    assert run(inspect_main, ["plot", "pie", reports[0], "-o", tmp_path / "p.png"], capsys) == 2
    assert run(inspect_main, ["plot", "ranks", tmp_path / "m0.vlora.safetensors", "-o", tmp_path / "p.png"],
               capsys) == 2
