"""Every evaluated compress report shows the obvious alternatives at their exact bytes, and a verdict."""

import json

import pytest

from conftest import CALIB, EVAL
from vlora_compress import CalibConfig, compress, run
from vlora_compress.evaluate.alternatives import Row, verdict
from vlora_compress.cli.app import compress_main, inspect_main
from vlora_compress.evaluate.scoring import EvalConfig, evaluate


def test_minilm_report_shows_int8_and_int4_alone_at_their_exact_bytes_and_int8_dominates(minilm_dir, tmp_path,
                                                                                        capsys):
    """At half the stack's bytes whitened per-layer SVD keeps ~0.78 cosine; int8 alone is smaller
    and near lossless, so the verdict says to use it and gives the command; that command writes a
    file of exactly the row's bytes that scores the row's value."""
    out = tmp_path / "m.vlora.safetensors"
    cfg = EvalConfig(task="embedding", samples=40)
    report = run(minilm_dir, out, method="svd", ranks="uniform", target_size="0.5", target_of="stack",
                      calib=CALIB, calibration=CalibConfig(samples=64), eval_data=EVAL, eval_config=cfg)
    block = report.alternatives
    rows = {r["name"]: r for r in block["rows"]}
    assert set(rows) == {"original", "this file", "int8 alone", "int4 alone", "int4 alone, GPTQ"}
    assert block["metric"] == "cosine_to_reference" and block["higher_is_better"]
    # calibrated: int4 with GPTQ rounding on the file's calibration, the same bytes, a better score
    assert rows["int4 alone, GPTQ"]["bytes"] == rows["int4 alone"]["bytes"]
    assert rows["int4 alone, GPTQ"]["value"] > rows["int4 alone"]["value"]
    assert "--quantize int4 --group-size 128 --calib" in rows["int4 alone, GPTQ"]["command"]
    assert rows["original"]["bytes"] == report.original_bytes and rows["original"]["value"] == 1.0
    assert rows["this file"]["bytes"] == report.compressed_bytes
    assert rows["this file"]["value"] == report.evaluation["metrics"][0]["model"]
    assert [r["bytes"] for r in block["rows"]] == sorted(r["bytes"] for r in block["rows"])
    for scheme in ("int8", "int4"):
        # the row is what vlora-eval --quantize scores, and what --method dense --quantize writes
        alone = evaluate(minilm_dir, EVAL, EvalConfig(task="embedding", samples=40, quantize=scheme),
                         reference=minilm_dir)
        assert rows[f"{scheme} alone"]["value"] == pytest.approx(alone.metrics[0].model, abs=1e-6)
        dense = tmp_path / f"{scheme}.vlora.safetensors"
        made = compress(minilm_dir, dense, method="dense", quantize=scheme)
        assert made.compressed_bytes == rows[f"{scheme} alone"]["bytes"]
        scored = evaluate(dense, EVAL, EvalConfig(task="embedding", samples=40), reference=minilm_dir,
                          config_dir=minilm_dir)
        assert scored.metrics[0].model == pytest.approx(rows[f"{scheme} alone"]["value"], abs=1e-4)
    assert rows["int8 alone"]["bytes"] < rows["this file"]["bytes"]
    assert rows["int8 alone"]["value"] > 0.99 > rows["this file"]["value"]
    assert block["verdict"].startswith("int8 alone is smaller")
    assert "--method dense --quantize int8" in block["verdict"]
    markdown = report.to_markdown()
    assert "**Alternatives** on the same data" in markdown and block["verdict"] in markdown

    # the saved report budgets against an alternative: worse than int8 alone fails, within a wide
    # allowance of int4 alone passes
    saved = tmp_path / "r.json"
    saved.write_text(json.dumps(report.to_dict()))
    for args, code in ((["--max-drop-vs", "int8"], 1), (["--max-drop-vs", "int4", "--max-drop", "0.5"], 0)):
        with pytest.raises(SystemExit) as exc:
            inspect_main(["check", str(saved), *args])
        assert exc.value.code == code, (args, capsys.readouterr())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        inspect_main(["check", str(saved), "--max-drop-vs", "int2"])
    assert exc.value.code == 2 and "max-drop-vs" in capsys.readouterr().err


def test_a_causal_lm_report_scores_perplexity_rows_and_no_compare_leaves_them_out(tiny_llama, tmp_path, capsys):
    """--compare svd adds whitened per-layer SVD at the file's bytes (one more compress, its file
    removed after); --no-compare scores the file alone."""
    out = tmp_path / "l.vlora.safetensors"
    base = [str(tiny_llama), "-o", str(out), "--rank", "4", "--chunks", "2", "--base", "first", "--topology", "chain",
            "--bounds", "equal", "--ranks", "uniform", "--calib", str(CALIB), "--calib-samples", "8",
            "--eval", str(EVAL), "--eval-samples", "4", "--json"]
    with pytest.raises(SystemExit) as exc:
        compress_main([*base, "--compare", "svd"])
    assert exc.value.code == 0
    report = json.loads(capsys.readouterr().out)
    block = report["alternatives"]
    rows = {r["name"]: r for r in block["rows"]}
    assert set(rows) == {"original", "this file", "int8 alone", "int4 alone", "int4 alone, GPTQ", "per-layer SVD"}
    assert block["metric"] == "perplexity" and not block["higher_is_better"]
    assert rows["original"]["value"] == report["evaluation"]["metrics"][0]["reference"]
    assert 0.97 * rows["this file"]["bytes"] <= rows["per-layer SVD"]["bytes"] <= rows["this file"]["bytes"]
    assert "--method svd --ranks uniform" in rows["per-layer SVD"]["command"]
    assert all(r["seconds"] >= 0 for r in block["rows"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("l.")) == ["l.vlora.safetensors"]
    with pytest.raises(SystemExit) as exc:
        compress_main([*base, "--no-compare", "--force"])
    report = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0 and report["alternatives"] is None and report["evaluation"]["metrics"]
    with pytest.raises(SystemExit) as exc:
        compress_main([*base, "--compare", "int3", "--force"])
    assert exc.value.code == 2 and "--compare takes int8, int4, gptq, svd, not 'int3'" in capsys.readouterr().err


def test_verdict_reads_the_rows_alone():
    rows = [Row("original", 100, 10.0, 1), Row("int4 alone", 20, 14.0, 1, "make int4"),
            Row("int8 alone", 30, 10.5, 1, "make int8"), Row("this file", 40, 30.0, 1)]
    # lower is better (perplexity): both dominate, the better of them is named with its command
    assert verdict(rows, "perplexity", False).startswith("int8 alone is smaller (30 B against 40 B) and better")
    assert "`make int8` makes it" in verdict(rows, "perplexity", False)
    rows[-1] = Row("this file", 40, 12.0, 1)  # now int4 is worse, int8 still dominates
    assert verdict(rows, "perplexity", False).startswith("int8 alone")
    rows[-1] = Row("this file", 25, 12.0, 1)  # int8 is better but larger: the file is the best at its size
    line = verdict(rows, "perplexity", False)
    assert line.startswith("This file is the best") and "int8 alone (30 B, 10.5)" in line


def test_below_4_bits_the_gptq_yardstick_takes_the_files_bytes():
    """int4 in the eval's groups while the file is at least that large; below, the largest int3
    or int2 storage (groups of 128, 64 or 32) that fits under the file's stack bytes."""
    from vlora_compress.evaluate.alternatives import yardstick
    from vlora_compress.fit.integers import nbytes

    families = [{"shape": [384, 384], "dtype": "F32", "layers": list(range(6))},  # as the report's families
                {"shape": [1536, 384], "dtype": "F32", "layers": list(range(6))}]
    cost = lambda scheme, group: sum(nbytes(tuple(f["shape"]), scheme, group) * 6 for f in families)  # noqa: E731
    assert yardstick(families, 10**9, 128) == ("int4", 128)
    assert yardstick(families, cost("int4", 128), 128) == ("int4", 128)
    assert yardstick(families, cost("int4", 128) - 1, 128) == ("int3", 32)  # 3.5 bits fit under 4.125
    assert yardstick(families, cost("int3", 64), 128) == ("int3", 64)
    assert yardstick(families, cost("int3", 128) - 1, 128) == ("int2", 32)
    assert yardstick(families, cost("int2", 64) + 1, 128) == ("int2", 64)
    assert yardstick(families, 1, 128) == ("int2", 128)  # nothing fits: the smallest there is


def test_a_sub_4_bit_report_scores_gptq_and_nearest_at_its_own_bytes(tiny_llama, tmp_path, capsys):
    out = tmp_path / "q.vlora.safetensors"
    args = [str(tiny_llama), "-o", str(out), "--method", "svd", "--ranks", "uniform", "--base-quantize", "int2",
            "--quantize", "int4", "--group-size", "32", "--target-bits", "3.2", "--calib", str(CALIB),
            "--calib-samples", "8", "--eval", str(EVAL), "--eval-samples", "4", "--json"]
    with pytest.raises(SystemExit) as exc:
        compress_main(args)
    assert exc.value.code == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in report["alternatives"]["rows"]}
    gptq = [name for name in rows if name.endswith("alone, GPTQ")]
    assert len(gptq) == 1 and gptq[0].startswith(("int2 g", "int3 g")), rows.keys()
    scheme = gptq[0][:-len(", GPTQ")]
    assert scheme in rows and rows[scheme]["bytes"] == rows[gptq[0]]["bytes"] <= rows["this file"]["bytes"]
    assert rows[gptq[0]]["value"] < rows[scheme]["value"]  # perplexity: GPTQ below round-to-nearest
    assert "--rounding nearest" in rows[scheme]["command"] and "--quantize int" in rows[gptq[0]]["command"]


def test_an_alternative_within_noise_does_not_win_the_verdict():
    """Better by less than the noise (1% of a perplexity, 0.002 of a cosine) is named as level, not
    as a reason to use it; better by more still wins."""
    from vlora_compress.evaluate.alternatives import block

    rows = [Row("int8 alone", 30, 10.05, 1, "make int8"), Row("this file", 40, 10.1, 1)]
    assert verdict(rows, "perplexity", False).startswith("This file is the best")  # 0.5% lower: noise
    assert block(rows, "perplexity", False)["within_noise"] == ["int8 alone"]
    rows[0] = Row("int8 alone", 30, 9.9, 1, "make int8")  # 2% lower: better
    assert verdict(rows, "perplexity", False).startswith("int8 alone is smaller")
    cos = [Row("int4 alone", 30, 0.9415, 1), Row("this file", 40, 0.9400, 1)]
    assert verdict(cos, "cosine_to_reference", True).startswith("This file is the best")
    cos[0] = Row("int4 alone", 30, 0.9430, 1)
    assert verdict(cos, "cosine_to_reference", True).startswith("int4 alone is smaller")
    assert block(cos, "cosine_to_reference", True)["noise"] == 0.002
    assert block(cos, "cosine_to_reference", True)["within_noise"] == []
