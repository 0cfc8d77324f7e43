"""vlora-inspect check: every rule, its three exit codes, JSON and Markdown verdicts, budget files."""

import json

import pytest

from conftest import CORE
from vlora_compress import compress
from vlora_compress.evaluate.check import Budgets, check, load_budgets
from vlora_compress.cli.app import inspect_main


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        inspect_main(["check", *map(str, args)])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def _report(path, **overrides):
    """A compress report with an evaluation, as compress --eval --report writes it."""
    data = {"file_bytes": 1_000_000, "size_ratio": 0.40, "compressed_params": 250_000, "tensors": [],
            "families": [], "evaluation": {"task": "embedding", "data": "x", "samples": 10, "model": "m",
                                           "reference": "r", "metrics": [
                                               {"name": "cosine_to_reference", "model": 0.83, "reference": 1.0,
                                                "higher_is_better": True, "drop": 0.17},
                                               {"name": "perplexity", "model": 21.0, "reference": 20.0,
                                                "higher_is_better": False, "drop": 1.0}]}}
    for key, value in overrides.items():
        if key == "cosine":
            data["evaluation"]["metrics"][0]["model"] = value
            data["evaluation"]["metrics"][0]["drop"] = 1.0 - value
        elif key == "ppl":
            data["evaluation"]["metrics"][1]["model"] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


def test_every_rule_passes_and_fails(tmp_path):
    rep = _report(tmp_path / "r.json")
    cases = {
        "file bytes": ("max_bytes", 1_000_000, 999_999),
        "size ratio": ("max_size_ratio", 0.40, 0.39),
        "parameters": ("max_params", 250_000, 249_999),
        "cosine_to_reference drop vs original": ("max_eval_drop", {"cosine_to_reference": 0.17},
                                                 {"cosine_to_reference": 0.16}),
        "perplexity drop vs original": ("max_eval_drop", 1.0, {"perplexity": 0.5}),
    }
    for rule, (field, ok_budget, bad_budget) in cases.items():
        good = check(rep, Budgets(**{field: ok_budget}))
        assert good.ok, rule
        bad = check(rep, Budgets(**{field: bad_budget}))
        failed = [r for r in bad.rules if not r.ok]
        assert [r.rule for r in failed] == [rule]
        limit = bad_budget if not isinstance(bad_budget, dict) else next(iter(bad_budget.values()))
        assert failed[0].difference == pytest.approx(failed[0].value - limit)


def test_baseline_drop_that_passes_and_one_that_fails(tmp_path):
    base = _report(tmp_path / "base.json")
    slightly = _report(tmp_path / "a.json", cosine=0.8295)  # drop 0.0005 <= 0.001
    clearly = _report(tmp_path / "b.json", cosine=0.81)
    worse_ppl = _report(tmp_path / "c.json", ppl=21.5)
    grown = _report(tmp_path / "d.json", file_bytes=1_050_000)
    assert check(slightly, Budgets(baseline=str(base))).ok
    v = check(clearly, Budgets(baseline=str(base)))
    assert [r.rule for r in v.rules if not r.ok] == ["cosine_to_reference drop vs baseline"]
    assert [r.rule for r in check(worse_ppl, Budgets(baseline=str(base))).rules if not r.ok] == [
        "perplexity drop vs baseline"]  # higher is worse for perplexity
    assert [r.rule for r in check(grown, Budgets(baseline=str(base))).rules if not r.ok] == ["file bytes vs baseline"]
    assert check(grown, Budgets(baseline=str(base), max_growth=0.1)).ok
    assert check(clearly, Budgets(baseline=str(base), max_drop=0.05)).ok


def test_three_exit_codes_and_json_and_markdown(tmp_path, capsys):
    rep = _report(tmp_path / "r.json")
    code, out, _ = run([rep, "--max-size-ratio", "0.5", "--json"], capsys)
    assert code == 0 and json.loads(out)["ok"] is True
    code, out, _ = run([rep, "--max-size-ratio", "0.3", "--max-bytes", "2MB", "--json"], capsys)
    verdict = json.loads(out)
    assert code == 1 and verdict["ok"] is False
    (fail,) = [r for r in verdict["rules"] if not r["ok"]]
    assert fail == {"rule": "size ratio", "value": 0.4, "budget": 0.3, "ok": False,
                    "difference": pytest.approx(0.1)}
    code, out, _ = run([rep, "--max-size-ratio", "0.3", "--markdown"], capsys)
    assert code == 1 and "| size ratio | 0.4 | 0.3 | +0.1 | **FAIL** |" in out and "❌ fail" in out
    code, out, err = run([tmp_path / "missing.json", "--max-size-ratio", "0.3"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, out, err = run([bad, "--max-size-ratio", "0.3"], capsys)
    assert code == 2 and "not a vlora-compress report" in err


def test_budgets_from_pyproject_toml_and_json(tmp_path, monkeypatch, capsys):
    rep = _report(tmp_path / "r.json")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.vlora]\nmax-size-ratio = 0.35\n'
                                             'max_bytes = "2MB"\n')
    assert load_budgets(None, tmp_path) == Budgets(max_size_ratio=0.35, max_bytes=2e6)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run([rep, "--json"], capsys)  # picked up from ./pyproject.toml
    assert code == 1 and [r["rule"] for r in json.loads(out)["rules"]] == ["file bytes", "size ratio"]
    code, out, _ = run([rep, "--max-size-ratio", "0.5", "--json"], capsys)  # a flag wins over the file
    assert code == 0
    budgets = tmp_path / "budgets.json"
    budgets.write_text(json.dumps({"max_params": 100, "baseline": "r.json"}))
    b = load_budgets(budgets)
    assert b.max_params == 100 and b.baseline == str(rep.resolve())
    budgets.write_text(json.dumps({"max_parms": 100}))
    code, out, err = run([rep, "--budgets", budgets], capsys)
    assert code == 2 and "unknown budget 'max_parms'" in err


def test_a_size_given_badly_names_its_own_field(tmp_path, capsys):
    """--max-bytes and a budget file's max_bytes take a size (config.parse_size, bytes only); a bad one
    in the file names the file and its field, not the flag or `target_size`."""
    rep = _report(tmp_path / "r.json")
    code, out, err = run([rep, "--max-bytes", "0.5"], capsys)
    assert code == 2 and "--max-bytes must be a size such as 40MB, not '0.5'" in err
    budgets = tmp_path / "b.toml"
    for value in ('"lots"', "0.5"):
        budgets.write_text(f"max_bytes = {value}\n")
        code, out, err = run([rep, "--budgets", budgets], capsys)
        assert code == 2 and f"{budgets}: max_bytes must be a size such as 40MB, not" in err and "target" not in err, err
    budgets.write_text('max_bytes = "1.5 MiB"\n')
    assert load_budgets(budgets).max_bytes == 1.5 * 2**20


def test_check_reads_a_vlora_file_directly(gpt2_file, tmp_path, capsys):
    v = tmp_path / "g.vlora.safetensors"
    report = compress(gpt2_file, v, rank=2, chunks=2, **CORE)
    code, out, _ = run([v, "--max-params", report.compressed_params, "--max-size-ratio", report.size_ratio + 1e-9,
                        "--json"], capsys)
    assert code == 0, out
    code, out, err = run([v, "--max-eval-drop", "0.1"], capsys)
    assert code == 2 and "needs a report with an evaluation" in err
    code, out, err = run([v, "--max-eval-drop", "cosine=lots"], capsys)
    assert code == 2 and "--max-eval-drop must be" in err


def test_a_healed_report_says_what_healing_bought_and_min_heal_gain_guards_it(tmp_path, capsys):
    healing = {"source": "a", "output": "b", "steps": 12, "tokens": 3000, "seconds": 60.0, "device": "cpu",
               "processes": 1, "losses": [0.5, 0.3], "evals": [{"step": 0, "value": 30.0}, {"step": 12, "value": 24.0}],
               "metric": "perplexity", "higher_is_better": False, "before": 30.0, "after": 24.0, "best_step": 12,
               "local": None}
    report = _report(tmp_path / "r.json", healing=healing)
    code, out, _ = run([report, "--min-heal-gain", "0.15"], capsys)  # 30 -> 24: 20% lower
    out = " ".join(out.split())  # rich wraps long lines
    assert code == 0 and "healing: 12 steps" in out and "perplexity 30.0000 -> 24.0000" in out
    code, out, _ = run([report, "--min-heal-gain", "0.25", "--json"], capsys)
    verdict = json.loads(out)
    assert code == 1 and verdict["rules"][0]["value"] == pytest.approx(0.2) and "24.0000" in verdict["healing"]
    cosine = _report(tmp_path / "c.json", healing={**healing, "metric": "cosine_to_reference", "higher_is_better": True,
                                                    "before": 0.8, "after": 0.88})  # higher is better: +10%
    assert check(cosine, Budgets(min_heal_gain=0.09)).ok and not check(cosine, Budgets(min_heal_gain=0.11)).ok
    assert "healing: 12 steps" in check(cosine, Budgets()).to_markdown()
    code, _, err = run([_report(tmp_path / "n.json"), "--min-heal-gain", "0.1"], capsys)
    assert code == 2 and "--distill" in err and "Traceback" not in err
