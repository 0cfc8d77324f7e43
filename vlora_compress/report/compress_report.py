"""Reports: plain data that serialises to JSON, and rich tables for people.

Every figure is reported as measured. A tensor that came back badly shows its error; nothing is
averaged away without the maximum beside it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..io.checkpoint import ITEMSIZE
from ..forms.stored import family_bytes
from ..fit.integers import SCALE_SUFFIX
from ..export.base import EXPORTERS, formats_holding


METHOD_TITLES = {"vlora": "VLoRA", "svd": "per-layer SVD", "dense": "dense (quantization alone)"}


@dataclass(frozen=True)
class CompressReport:
    source: str
    output: str
    method: str
    rank: int | None  # None: chosen per family (--quantize auto under --target-size)
    chunks: int | None
    svd: str
    store_dtype: str | None
    original_bytes: int  # tensor data of the source
    compressed_bytes: int  # tensor data of the VLoRA file
    size_ratio: float  # compressed_bytes / original_bytes
    file_bytes: int  # the VLoRA file on disk, header included
    original_params: int
    compressed_params: int
    stack_original_bytes: int  # the factorised families only
    stack_compressed_bytes: int
    stack_size_ratio: float
    seconds: float
    stacks: list[dict]
    families: list[dict]
    tensors: list[dict]
    notes: list[str]
    target: dict | None = None  # the size budget, when the rank was chosen from one
    calibration: dict | None = None  # what whitened the fit, when calibrated
    evaluation: dict | None = None  # vlora-eval's report on the result, when asked for
    healing: dict | None = None  # the distillation run, when --distill healed the file
    passthrough: dict | None = None  # pass-through tensors stored quantized: count, scheme, bytes
    alternatives: dict | None = None  # with the evaluation: the obvious alternatives' bytes and scores,
    # and a verdict (evaluate/alternatives.py)
    quantize: str = "none"  # what was asked for: none | int8 | int4 | auto (families say what was chosen)
    decisions: list[dict] = field(default_factory=list)  # the planner's, per family: every candidate
    # it weighed, its bytes, estimated and measured error (plan.Decision), rendered by decision_line

    @classmethod
    def build(cls, *, output, source_path, source, entries, plan, config, fits, file_bytes, seconds,
              target=None, calibration=None) -> "CompressReport":
        """``source`` is the SourceInfo record and ``entries`` the stored layout, as written."""
        original_bytes = sum(nbytes(dt, shape) for _, dt, shape in source.tensors)
        compressed_bytes = sum(nbytes(dt, shape) for _, dt, shape in entries)
        fit_by_key = {f.key: f for f in fits}
        families = [family_summary(fp, [fit_by_key[fp.key(layer)] for layer in fp.layers]) for fp in plan.families]
        stack_orig = sum(f["original_bytes"] for f in families)
        stack_comp = sum(f["compressed_bytes"] for f in families)
        return cls(
            source=str(source_path),
            output=str(output),
            method=config.method,
            rank=None if target and target.get("rank") is None else config.rank,
            chunks=config.chunks,
            svd=config.svd,
            store_dtype=config.dtype,
            original_bytes=original_bytes,
            compressed_bytes=compressed_bytes,
            size_ratio=compressed_bytes / original_bytes,
            file_bytes=file_bytes,
            original_params=sum(_prod(shape) for _, _, shape in source.tensors),
            compressed_params=sum(_prod(shape) for _, _, shape in entries),
            stack_original_bytes=stack_orig,
            stack_compressed_bytes=stack_comp,
            stack_size_ratio=stack_comp / stack_orig if stack_orig else 1.0,
            seconds=seconds,
            stacks=[{"prefix": s.prefix, "layers": list(s.layers),
                     "chunks": [[s.layers[a], s.layers[b - 1]] for a, b in s.bounds],
                     "families": [fp.suffix for fp in plan.families if fp.stack == s.prefix]} for s in plan.stacks],
            families=families,
            tensors=[asdict(f) for f in fits],
            notes=list(plan.notes),
            target=target,
            calibration=calibration,
            passthrough=_passthrough_summary(plan, source, entries),
            quantize=config.quantize,
            decisions=[d.to_dict() for d in plan.decisions],
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        title = METHOD_TITLES.get(self.method, self.method)
        lines = [f"### {title}: `{Path(self.source).name}` → `{Path(self.output).name}`", "",
                 "| | |", "|---|---:|",
                 f"| original | {human_bytes(self.original_bytes)} ({self.original_params:,} params) |",
                 f"| compressed | {human_bytes(self.compressed_bytes)} ({self.compressed_params:,} params) |",
                 f"| size ratio | {self.size_ratio:.3f} |",
                 f"| layer stacks | {human_bytes(self.stack_original_bytes)} → "
                 f"{human_bytes(self.stack_compressed_bytes)} ({self.stack_size_ratio:.3f}) |"]
        if self.calibration:
            packed = self.calibration.get("packing")
            lines.append(f"| calibration | {self.calibration['samples']} samples"
                         f"{f' ({packed})' if packed else ''}, {self.calibration['tokens']:,} tokens |")
        if self.quantize != "none":
            lines.append(f"| quantize | {storage_summary(self.quantize, self.families)} |")
        if self.passthrough:
            lines.append(f"| pass-through quantized | {passthrough_line(self.passthrough)} |")
        lines += ["", "| family | shape | bases | ranks | storage | stored | weight err mean/max | output err mean/max "
                  "| exports |", "|---|---|---|---|---|---:|---:|---:|---|"]
        for f in self.families:
            out = (f"{f['mean_out_error']:.3f}/{f['max_out_error']:.3f}" if f["mean_out_error"] is not None else "-")
            lines.append(f"| {f['family']} | {'x'.join(map(str, f['shape']))} | {','.join(map(str, f['bases']))} | "
                         f"{','.join(map(str, f['ranks'])) or '-'} | {f['storage']} | {human_bytes(f['compressed_bytes'])} | "
                         f"{f['mean_rel_error']:.3f}/{f['max_rel_error']:.3f} | {out} | {standard_exports(f)} |")
        if self.healing:
            lines.append(f"| healing | {healing_line(self.healing)} |")
        lines += ["", RUNS_AT_SIZE]
        if self.evaluation:
            from ..evaluate.scoring import markdown_eval

            lines += ["", markdown_eval(self.evaluation)]
        if self.alternatives:
            lines += [markdown_alternatives(self.alternatives)]
        if self.decisions or self.notes:
            lines += ["", *[f"- {decision_line(d)}" for d in self.decisions], *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"

    def render(self, console: Console) -> None:
        title = METHOD_TITLES.get(self.method, self.method)
        summary = Table(title=f"{title}: {Path(self.source).name} -> {Path(self.output).name}", show_header=False)
        summary.add_column(style="bold")
        summary.add_column(justify="right")
        rank = "per family" if self.rank is None else str(self.rank)
        if self.method != "dense":
            summary.add_row("rank / chunks" if self.method == "vlora" else "rank",
                            f"{rank} / {self.chunks or 'auto'}" if self.method == "vlora" else rank)
        if self.quantize != "none":
            summary.add_row("quantize", storage_summary(self.quantize, self.families))
        if self.target:
            summary.add_row("target", f"{self.target['size']} of the {self.target['of']} = "
                                      f"{human_bytes(self.target['budget_bytes'])}")
        summary.add_row("original", f"{human_bytes(self.original_bytes)} ({self.original_params:,} params)")
        summary.add_row("compressed", f"{human_bytes(self.compressed_bytes)} ({self.compressed_params:,} params)")
        summary.add_row("size ratio", f"{self.size_ratio:.3f}")
        summary.add_row(
            "layer stacks",
            f"{human_bytes(self.stack_original_bytes)} -> {human_bytes(self.stack_compressed_bytes)}"
            f" ({self.stack_size_ratio:.3f})",
        )
        if self.passthrough:
            summary.add_row("pass-through quantized", passthrough_line(self.passthrough))
        if self.calibration:
            c = self.calibration
            summary.add_row("calibration", f"{c['samples']} samples, {c['tokens']:,} tokens, "
                                           f"{c['whitened_layers']} layers whitened")
        if self.healing:
            h = self.healing
            summary.add_row("healing", healing_line(h))
        summary.add_row("time", f"{self.seconds:.1f} s")
        console.print(summary)
        whitened = self.calibration is not None
        fams = Table(title="Error per family: weight ||W - Ŵ||/||W||" + ("; output ||(W - Ŵ)S||/||WS||" if whitened else ""))
        many = len(self.stacks) > 1
        cols = (["stack"] if many else []) + ["family", "shape", "rank", "storage", "stored", "weight mean/max"]
        cols += (["output mean/max"] if whitened else []) + ["exports"]
        for col in cols:
            fams.add_column(col, justify="left" if col in ("stack", "family") else "right", overflow="fold")
        for f in self.families:
            out = f"{f['mean_out_error']:.3f}/{f['max_out_error']:.3f}" if f["mean_out_error"] is not None else "-"
            fams.add_row(
                *([f["stack"]] if many else []), f["suffix"], "x".join(map(str, f["shape"])),
                ",".join(map(str, f["ranks"])) or "-", f["storage"], human_bytes(f["compressed_bytes"]),
                f"{f['mean_rel_error']:.3f}/{f['max_rel_error']:.3f}", *([out] if whitened else []),
                standard_exports(f),
            )
        console.print(fams)
        console.print(RUNS_AT_SIZE)
        if self.evaluation:
            from ..evaluate.scoring import render_eval

            render_eval(self.evaluation, console)
        if self.alternatives:
            render_alternatives(self.alternatives, console)
        for d in self.decisions:
            console.print(f"[cyan]chosen:[/] {decision_line(d)}")
        for note in self.notes:
            console.print(f"[yellow]note:[/] {note}")


MEASURED_BY = {"logits": "the model's held-back next-token KL from the original",
               "embedding": "the model's held-back embedding error (1 - cosine)",
               "model": "the model's held-back hidden-state error", "block": "the block's held-back output error",
               "outputs": "the family's whitened output error", "weights": "the family's weight error"}


def family_summary(fp, layer_fits) -> dict:
    """A family's line of the report: what it stores, its bytes, and its layers' fitted errors."""
    errs = [f.rel_error for f in layer_fits]
    out_errs = [f.out_error for f in layer_fits if f.out_error is not None]
    return {
        **fp.summary(),
        "layers": list(fp.layers),
        "chunks": [list(c.layers) for c in fp.chunks],  # interleaved where shared groups are
        "bases": [c.base for c in fp.chunks],
        "topologies": [c.topology for c in fp.chunks],
        "ranks": sorted({f.rank for f in layer_fits if f.role == "increment"}),
        "storage": (storage_label(fp.quant, fp.group_size, fp.store_dtype) if fp.base_quant is None else
                    f"{storage_label(fp.base_quant, fp.group_size, fp.store_dtype)} bases, "
                    f"{storage_label(fp.quant, fp.group_size, fp.store_dtype)} factors"),
        "original_bytes": nbytes(fp.dtype, fp.shape) * len(fp.layers),
        "compressed_bytes": family_bytes(fp),
        # where it runs at its size: the packed runtime holds it as stored; these formats hold it exactly
        "runtime_bytes": family_bytes(fp),
        "exports": formats_holding(fp),
        "mean_rel_error": sum(errs) / len(errs),
        "max_rel_error": max(errs),
        "mean_out_error": sum(out_errs) / len(out_errs) if out_errs else None,
        "max_out_error": max(out_errs) if out_errs else None,
    }


RUNS_AT_SIZE = ("exports: the standard formats vlora-export writes the family to exactly; every family runs at "
                "its stored bytes in the packed runtime (vlora-eval --runtime packed) and exports as transformers-remote")


def standard_exports(f: dict) -> str:
    """A family's standard export formats, or "-" (transformers-remote holds every family)."""
    return ", ".join(e for e in f.get("exports", []) if EXPORTERS[e].standard) or "-"


def decision_line(d: dict) -> str:
    """A planner's decision (plan.Decision as a dict) in one line: what the family took, at what rank
    and measured error, every other candidate measured, those fitted but not measured (by the family's
    own error), and those only estimated from singular values."""
    taken = d["candidates"][d["chosen"]]
    rank = f" at rank {taken['rank']}" if taken["rank"] else ""
    line = (f"{d['scope'] + ': ' if d.get('scope') else ''}{d['family']}: {taken['label']}{rank}, "
            f"error {short_number(taken['error'])}")
    others = [c for i, c in enumerate(d["candidates"]) if i != d["chosen"] and c["error"] is not None]
    fitted = sorted((c for c in d["candidates"] if c["error"] is None and c.get("fitted") is not None),
                    key=lambda c: c["fitted"])
    out = sorted((c for c in d["candidates"] if c["error"] is None and c.get("fitted") is None),
                 key=lambda c: math.inf if c["estimate"] is None else c["estimate"])
    if others:
        line += " (also tried: " + "; ".join(f"{c['label']} {short_number(c['error'])}" for c in others) + ")"
    if fitted:
        line += (" (fitted, not measured, by the family's own output error: "
                 + "; ".join(f"{c['label']} {short_number(c['fitted'])}" for c in fitted) + ")")
    if out:
        line += (" (not fitted, by the estimate from singular values: "
                 + "; ".join(f"{c['label']} {short_number(c['estimate'])}" for c in out) + ")")
    if d.get("allocated"):
        a = d["allocated"]
        line += f"; stored after rank allocation as {a['label']}" + (f" at rank {a['rank']}" if a["rank"] else "")
    return line


def short_number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def storage_label(quant: str, group_size: int, store_dtype: str) -> str:
    """``int4/g128``, ``int8`` or the float dtype, e.g. ``F32``."""
    return {"none": store_dtype, "int8": "int8"}.get(quant, f"{quant}/g{group_size}")


def storage_summary(asked: str, families: list[dict]) -> str:
    """What was asked and what the families got, e.g. ``auto: int4/g128 x4, int8 x2``."""
    counts = Counter(f["storage"] for f in families)
    return f"{asked}: " + ", ".join(f"{k} x{n}" for k, n in counts.most_common())


def _passthrough_summary(plan, source, entries) -> dict | None:
    if not plan.passthrough:
        return None
    keys = {q.key for q in plan.passthrough}
    stored = {name: nbytes(dt, shape) for name, dt, shape in entries}
    return {
        "tensors": sorted(keys),
        "schemes": sorted({storage_label(q.quant, q.group_size, "") for q in plan.passthrough}),
        "original_bytes": sum(nbytes(dt, shape) for k, dt, shape in source.tensors if k in keys),
        "stored_bytes": sum(stored[k] + stored[k + SCALE_SUFFIX] for k in keys),
    }


def passthrough_line(p: dict) -> str:
    return (f"{len(p['tensors'])} tensors as {', '.join(p['schemes'])}: {human_bytes(p['original_bytes'])} -> "
            f"{human_bytes(p['stored_bytes'])}")


def healing_line(h: dict) -> str:
    """Cost and effect of a healing run in one line: the block-local pass (if it ran), then the
    end-to-end steps, tokens, time, device, loss, and the metric before and after."""
    local = h.get("local")
    text = ""
    if local:
        text = (f"layer by layer: {local['steps']} steps over {local['layers']} layers ({sum(local['kept'])} kept), "
                f"{local['tokens']:,} tokens, {local['seconds']:.0f} s; end to end: ")
    text += (f"{h['steps']} steps, {h['tokens']:,} tokens, {h['seconds'] - (local['seconds'] if local else 0):.0f} s on {h['device']}"
             + (f" x{h['processes']}" if h.get("processes", 1) > 1 else "")
             + (f"; loss {h['losses'][0]:.4f} -> {h['losses'][-1]:.4f}" if h["losses"] else ""))
    if h.get("metric"):
        best = h["best_step"]
        phase = next((e.get("phase") for e in h["evals"] if e["step"] == best and e["value"] == h["after"]), None)
        text += f"; {h['metric']} {h['before']:.4f} -> {h['after']:.4f} (best {'after ' + phase if phase else f'at step {best}'})"
    return text


def markdown_heal(h: dict) -> str:
    """``vlora-compress heal --report FILE.md``."""
    lines = [f"### healing: `{Path(h['source']).name}` → `{Path(h['output']).name}`", "", healing_line(h), ""]
    if h["evals"]:
        lines += [f"| step | {h['metric']} |", "|---:|---:|",
                  *[f"| {e['step']}{' (' + e['phase'] + ')' if e.get('phase') else ''} | {e['value']:.4f} |" for e in h["evals"]]]
    local = h.get("local")
    if local:
        lines += ["", "| layer | error before | after | kept |", "|---:|---:|---:|:---|",
                  *[f"| {i} | {b:.4f} | {a:.4f} | {'yes' if k else 'no'} |"
                    for i, (b, a, k) in enumerate(zip(local["before"], local["after"], local["kept"]))]]
    cfg = h["config"]
    lines += ["", f"losses {', '.join(f'{n}:{w:g}' for n, w in cfg['losses'])}; lr {cfg['lr']:g}; "
                  f"batch {cfg['batch_size']}; trained {', '.join(cfg['train'])}; precision {h.get('precision', cfg['precision'])}"
                  + (f"; {h['processes']} processes ({cfg['parallel']})" if h["processes"] > 1 else "")]
    memory = h.get("memory")
    if memory:
        lines.append("held by a process: " + ", ".join(f"{k.replace('_', ' ')} {human_bytes(v)}" for k, v in memory.items()))
    if local:
        lines.append(f"block-local: {local['steps'] // max(1, local['layers'])} steps a layer at lr {cfg['local_lr']:g}, "
                     f"{cfg['local_samples']} samples; error = mean over tokens of ‖f(x̂) − y‖² / ‖y‖² on held-out data")
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, data: dict, markdown: str) -> Path:
    """``--report FILE``: JSON or Markdown by the file's suffix, written atomically."""
    from ..errors import VloraError
    from ..io.write import atomic_output

    path = Path(path)
    if path.suffix not in (".json", ".md"):
        raise VloraError(f"{path}: a report is written as .json or .md")
    if not path.parent.is_dir():
        raise VloraError(f"{path.parent}: output folder does not exist")
    text = json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else markdown
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def nbytes(dtype: str, shape) -> int:
    return ITEMSIZE[dtype] * _prod(shape)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _alternative_cells(block: dict) -> list[list[str]]:
    mine = next(r for r in block["rows"] if r["name"] == "this file")
    return [[r["name"], human_bytes(r["bytes"]), f"{r['bytes'] / mine['bytes']:.2f}", f"{r['value']:.4g}",
             f"{r['seconds']:.0f} s"] for r in block["rows"]]


ALTERNATIVE_COLUMNS = ("stored as", "bytes", "x this file", "{metric}", "eval seconds")


def markdown_alternatives(block: dict) -> str:
    """The alternatives at equal bytes as a Markdown table, and the verdict under it."""
    cols = [c.format(metric=block["metric"]) for c in ALTERNATIVE_COLUMNS]
    lines = ["**Alternatives** on the same data", "", "| " + " | ".join(cols) + " |",
             "|---|" + "---:|" * (len(cols) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _alternative_cells(block)]
    return "\n".join(lines + ["", block["verdict"]]) + "\n"


def render_alternatives(block: dict, console: Console) -> None:
    table = Table(title="Alternatives on the same data")
    for col in ALTERNATIVE_COLUMNS:
        table.add_column(col.format(metric=block["metric"]), justify="left" if col == "stored as" else "right")
    for cells in _alternative_cells(block):
        table.add_row(*cells)
    console.print(table)
    console.print(block["verdict"])
