"""The size–quality curve in one command: a file planned, written and scored at every point of a
sweep, beside quantization alone (GPTQ) at 8, 4, 3 and 2 bits, on one calibration.

``sweep`` compresses the source once per point (``--sweep 16,8,4,3,2.5,2``: bits a weight over the
stacks; or sizes, ``0.5,0.35`` of ``--target-of``, ``40MB``), each with the default plan over every
form and storage (planning/space.default_storage), all on one calibration (pipelines.registry.Reuse:
the original model, its samples, Grams and the meter's reference, made once and counted), and with
GPTQ's integers for a layer made once across points (fit/integers.rounding_memo). With evaluation
data it scores every file and every yardstick against the original on it, once each, and gives
each point its report with the alternatives and the verdict read from them, one table, and the
tradeoff plot (report/plots.plot_tradeoff) where matplotlib is installed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .compress import compress, default_output
from .config import CompressConfig, parse_size
from .errors import VloraError
from .evaluate.alternatives import Row, block, gptq_alternative, made_row, scheme_label
from .evaluate.scoring import EvalConfig, EvalReport, default_task, evaluate_models, task_head
from .fit.integers import rounding_memo
from .io.models import config_folder, load_model, load_preprocessor, resolve_device
from .pipelines.registry import Reuse
from .report.compress_report import CompressReport, human_bytes, write_report

YARDSTICKS = ("int8", "int4", "int3", "int2")  # quantization alone with GPTQ, drawn beside the curve


def parse_points(text: str) -> list[dict]:
    """``--sweep`` as targets, largest first: a number above 1 is bits a weight over the stacks
    (``target_bits``), one in (0, 1] a share of ``--target-of``, a size with a unit bytes
    (``target_size``). Anything else, or the same point twice, is one line naming the value."""
    points = []
    for part in str(text).split(","):
        item = part.strip()
        try:
            bits = float(item)
        except ValueError:
            bits = None
        if bits is not None and bits > 1:
            if not bits <= 64:
                raise VloraError(f"`sweep` takes bits a weight up to 64, not {item!r}")
            points.append({"target_bits": bits, "target_size": None})
            continue
        try:
            parse_size(item, "sweep")
        except VloraError:
            raise VloraError(f"`sweep` must be a list such as 16,8,4,3,2.5,2 (bits a weight) or 0.5,0.35 or "
                             f"40MB,20MB (sizes), not {item!r} in {text!r}") from None
        points.append({"target_bits": None, "target_size": item})
    labels = [point_label(p) for p in points]
    if len(set(labels)) != len(labels):
        raise VloraError(f"`sweep` names a point twice: {text!r}")
    return points


def point_label(point: dict) -> str:
    """``2.5bits``, ``0.5``, ``40MB``: a point in file names and tables."""
    return f"{point['target_bits']:g}bits" if point["target_bits"] is not None else str(point["target_size"])


@dataclass
class SweepReport:
    source: str
    metric: str | None
    higher_is_better: bool | None
    points: list[dict]  # per point: its target, file, bytes, size ratio, bits a weight, score, seconds, verdict
    yardsticks: list[dict]  # Row dicts: the original and quantization alone, scored once
    calibrations: int  # calibrations made for the whole sweep (Reuse.calibrations)
    seconds: float
    plot: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> Table:
        title = f"the size-quality curve: {self.metric} on the eval data" if self.metric else "the sweep"
        table = Table(title=title)
        for col in ("point", "stored as", "bytes", "size ratio", "bits a weight", self.metric or "score", "seconds",
                    "best at or under its bytes"):
            table.add_column(col, justify="left" if col in ("point", "stored as", "best at or under its bytes") else "right")
        for p in self.points:
            table.add_row(p["point"], p["storage"], human_bytes(p["bytes"]), f"{p['size_ratio']:.3f}",
                          f"{p['stack_bits']:.2f}", _value(p["value"]), f"{p['seconds']:.0f}", p["best"] or "-")
        for r in self.yardsticks:
            table.add_row("-", r["name"], human_bytes(r["bytes"]), f"{r['size_ratio']:.3f}",
                          "-" if r["stack_bits"] is None else f"{r['stack_bits']:.2f}", _value(r["value"]),
                          f"{r['seconds']:.0f}", "")
        return table

    def render(self, console: Console) -> None:
        console.print(self.table())
        console.print(f"{len(self.points)} points on {self.calibrations} calibration(s) in {self.seconds:.0f} s"
                      + (f"; plot: {self.plot}" if self.plot else ""))
        for note in self.notes:
            console.print(f"note: {note}")

    def to_markdown(self) -> str:
        cols = ["point", "stored as", "bytes", "size ratio", "bits a weight", self.metric or "score", "seconds",
                "best at or under its bytes"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for p in self.points:
            lines.append(f"| {p['point']} | {p['storage']} | {human_bytes(p['bytes'])} | {p['size_ratio']:.3f} | "
                         f"{p['stack_bits']:.2f} | {_value(p['value'])} | {p['seconds']:.0f} | {p['best'] or '-'} |")
        for r in self.yardsticks:
            bits = "-" if r["stack_bits"] is None else f"{r['stack_bits']:.2f}"
            lines.append(f"| - | {r['name']} | {human_bytes(r['bytes'])} | {r['size_ratio']:.3f} | {bits} | "
                         f"{_value(r['value'])} | {r['seconds']:.0f} | |")
        return "\n".join(lines) + "\n"


def _value(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def sweep(source: str | Path, out_dir: str | Path | None, points: str | list[dict], config: CompressConfig | None = None,
          *, calib, eval_data=None, eval_config: EvalConfig | None = None, config_dir=None, force: bool = False,
          progress: bool = False, plot: bool = True, **options) -> SweepReport:
    """Compress ``source`` at every point of ``points`` (``parse_points``) into ``out_dir`` (default
    ``<source>.sweep``), on one calibration, and with ``eval_data`` score every file and the GPTQ
    yardsticks (int8, int4, int3 and int2 alone, in ``group_size`` groups) against the original.
    Writes ``sweep.json``, ``sweep.md``, each point's report (``<point>.report.json``) and
    ``tradeoff.png`` (with the plot extra)."""
    started = time.perf_counter()
    points = parse_points(points) if isinstance(points, str) else points
    config = replace(config or CompressConfig(), **options)
    if calib is None:
        raise VloraError("`sweep` plans every point by measurement: it needs calibration data (--calib)")
    if isinstance(source, torch.nn.Module):
        raise VloraError("`sweep` takes a checkpoint path, not a model in memory")
    out_dir = Path(out_dir) if out_dir is not None else Path(str(default_output(Path(source))).replace(
        ".vlora.safetensors", ".sweep"))
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise VloraError(f"{out_dir}: exists and is not empty; use --force to write the sweep into it")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = default_output(Path(source)).name.replace(".vlora.safetensors", "")
    reuse = Reuse()
    reports: list[CompressReport] = []
    with rounding_memo():  # one GPTQ rounding per layer and scheme across points
        for point in points:
            cfg = replace(config, **point)
            out = out_dir / f"{stem}.{point_label(point)}.vlora.safetensors"
            reports.append(compress(source, out, cfg, calib=calib, config_dir=config_dir, force=True, progress=progress,
                                    reuse=reuse))
    folder = config_folder(config_dir or source)
    yard: list[Row] = []
    if eval_data is not None:
        cfg_eval = eval_config or EvalConfig(task=default_task(folder), device=config.device)
        scored, yard, metric, higher = _score(source, folder, config_dir, out_dir, reports, config, calib, eval_data,
                                              cfg_eval, progress, reuse)
    else:
        scored, metric, higher = [None] * len(reports), None, None
    rows, yardsticks = _rows(out_dir, stem, points, reports, scored, yard, metric, higher)
    result = SweepReport(str(source), metric, higher, rows, yardsticks, reuse.calibrations,
                         time.perf_counter() - started)
    if plot and eval_data is not None:
        result.plot, note = _plot(out_dir, [r["report"] for r in rows], metric)
        result.notes += [note] if note else []
    write_report(out_dir / "sweep.json", result.to_dict(), result.to_markdown())
    write_report(out_dir / "sweep.md", result.to_dict(), result.to_markdown())
    return result


def _rows(out_dir: Path, stem: str, points: list[dict], reports: list[CompressReport], scored, yard: list[Row],
          metric, higher) -> tuple[list[dict], list[dict]]:
    """(a row per point, its report written with its alternatives and verdict; the yardsticks' rows)."""
    original = next((r.bytes for r in yard if r.name == "original"), reports[0].original_bytes)
    weights = _stack_weights(reports[0])
    rows = []
    for point, report, scored_row in zip(points, reports, scored):
        verdict_block = file_row = None
        if scored_row is not None:
            file_row, evaluation = scored_row
            verdict_block = block([file_row] + yard, metric, higher)
            report = replace(report, alternatives=verdict_block, evaluation=evaluation)
        path = out_dir / f"{stem}.{point_label(point)}.report.json"
        write_report(path, report.to_dict(), report.to_markdown())
        rows.append({"point": point_label(point), **point, "output": report.output, "storage": _storage(report),
                     "bytes": report.compressed_bytes, "size_ratio": report.compressed_bytes / original,
                     "stack_bits": 8 * report.stack_compressed_bytes / weights,
                     "value": file_row.value if file_row is not None else None, "seconds": report.seconds,
                     "best": _best(verdict_block) if verdict_block else None,
                     "verdict": verdict_block["verdict"] if verdict_block else None, "report": str(path)})
    rest = original - reports[0].stack_original_bytes  # what is not a stack: stored as it is
    yardsticks = [{**asdict(r), "size_ratio": r.bytes / original,
                   "stack_bits": None if r.name == "original" else 8 * (r.bytes - rest) / weights} for r in yard]
    return rows, yardsticks


def _score(source, folder: Path, config_dir, out_dir: Path, reports: list[CompressReport], config: CompressConfig,
           calib, eval_data, eval_config: EvalConfig, progress: bool, reuse: Reuse):
    """(a Row per point, the yardstick rows with the original's, metric, higher is better): the
    reference scored once, then every file and every yardstick (made on the sweep's calibration
    and removed once scored) against it."""
    device = resolve_device(eval_config.device)
    preprocessor = load_preprocessor(folder)
    kind = task_head(eval_config.task)
    bare = None if Path(source).is_dir() else config_dir
    memo: dict = {}
    reference = load_model(source, bare, kind).to(device)

    def score_model(model) -> tuple[int, list]:
        return evaluate_models([model, reference], preprocessor, eval_data, eval_config, progress, memo)

    def score(path: Path | None):
        started = time.perf_counter()
        samples, metrics = score_model(reference if path is None else load_model(path, config_dir or folder, kind).to(device))
        return metrics[0], time.perf_counter() - started, samples

    head, seconds, _ = score(None)
    scores = [score(Path(r.output)) for r in reports]
    rows = [(Row("this file", r.compressed_bytes, m.model, r.seconds),
             EvalReport(eval_config.task, str(eval_data), r.output, str(folder), n, [m]).to_dict())
            for r, (m, _, n) in zip(reports, scores)]
    yard = [Row("original", reports[0].original_bytes, head.reference, seconds)]
    group = config.group_size
    for scheme in YARDSTICKS:  # each made on the sweep's calibration, scored and removed
        make = lambda scheme=scheme: gptq_alternative(source, out_dir / "yardstick.vlora.safetensors", config,  # noqa: E731
                                                      calib, config_dir, None, scheme, group, reuse=reuse)
        yard.append(made_row(f"{scheme_label(scheme, group, group)} alone, GPTQ", make, config_dir or folder, kind,
                             device, score_model))
    return rows, yard, head.name, head.higher_is_better


def _storage(report: CompressReport) -> str:
    """What the families came out as, e.g. ``int8 x6``: each family's storage, counted."""
    kinds = Counter(f["storage"] for f in report.families)
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common())


def _best(verdict_block: dict) -> str:
    """The best row at or under the file's bytes, by name (``this file`` where the file is)."""
    rows = verdict_block["rows"]
    mine = next(r for r in rows if r["name"] == "this file")
    sign = 1 if verdict_block["higher_is_better"] else -1
    under = [r for r in rows if r["bytes"] <= mine["bytes"]]
    return max(under, key=lambda r: (sign * r["value"], r["name"] == "this file"))["name"]


def _stack_weights(report: CompressReport) -> int:
    return sum(f["shape"][0] * f["shape"][1] * len(f["layers"]) for f in report.families)


def _plot(out_dir: Path, reports: list[str], metric: str | None) -> tuple[str | None, str | None]:
    """(the tradeoff plot's path, or None and why): it needs matplotlib (the plot extra)."""
    from .report import plots

    try:
        path = plots.plot_tradeoff([json.loads(Path(r).read_text()) for r in reports], out_dir / "tradeoff.png", metric)
    except VloraError as e:
        return None, f"no plot: {e}"
    return str(path), None
