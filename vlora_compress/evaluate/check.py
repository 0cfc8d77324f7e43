"""Check a compressed checkpoint against budgets and a baseline: the size-regression guard for CI.

Input is a VLoRA file (sizes only) or a saved compress report (sizes and any eval metrics). Every
rule is reported with its value, its budget and the difference; a failed rule fails the check.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..errors import VloraError
from ..config import parse_size
from ..report.compress_report import healing_line


@dataclass(frozen=True)
class Budgets:
    max_bytes: float | None = None  # the VLoRA file on disk
    max_size_ratio: float | None = None  # compressed / original tensor bytes
    max_params: int | None = None  # stored parameters
    max_eval_drop: float | dict[str, float] | None = None  # eval drop against the original: one budget
    # for every metric in the report, or one per metric name
    baseline: str | None = None  # a report (or VLoRA file) to compare with
    max_growth: float = 0.0  # allowed growth of the file against the baseline, as a fraction
    max_drop: float = 0.001  # allowed drop of every eval metric against the baseline's (and max_drop_vs's)
    max_drop_vs: str | None = None  # an alternative in the report (int8, int4, gptq, svd, original): fail when
    # the file scores worse than it by more than max_drop
    min_heal_gain: float | None = None  # --distill reports: the least relative gain healing must buy on
    # its own held-out metric (0.1: perplexity 10% lower, or cosine 10% higher, than before healing)


@dataclass(frozen=True)
class Rule:
    rule: str
    value: float
    budget: float
    ok: bool

    @property
    def difference(self) -> float:
        return self.value - self.budget


@dataclass(frozen=True)
class Verdict:
    subject: str
    rules: list[Rule] = field(default_factory=list)
    healing: str | None = None  # what healing bought, when the report has a healing block

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rules)

    def to_dict(self) -> dict:
        return {"subject": self.subject, "ok": self.ok,
                "rules": [{**asdict(r), "difference": r.difference} for r in self.rules], "healing": self.healing}

    def to_markdown(self) -> str:
        head = f"### vlora check: {'✅ pass' if self.ok else '❌ fail'} — `{Path(self.subject).name}`\n\n"
        rows = ["| rule | value | budget | difference | |", "|---|---:|---:|---:|---|"]
        for r in self.rules:
            rows.append(f"| {r.rule} | {fmt_number(r.value)} | {fmt_number(r.budget)} | {r.difference:+.4g} | "
                        f"{'ok' if r.ok else '**FAIL**'} |")
        if not self.rules:
            rows.append("| (no rules given) | | | | |")
        tail = f"\nhealing: {self.healing}\n" if self.healing else ""
        return head + "\n".join(rows) + "\n" + tail


def load_budgets(path: str | Path | None, search_from: Path | None = None) -> Budgets:
    """Budgets from a TOML or JSON file (``[tool.vlora]`` in a pyproject.toml, or top-level keys).

    Without a path, ``pyproject.toml`` in ``search_from`` is read if it has a ``[tool.vlora]`` table.
    """
    if path is None:
        candidate = (search_from or Path.cwd()) / "pyproject.toml"
        if not candidate.is_file():
            return Budgets()
        path, required = candidate, False
    else:
        path, required = Path(path), True
    if not path.is_file():
        raise VloraError(f"{path}: no such budget file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise VloraError(f"{path}: not a readable budget file ({e})") from None
    table = data.get("tool", {}).get("vlora") if "tool" in data else data
    if table is None:
        if required:
            raise VloraError(f"{path}: has no [tool.vlora] table")
        return Budgets()
    known = {f.name for f in fields(Budgets)}
    table = {k.replace("-", "_"): v for k, v in table.items()}
    unknown = sorted(set(table) - known)
    if unknown:
        raise VloraError(f"{path}: unknown budget {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if "max_bytes" in table:
        try:
            table["max_bytes"] = parse_size(table["max_bytes"], "max_bytes", bytes_only=True)[1]
        except VloraError as e:  # the file's field, named as the file writes it (not as the flag)
            raise VloraError(f"{path}: {str(e).replace('`', '')}") from None
    if table.get("baseline"):
        table["baseline"] = str((path.parent / table["baseline"]).resolve())
    return Budgets(**table)


def merge(base: Budgets, **overrides) -> Budgets:
    """Flags given on the command line win over the file."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def check(subject: str | Path, budgets: Budgets) -> Verdict:
    facts = read_facts(subject)
    rules = []
    if budgets.max_bytes is not None:
        rules.append(_le("file bytes", facts["file_bytes"], budgets.max_bytes))
    if budgets.max_size_ratio is not None:
        rules.append(_le("size ratio", facts["size_ratio"], budgets.max_size_ratio))
    if budgets.max_params is not None:
        rules.append(_le("parameters", facts["params"], budgets.max_params))
    if budgets.max_eval_drop is not None:
        if not facts["metrics"]:
            raise VloraError(f"{subject}: `max_eval_drop` needs a report with an evaluation (vlora-compress --eval)")
        limits = budgets.max_eval_drop
        for name, m in facts["metrics"].items():
            limit = limits.get(name) if isinstance(limits, dict) else limits
            if limit is not None:
                rules.append(_le(f"{name} drop vs original", m["drop"], limit))
        if isinstance(limits, dict) and set(limits) - set(facts["metrics"]):
            missing = sorted(set(limits) - set(facts["metrics"]))[0]
            raise VloraError(f"{subject}: the report's evaluation has no metric {missing!r}")
    if budgets.baseline is not None:
        base = read_facts(budgets.baseline)
        rules.append(_le("file bytes vs baseline", facts["file_bytes"], base["file_bytes"] * (1 + budgets.max_growth)))
        for name, m in base["metrics"].items():
            if name not in facts["metrics"]:
                raise VloraError(f"{subject}: has no {name} to compare with the baseline's")
            mine = facts["metrics"][name]
            worse = _worse(mine["model"], m["model"], m["higher_is_better"])
            rules.append(_le(f"{name} drop vs baseline", worse, budgets.max_drop))
    if budgets.max_drop_vs is not None:
        rules.append(_against_alternative(subject, facts, budgets.max_drop_vs, budgets.max_drop))
    healing = facts.get("healing")
    if budgets.min_heal_gain is not None:
        rules.append(_heal_gain(subject, healing, budgets.min_heal_gain))
    return Verdict(str(subject), rules, healing_line(healing) if healing else None)


def _heal_gain(subject, healing: dict | None, least: float) -> Rule:
    """Healing's relative gain on its own held-out metric, before to after; a rule that holds when
    it is at least ``least`` (its difference is the margin: positive is good, unlike the drops)."""
    if not healing or healing.get("before") is None or healing.get("after") is None:
        raise VloraError(f"{subject}: `min_heal_gain` needs a report of a healed file with its held-out scores "
                         "(vlora-compress --distill)")
    before, after = healing["before"], healing["after"]
    higher = healing.get("higher_is_better")
    if higher is None:  # reports written before the field
        higher = healing["metric"] not in ("perplexity", "kl_to_reference")
    gain = (after - before) / abs(before) if higher else (before - after) / abs(before)
    return Rule(f"healing gain on {healing['metric']} ({before:.4g} -> {after:.4g}), at least", gain, least, gain >= least - 1e-12)


ALTERNATIVE_ROWS = {"int8": "int8 alone", "int4": "int4 alone", "gptq": "int4 alone, GPTQ", "svd": "per-layer SVD",
                    "original": "original"}


def _against_alternative(subject, facts: dict, name: str, max_drop: float) -> Rule:
    """How much worse the file scores than a named alternative of its report (positive = worse)."""
    block = facts.get("alternatives")
    if not block:
        raise VloraError(f"{subject}: `max_drop_vs` needs a report with alternatives (vlora-compress --eval)")
    if name not in ALTERNATIVE_ROWS:
        raise VloraError(f"`max_drop_vs` must be one of {', '.join(ALTERNATIVE_ROWS)}, not {name!r}")
    rows = {r["name"]: r for r in block["rows"]}
    row = rows.get(ALTERNATIVE_ROWS[name])
    if row is None and name == "gptq":  # below 4 bits the GPTQ yardstick is at the file's bytes (int3 g64 alone, GPTQ)
        row = next((r for n, r in rows.items() if n.endswith(" alone, GPTQ")), None)
    if row is None:
        raise VloraError(f"{subject}: the report's alternatives have no {ALTERNATIVE_ROWS[name]!r} row")
    mine = rows["this file"]["value"]
    worse = _worse(mine, row["value"], block["higher_is_better"])
    return _le(f"{block['metric']} drop vs {row['name']} ({row['bytes']:,} bytes)", worse, max_drop)


def _worse(mine: float, theirs: float, higher_is_better: bool) -> float:
    """How much worse ``mine`` scores than ``theirs``: positive is worse."""
    return theirs - mine if higher_is_better else mine - theirs


def read_facts(path: str | Path) -> dict:
    """Sizes and eval metrics from a compress report (JSON) or a VLoRA file."""
    path = Path(path)
    if not path.exists():
        raise VloraError(f"{path}: no such file")
    if path.suffix == ".json":
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            facts = {"file_bytes": report["file_bytes"], "size_ratio": report["size_ratio"],
                     "params": report["compressed_params"]}
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise VloraError(f"{path}: not a vlora-compress report ({type(e).__name__}: {e})") from None
        metrics = {m["name"]: m for m in ((report.get("evaluation") or {}).get("metrics") or [])}
        return {**facts, "metrics": metrics, "alternatives": report.get("alternatives"), "healing": report.get("healing")}
    from ..report.inspection import inspect_vlora

    info = inspect_vlora(path)
    return {"file_bytes": path.stat().st_size, "size_ratio": info["size_ratio"], "params": info["params"],
            "metrics": {}}


def parse_eval_drop(text: str | None) -> float | dict[str, float] | None:
    """``0.02`` for every metric, or ``cosine_to_reference=0.02,perplexity=1.5`` per metric."""
    if text is None:
        return None
    try:
        if "=" not in text:
            return float(text)
        return {k.strip(): float(v) for k, v in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise VloraError(f"`max_eval_drop` must be a number or NAME=NUMBER[,NAME=NUMBER], not {text!r}") from None


def _le(name: str, value: float, budget: float) -> Rule:
    return Rule(name, float(value), float(budget), float(value) <= float(budget) + 1e-12)


def fmt_number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
