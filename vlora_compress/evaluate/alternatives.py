"""The obvious alternatives, measured beside the file on the same data, and a verdict read from them.

An evaluated compress report is not complete with the file's score alone: a language model cut to
0.8 of its parameters by low rank is larger *and* worse than the same model in plain int4, and the
user must read that in the report, not in a benchmark page. So every evaluated report carries rows
of (bytes, score) on the eval's data and metric:

- ``original``: the source, its tensor bytes and its score (the reference of the file's eval);
- ``int8 alone`` and ``int4 alone``: every matrix compress would factorise rounded to nearest
  (fit/integers.py, what ``vlora-compress SOURCE --method dense --quantize int8|int4`` writes and
  ``vlora-eval SOURCE --quantize`` scores), every other tensor as in the source;
- ``int4 alone, GPTQ`` (``compare`` ``gptq``, the default, when the file was calibrated): the same
  int4 storage with the integers chosen by GPTQ on the file's calibration (one more compress,
  ``--method dense --quantize int4``): the yardstick users at 4 bits compare with, far better
  than rounding to nearest on a language model (SmolLM2: perplexity ratio 1.11 against 1.55).
  A file whose stacks are smaller than int4's gets it at its own bytes instead (``yardstick``):
  the largest of int3 and int2, in groups of the eval's size, 64 or 32, that fits under them,
  GPTQ-rounded, with the same scheme rounded to nearest beside it (``int3 g64 alone``);
- ``per-layer SVD`` (asked for with ``compare`` ``svd``): whitened per-layer SVD with uniform ranks,
  sized to the file's bytes, with the file's calibration;
- ``this file``.

Bytes are tensor bytes, as ``size_ratio`` counts them. Each row costs one model load and one
evaluation (the reference is evaluated once); the rows state their seconds. The verdict says which
row is best at or under the file's bytes and, when an alternative dominates the file (no larger,
and better), the command that makes it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..compress import compress
from ..config import CompressConfig, flags
from ..io.checkpoint import open_checkpoint
from ..evaluate.scoring import EvalConfig, EvalReport, evaluate_models, quantize_stacks, task_head
from ..io.models import load_model, load_preprocessor, resolve_device
from ..plan import matrix_bytes
from ..report.compress_report import human_bytes
from ..io.stacks import find_stacks


@dataclass(frozen=True)
class Row:
    name: str
    bytes: int
    value: float
    seconds: float
    command: str | None = None  # what makes it (None: the source, or the file itself)


YARDSTICK_GROUPS = (64, 32)  # group sizes a sub-4-bit yardstick may take, beside the eval's own


def yardstick(families: list[dict], stack_bytes: int, group_size: int) -> tuple[str, int]:
    """(scheme, group size) of quantization alone to set beside a file whose stacks store
    ``stack_bytes``: int4 in groups of ``group_size`` (the 4-bit yardstick) unless the file is
    smaller than that, then the largest int3 or int2 storage, in groups of ``group_size``, 64 or
    32, that fits under the file's bytes (the smallest there is when none does). ``families`` are
    the report's, with their ``shape`` and ``layers``."""
    def cost(scheme: str, group: int) -> int:
        return sum(matrix_bytes(tuple(f["shape"]), f["dtype"], scheme, group) * len(f["layers"]) for f in families)

    if cost("int4", group_size) <= stack_bytes:
        return "int4", group_size
    options = sorted({(cost(s, g), s, g) for s in ("int4", "int3", "int2") for g in (group_size, *YARDSTICK_GROUPS)})
    fitting = [o for o in options if o[0] <= stack_bytes]
    _, scheme, group = fitting[-1] if fitting else options[0]
    return scheme, group


def scheme_label(scheme: str, group: int, group_size: int) -> str:
    """``int4`` for the eval's own group size (and int8), ``int3 g64`` otherwise: a row's name."""
    return scheme if scheme == "int8" or group == group_size else f"{scheme} g{group}"


def alternatives(out: Path, source: Path, config_dir: Path, data, eval_config: EvalConfig, original_bytes: int,
                 file_bytes: int, svd_file=None, progress: bool = False, gptq_file=None,
                 gptq_scheme: tuple[str, int] | None = None) -> tuple[EvalReport, dict]:
    """(the file's EvalReport, the ``alternatives`` block) on ``data``.

    ``source`` is the original checkpoint (a folder or file; ``config_dir`` its folder);
    ``svd_file(bytes)``, when ``svd`` is compared, writes the per-layer SVD file of that size and
    returns (its path, its command, its tensor bytes); ``gptq_file()``, when ``gptq`` is compared
    (None: not calibrated), likewise the GPTQ file, in ``gptq_scheme`` (scheme, group size; int4
    in the eval's groups when not given), scored beside that scheme rounded to nearest. Each is
    removed once scored."""
    device = resolve_device(eval_config.device)
    preprocessor = load_preprocessor(config_dir)
    kind = task_head(eval_config.task)
    bare = None if Path(source).is_dir() else config_dir
    memo: dict = {}
    started = time.perf_counter()
    reference = load_model(source, bare, kind).to(device)

    def score(model) -> tuple[int, list]:
        return evaluate_models([model, reference], preprocessor, data, eval_config, progress, memo)

    score(reference)  # once: every row below reads its outputs from the memo
    original_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model = load_model(out, config_dir, kind).to(device)
    samples, metrics = score(model)
    del model
    file_report = EvalReport(eval_config.task, str(data), str(out), str(source), samples, metrics)
    headline = metrics[0]
    rows = [Row("original", original_bytes, headline.reference, original_seconds),
            Row("this file", file_bytes, headline.model, time.perf_counter() - started)]
    with open_checkpoint(source) as ckpt:
        stack_bytes = sum(fam.nbytes for s in find_stacks(ckpt.infos) for fam in s.families)
    g = eval_config.group_size
    gptq_scheme = gptq_scheme or ("int4", g)
    nearest = [(c, g) for c in eval_config.compare if c in ("int8", "int4")]
    if "gptq" in eval_config.compare and gptq_file is not None and gptq_scheme not in nearest:
        nearest.append(gptq_scheme)  # the GPTQ yardstick's own scheme, rounded to nearest, beside it
    for scheme, group in nearest:
        rows.append(_nearest_row(source, bare, kind, device, score, scheme, group, g, original_bytes - stack_bytes))
    made = [("gptq", f"{scheme_label(*gptq_scheme, g)} alone, GPTQ", gptq_file),
            ("svd", "per-layer SVD", svd_file and (lambda: svd_file(file_bytes)))]
    rows += [made_row(name, make, config_dir, kind, device, score) for key, name, make in made
             if key in eval_config.compare and make is not None]  # asked for, and calibrated where it must be
    return file_report, block(rows, headline.name, headline.higher_is_better)


def _nearest_row(source, bare, kind: str, device, score, scheme: str, group: int, eval_group: int,
                 rest_bytes: int) -> Row:
    """The original with its stacks rounded to nearest in ``scheme``, scored."""
    started = time.perf_counter()
    model = load_model(source, bare, kind).to(device)
    stored = quantize_stacks(model, Path(source), scheme, group)  # the stacks' bytes so stored
    _, m = score(model)
    del model
    made = CompressConfig(method="dense", quantize=scheme, group_size=group, rounding="nearest")  # what writes it
    shown = ("method", "quantize") + (("group_size",) if scheme != "int8" else ()) + ("rounding",)
    return Row(f"{scheme_label(scheme, group, eval_group)} alone", rest_bytes + stored, m[0].model,
               time.perf_counter() - started, f"vlora-compress {source} {flags(made, shown)}")


def made_row(name: str, make, config_dir, kind: str, device, score) -> Row:
    """An alternative made by one more compress (``make()``: its path, command and bytes), scored and
    removed."""
    started = time.perf_counter()
    path, command, nbytes = make()
    try:
        model = load_model(path, config_dir, kind).to(device)
        _, m = score(model)
        del model
    finally:
        Path(path).unlink(missing_ok=True)
    return Row(name, nbytes, m[0].model, time.perf_counter() - started, command)


def block(rows: list[Row], metric: str, higher_is_better: bool) -> dict:
    """The rows, ordered by bytes, with the verdict read from them."""
    rows = sorted(rows, key=lambda r: (r.bytes, r.name != "this file"))
    mine = next(r for r in rows if r.name == "this file")
    return {"metric": metric, "higher_is_better": higher_is_better, "rows": [asdict(r) for r in rows],
            "noise": noise(metric, mine.value), "within_noise": [r.name for r in within_noise(rows, metric)],
            "verdict": verdict(rows, metric, higher_is_better)}


RELATIVE_NOISE = {"perplexity": 0.01, "kl_to_reference": 0.01}  # a share of the file's own value
ABSOLUTE_NOISE = 0.002  # every other score (cosine, agreement, accuracy, rank correlation: at most 1)


def noise(metric: str, value: float) -> float:
    """How much better than ``value`` an alternative must score to count as better, not noise: 1% of
    a perplexity or KL, 0.002 of a score in [0, 1] (the margins issue 38's targets are read within)."""
    share = RELATIVE_NOISE.get(metric)
    return abs(value) * share if share is not None else ABSOLUTE_NOISE


def within_noise(rows: list[Row], metric: str) -> list[Row]:
    """The alternatives no larger than the file that score within ``noise`` of it."""
    mine = next(r for r in rows if r.name == "this file")
    margin = noise(metric, mine.value)
    return [r for r in rows if r is not mine and r.name != "original" and r.bytes <= mine.bytes
            and abs(r.value - mine.value) <= margin]


def verdict(rows: list[Row], metric: str, higher_is_better: bool) -> str:
    """One line from the measurements only: an alternative that dominates the file (no larger, and
    better by more than ``noise``) and how to make it, or else that the file is the best row at or
    under its bytes, naming those within noise of it."""
    mine = next(r for r in rows if r.name == "this file")
    margin = noise(metric, mine.value)
    better = (lambda a, b: a > b + margin) if higher_is_better else (lambda a, b: a < b - margin)
    dominating = [r for r in rows if r is not mine and r.bytes <= mine.bytes and better(r.value, mine.value)]
    if dominating:
        best = max(dominating, key=lambda r: r.value if higher_is_better else -r.value)
        how = f"; `{best.command}` makes it" if best.command else ""
        return (f"{best.name} is smaller ({human_bytes(best.bytes)} against {human_bytes(mine.bytes)}) and better "
                f"({metric} {best.value:.4g} against {mine.value:.4g}) than this file: use it{how}.")
    shown = lambda rs: ", ".join(f"{r.name} ({human_bytes(r.bytes)}, {r.value:.4g})" for r in rs)  # noqa: E731
    larger_better = [r for r in rows if r is not mine and better(r.value, mine.value)]
    level = within_noise(rows, metric)
    tail = f" Better, but larger: {shown(larger_better)}." if larger_better else ""
    tail += f" As good within noise ({metric} ±{margin:.2g}): {shown(level)}." if level else ""
    return f"This file is the best of these at or under its size ({human_bytes(mine.bytes)}, {metric} {mine.value:.4g}).{tail}"


def svd_alternative(source, out: Path, config: CompressConfig, calib, config_dir, tokenizer, nbytes: int):
    """(path, command, tensor bytes) of whitened per-layer SVD with uniform ranks at ``nbytes`` of
    tensors, calibrated as the file was: the report's ``per-layer SVD`` row."""
    quantize = "none" if config.quantize == "auto" else config.quantize
    svd_config = replace(config, method="svd", ranks="uniform", base="auto", chunks=None, align=False,
                         target_size=f"{nbytes}B", target_of="model", target_bits=None, quantize=quantize)
    shown = ("method", "ranks", "target_size") + (("quantize",) if quantize != "none" else ())
    return _alternative_file(source, out, "svd", svd_config, calib, config_dir, tokenizer, shown)


def gptq_alternative(source, out: Path, config: CompressConfig, calib, config_dir, tokenizer, scheme: str,
                      group_size: int, reuse=None):
    """(path, command, tensor bytes) of quantization alone in ``scheme`` with GPTQ rounding on the
    file's calibration: the report's ``int4 alone, GPTQ`` row (alternatives.yardstick). ``reuse``:
    compress's, a calibration made for others too (sweep.py)."""
    gptq_config = replace(config, method="dense", quantize=scheme, group_size=group_size, rounding="gptq",
                          target_size=None, target_bits=None, base="auto", chunks=None, align=False, ranks="uniform",
                          quantize_passthrough=False, base_quantize=None)
    shown = ("method", "quantize", "group_size")
    return _alternative_file(source, out, "gptq", gptq_config, calib, config_dir, tokenizer, shown, reuse)


def _alternative_file(source, out: Path, name: str, config: CompressConfig, calib, config_dir, tokenizer,
                      shown: tuple[str, ...], reuse=None):
    """(path, command, tensor bytes) of one more compress of ``source`` beside ``out``, calibrated
    as the file was: an alternatives row that is made, not read from the source. Its command gives
    the fields ``shown`` their values in ``config`` (config.flags, from the fields' own flags)."""
    path = out.with_name(out.name + f".{name}-alternative")
    report = compress(source, path, config, calib=calib, config_dir=config_dir, tokenizer=tokenizer, force=True,
                      reuse=reuse)
    command = (f"vlora-compress {source} {flags(config, shown)}"
               + (f" --calib {calib}" if calib is not None and not isinstance(calib, (list, tuple)) else ""))
    return path, command, report.compressed_bytes
