"""Look inside a checkpoint or a VLoRA file before deciding anything.

``inspect_checkpoint`` lists the layer stacks and where the bytes are; ``delta_spectra`` measures how
much of each consecutive-layer delta a rank-r increment can keep, which is the number that tells
whether cross-layer sharing can work on a model at all; ``inspect_vlora`` shows a file's plan.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..io.checkpoint import open_checkpoint
from ..errors import VloraError
from ..export.base import formats_holding
from ..io.fileformat import VloraFile, family_layout, layout
from ..forms.stored import matrix_roles
from ..progress import Progress
from ..fit.integers import SCALE_SUFFIX
from ..report.compress_report import MEASURED_BY, human_bytes, nbytes, short_number, storage_label
from ..io.stacks import find_stacks

SPECTRUM_HEAD = 64  # leading singular values kept per pair in JSON
PROFILE_POINTS = 32  # the whole spectrum, sampled at evenly spaced indices
SPARK = "▁▂▃▄▅▆▇█"


def inspect_source(source: str | Path) -> dict:
    """A VLoRA file's plan, or a checkpoint's stacks: whichever ``source`` is."""
    with open_checkpoint(source) as ckpt:
        is_vlora = ckpt.is_vlora
    return inspect_vlora(source) if is_vlora else inspect_checkpoint(source)


def inspect_checkpoint(source: str | Path) -> dict:
    with open_checkpoint(source) as ckpt:
        stacks = find_stacks(ckpt.infos)
        in_stacks = 0
        out_stacks = []
        for s in stacks:
            fams = [
                {
                    "family": f.name,
                    "suffix": f.suffix,
                    "shape": list(f.shape),
                    "dtype": f.dtype,
                    "layers": list(f.layers),
                    "bytes": f.nbytes,
                }
                for f in s.families
            ]
            stack_bytes = sum(ckpt.infos[k].nbytes for k in s.keys)
            in_stacks += stack_bytes
            out_stacks.append(
                {
                    "prefix": s.prefix,
                    "layers": list(s.layers),
                    "bytes": stack_bytes,
                    "factorisable_bytes": sum(f["bytes"] for f in fams),
                    "families": fams,
                }
            )
        return {
            "kind": "checkpoint",
            "path": str(ckpt.source),
            "files": [f.name for f in ckpt.files],
            "metadata": ckpt.metadata,
            "tensors": len(ckpt.infos),
            "params": sum(i.numel for i in ckpt.infos.values()),
            "bytes": ckpt.nbytes,
            "outside_stacks_bytes": ckpt.nbytes - in_stacks,
            "stacks": out_stacks,
        }


def delta_spectra(source: str | Path, rank: int, progress: bool = False) -> list[dict]:
    """For every consecutive layer pair of every family: ||ΔW||/||W||, energy kept at ``rank``.

    ``energy_kept`` is Σ_{i<r} σ_i² / Σ σ_i² of ΔW = W_l - W_{l-1}: the share of the delta a
    data-free rank-r increment can store. ``rank_for`` gives the rank needed for 50/90/99%.
    """
    out = []
    with open_checkpoint(source) as ckpt:
        families = _families(ckpt, rank, "spectra")
        with Progress("spectra", sum(len(f.layers) - 1 for f in families), enabled=progress) as bar:
            for fam in families:
                bar.describe(fam.name)
                prev = ckpt.read(fam.key(fam.layers[0])).double()
                for layer in fam.layers[1:]:
                    w = ckpt.read(fam.key(layer)).double()
                    s = torch.linalg.svdvals(w - prev)
                    energy = s.square()
                    total = float(energy.sum())
                    cum = (energy.cumsum(0) / total) if total > 0 else torch.ones_like(energy)
                    out.append(
                        {
                            "family": fam.name,
                            "stack": fam.stack,
                            "suffix": fam.suffix,
                            "layers": [fam.layers[fam.layers.index(layer) - 1], layer],
                            "shape": list(fam.shape),
                            "rel_delta": float(torch.linalg.norm(w - prev) / max(torch.linalg.norm(w), 1e-30)),
                            "rank": min(rank, len(s)),
                            "energy_kept": float(cum[min(rank, len(s)) - 1]),
                            "rank_for": {
                                str(p): int(torch.searchsorted(cum, torch.tensor(p / 100, dtype=cum.dtype)) + 1)
                                for p in (50, 90, 99)
                            },
                            "singular_values": [float(x) for x in s[:SPECTRUM_HEAD]],
                            "profile": _profile(s),
                        }
                    )
                    prev = w
                    bar.advance()
    return out


SIDES = ("output", "input")


def _families(ckpt, rank: int, view: str) -> list:
    """Every stacked family of a dense checkpoint, for a view that needs ``rank``; else one error."""
    if not isinstance(rank, int) or rank < 1:
        raise VloraError(f"`rank` must be a whole number of at least 1, not {rank!r}")
    if ckpt.is_vlora:
        raise VloraError(f"{ckpt.source}: `{view}` needs a dense checkpoint, not a VLoRA file")
    families = [f for s in find_stacks(ckpt.infos) for f in s.families]
    if not families:
        raise VloraError(f"{ckpt.source}: no repeated layer stack found")
    return families


def subspace_sharing(source: str | Path, rank: int, calib: str | Path | None = None,
                     config_dir: str | Path | None = None, samples: int = 128, progress: bool = False) -> list[dict]:
    """For every family and side: how much of each layer's output energy another layer's top-``rank``
    subspace keeps, the number that says which layers could share one basis (Basis Sharing keeps
    one basis per group of layers and coefficients per layer).

    With M_j layer j's weight as (out, in), whitened by its calibration inputs (M_j = W_j S_j) when
    ``calib`` is given, and M_i = U Σ Vᵀ:

    - ``output`` side, a basis of outputs shared (W_l ≈ B C_l): ``kept[i][j]`` = ||U_iᵀ M_j||² / ||M_j||²
      with U_i the top-``rank`` left singular vectors;
    - ``input`` side, a basis of inputs shared (W_l ≈ C_l A): A_i = V_iᵀ S_i⁻¹ from layer i, and
      ``kept[i][j]`` the share of ||M_j||² that the best C for layer j keeps over it, the projection
      of M_j onto the row space of A_i S_j.

    The diagonal is what each layer's own subspace keeps (per-layer SVD at that rank); a random
    subspace keeps rank / dim on average. The summary gives the rest as shares of the layer's own:
    a neighbour's, the best other layer's and a random subspace's. Without calibration the weights
    are taken as they are, which can mislead: a subspace that keeps weight energy need not keep
    the output's.
    """
    out = []
    with open_checkpoint(source) as ckpt:
        families = _families(ckpt, rank, "subspaces")
        whitener = _whitener(source, config_dir, calib, samples, families, ckpt.read, progress) if calib else None

        def view(key: str):  # (the weight as (out, in), whitened where calibrated; its whitening root)
            wh = whitener(key) if whitener is not None else None
            m = ckpt.read(key).double()
            if wh is None:
                return m, None
            m = wh.whiten(m)
            return (m.T if wh.side == 0 else m), wh  # Conv1D stores (in, out): M = Wᵀ S either way

        with Progress("subspaces", 2 * sum(len(f.layers) for f in families), enabled=progress) as bar:
            for fam in families:
                bar.describe(fam.name)
                outputs, inputs = [], []  # per layer: U_i, and (A_i)ᵀ = S_i⁻ᵀ V_i
                for layer in fam.layers:
                    m, wh = view(fam.key(layer))
                    u, _, vh = torch.linalg.svd(m, full_matrices=False)
                    k = min(rank, u.shape[1])
                    outputs.append(u[:, :k])
                    inputs.append(vh[:k].T if wh is None else wh.inv.to(m).T @ vh[:k].T)
                    bar.advance()
                kept = {side: [[0.0] * len(fam.layers) for _ in fam.layers] for side in SIDES}
                for j, layer in enumerate(fam.layers):  # each layer's energy in every layer's subspaces
                    m, wh = view(fam.key(layer))
                    total = float(m.square().sum()) or 1.0
                    for i in range(len(fam.layers)):
                        kept["output"][i][j] = float((outputs[i].T @ m).square().sum()) / total
                        basis = inputs[i] if wh is None else wh.root.to(m).T @ inputs[i]  # (A_i S_j)ᵀ
                        kept["input"][i][j] = float((m @ torch.linalg.qr(basis).Q).square().sum()) / total
                    bar.advance()
                for side in SIDES:
                    dim = outputs[0].shape[0] if side == "output" else inputs[0].shape[0]
                    out.append(_sharing_row(fam, side, kept[side], whitener is not None, k, dim))
    return out


def _sharing_row(fam, side: str, kept: list[list[float]], whitened: bool, rank: int, dim: int) -> dict:
    n = len(kept)
    own = [kept[j][j] for j in range(n)]
    rel = [[kept[i][j] / own[j] if own[j] > 0 else 0.0 for j in range(n)] for i in range(n)]
    others = [max((rel[i][j] for i in range(n) if i != j), default=0.0) for j in range(n)]
    neighbours = [rel[i][j] for j in range(n) for i in (j - 1, j + 1) if 0 <= i < n]
    return {
        "family": fam.name, "stack": fam.stack, "suffix": fam.suffix, "shape": list(fam.shape), "side": side,
        "layers": list(fam.layers), "rank": rank, "whitened": whitened,
        "kept": kept,  # kept[i][j]: layer j's energy in layer i's subspace
        "own": sum(own) / n,  # mean share a layer's own subspace keeps
        "neighbour": sum(neighbours) / len(neighbours) if neighbours else None,  # a neighbour's, as a share of own
        "best_other": sum(others) / n,  # the best other layer's, as a share of own, mean over layers
        "random": sum(rank / dim / o for o in own if o > 0) / n,  # a random subspace's, as a share of own
    }


def _whitener(source, config_dir, calib, samples: int, families, read, progress: bool):
    """Each key's whitening from the original model's input Grams on ``calib``."""
    from ..calibrate.grams import calibrate, read_calibration
    from ..config import CalibConfig
    from ..io.models import config_folder, head_of, load_model, load_preprocessor

    folder = config_folder(config_dir or source)
    model = load_model(Path(source) if config_dir is None else source, None if config_dir is None else folder, "base")
    tok = load_preprocessor(folder)
    config = CalibConfig(samples=samples, holdout=0)
    texts, _ = read_calibration(tok, calib, config, head_of(model.config) == "causal-lm")
    keys = [f.key(layer) for f in families for layer in f.layers]
    return calibrate(model, tok, texts, keys, config, progress, read).whitener


def inspect_vlora(path: str | Path) -> dict:
    vfile = VloraFile(path)
    plan = vfile.plan
    family_entries = {name for fp in plan.families for name, _, _ in family_layout(fp)}
    passthrough = sum(nbytes(dt, shape) for name, dt, shape in layout(plan, vfile.source) if name not in family_entries)
    bases = increments = 0
    families = []
    for fp in plan.families:
        roles = matrix_roles(fp)
        mine = {"bases": 0, "increments": 0}  # a shared basis is a factor, not a dense base
        for name, dt, shape in family_layout(fp):
            factor = roles[name.removesuffix(SCALE_SUFFIX)] == "factor"
            mine["increments" if factor else "bases"] += nbytes(dt, shape)
        bases, increments = bases + mine["bases"], increments + mine["increments"]
        families.append(
            {
                **fp.summary(),
                "bytes": mine,
                # where it runs at its size: this tool's packed runtime holds every family as stored
                "runtime_bytes": mine["bases"] + mine["increments"],
                "exports": formats_holding(fp),
                "chunks": [
                    {"layers": list(c.layers), "base": c.base, "topology": c.topology, "ranks": list(c.ranks)}
                    for c in fp.chunks
                ],
            }
        )
    total = vfile.nbytes
    return {
        "kind": "vlora",
        "path": str(vfile.path),
        "format_version": int(vfile.checkpoint.metadata["vlora.version"]),
        "config": vfile.config,
        "source": {"sha256": vfile.source.sha256, "bytes": vfile.source.nbytes},
        "bytes": total,
        "params": sum(i.numel for i in vfile.checkpoint.infos.values()),
        "size_ratio": total / vfile.source.nbytes,
        "bytes_by_role": {"passthrough": passthrough, "bases": bases, "increments": increments},
        "stacks": [
            {"prefix": s.prefix, "layers": list(s.layers), "chunks": [[s.layers[a], s.layers[b - 1]] for a, b in s.bounds]}
            for s in plan.stacks
        ],
        "families": families,
        "passthrough_quantized": [{"key": q.key, "quant": q.quant, "group_size": q.group_size}
                                  for q in plan.passthrough],
        "notes": list(plan.notes),
        "decisions": [d.to_dict() for d in plan.decisions],  # what the planner weighed
    }


def _profile(s: torch.Tensor) -> dict:
    idx = torch.linspace(0, len(s) - 1, min(PROFILE_POINTS, len(s))).round().long()
    return {"index": [int(i) + 1 for i in idx], "value": [float(s[i]) for i in idx]}


def sparkline(values: list[float], width: int = 16) -> str:
    """Singular values on a log scale, σ_1 at full height, in ``width`` characters."""
    if not values or values[0] <= 0:
        return ""
    step = max(1, len(values) // width)
    sampled = values[::step][:width]
    floor = 1e-4
    out = []
    for v in sampled:
        x = max(v / values[0], floor)
        level = 1 - math.log(x) / math.log(floor)
        out.append(SPARK[min(len(SPARK) - 1, max(0, int(level * (len(SPARK) - 1) + 0.5)))])
    return "".join(out)


def markdown_spectra(rows: list[dict]) -> str:
    rank = rows[0]["rank"] if rows else 0
    lines = [f"| family | pair | ‖ΔW‖/‖W‖ | kept at rank {rank} | ranks for 50/90/99% |", "|---|---|---:|---:|---|"]
    lines += [f"| {r['family']} | {r['layers'][0]}→{r['layers'][1]} | {r['rel_delta']:.3f} | {r['energy_kept']:.1%} | "
              f"{r['rank_for']['50']}/{r['rank_for']['90']}/{r['rank_for']['99']} |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown_subspaces(rows: list[dict]) -> str:
    rank = rows[0]["rank"] if rows else 0
    lines = [f"| family | side | {'whitened ' if rows and rows[0]['whitened'] else ''}energy its own top-{rank} keeps | "
             "of that, a neighbour's | the best other layer's | a random subspace's |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['family']} | {r['side']} | {r['own']:.1%} | {_share(r['neighbour'])} | {r['best_other']:.0%} | "
              f"{r['random']:.0%} |" for r in rows]
    return "\n".join(lines) + "\n"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def markdown_inspect(info: dict) -> str:
    """A checkpoint's stacks, or a VLoRA file's plan, as Markdown."""
    if info["kind"] == "vlora":
        roles = info["bytes_by_role"]
        lines = [f"### `{Path(info['path']).name}`: VLoRA v{info['format_version']}, {human_bytes(info['bytes'])}, "
                 f"size ratio {info['size_ratio']:.3f}", "",
                 f"bases {human_bytes(roles['bases'])}, increments {human_bytes(roles['increments'])}, "
                 f"pass-through {human_bytes(roles['passthrough'])}", "",
                 "| family | shape | chunk | base | topology | ranks | exports |", "|---|---|---|---|---|---|---|"]
        for f in info["families"]:
            for i, c in enumerate(f["chunks"]):
                exports = (", ".join(f["exports"]) or "-") if i == 0 else ""
                lines.append(f"| {f['family']} | {'x'.join(map(str, f['shape']))} | {_span(c['layers'])} | "
                             f"{c['base']} | {c['topology']} | {','.join(map(str, c['ranks']))} | {exports} |")
        return "\n".join(lines) + "\n"
    lines = [f"### `{info['path']}`: {info['tensors']} tensors, {info['params']:,} params, {human_bytes(info['bytes'])}",
             "", "| stack | family | shape | dtype | layers | bytes |", "|---|---|---|---|---|---|"]
    for st in info["stacks"]:
        for f in st["families"]:
            lines.append(f"| {st['prefix']} | {f['suffix']} | {'x'.join(map(str, f['shape']))} | {f['dtype']} | "
                         f"{_span(f['layers'])} | {human_bytes(f['bytes'])} |")
    return "\n".join(lines) + "\n"


def render_checkpoint(info: dict, console: Console) -> None:
    console.print(
        f"[bold]{info['path']}[/]: {info['tensors']} tensors, {info['params']:,} params, "
        f"{human_bytes(info['bytes'])}; outside stacks {human_bytes(info['outside_stacks_bytes'])}"
    )
    for s in info["stacks"]:
        table = Table(title=f"stack {s['prefix'] or '(top level)'}: layers {s['layers'][0]}..{s['layers'][-1]}, "
                      f"{human_bytes(s['bytes'])}")
        for col in ("family", "shape", "dtype", "layers", "bytes"):
            table.add_column(col, justify="left" if col == "family" else "right", overflow="fold")
        for f in s["families"]:
            table.add_row(f["suffix"], "x".join(map(str, f["shape"])), f["dtype"], _span(f["layers"]),
                          human_bytes(f["bytes"]))
        console.print(table)


def render_spectra(rows: list[dict], console: Console) -> None:
    rank = rows[0]["rank"] if rows else 0
    one_stack = len({r["stack"] for r in rows}) == 1
    where = f" in {rows[0]['stack']}" if rows and one_stack else ""
    table = Table(title=f"Consecutive-layer deltas{where}: energy a rank-{rank} increment keeps")
    for col in ("family", "pair", "‖ΔW‖/‖W‖", f"kept@{rank}", "r50/r90/r99", "spectrum (log)"):
        table.add_column(col, justify="left" if col in ("family", "spectrum (log)") else "right", overflow="fold")
    for r in rows:
        rf = r["rank_for"]
        table.add_row(r["suffix"] if one_stack else r["family"], f"{r['layers'][0]}→{r['layers'][1]}", f"{r['rel_delta']:.2f}",
                      f"{r['energy_kept']:.1%}", f"{rf['50']}/{rf['90']}/{rf['99']}", sparkline(r["profile"]["value"]))
    console.print(table)


def render_subspaces(rows: list[dict], console: Console) -> None:
    rank = rows[0]["rank"] if rows else 0
    what = "whitened output" if rows and rows[0]["whitened"] else "output (weights, not whitened: pass --calib)"
    table = Table(title=f"Which layers could share a basis: the {what} energy a top-{rank} subspace keeps")
    for col in ("family", "side", "own", "of own: a neighbour's", "best other's", "random"):
        table.add_column(col, justify="left" if col in ("family", "side") else "right", overflow="fold")
    one_stack = len({r["stack"] for r in rows}) == 1
    for r in rows:
        table.add_row(r["suffix"] if one_stack else r["family"], r["side"], f"{r['own']:.1%}", _share(r["neighbour"]),
                      f"{r['best_other']:.0%}", f"{r['random']:.0%}")
    console.print(table)


def render_vlora(info: dict, console: Console) -> None:
    roles = info["bytes_by_role"]
    console.print(
        f"[bold]{info['path']}[/]: VLoRA format v{info['format_version']}, {human_bytes(info['bytes'])} "
        f"= {info['size_ratio']:.3f} of the source ({human_bytes(info['source']['bytes'])}, "
        f"sha256 {info['source']['sha256'][:12]})"
    )
    console.print(
        f"bases {human_bytes(roles['bases'])}, increments {human_bytes(roles['increments'])}, "
        f"pass-through {human_bytes(roles['passthrough'])}"
        + (f", of which {len(info['passthrough_quantized'])} tensors quantized" if info["passthrough_quantized"] else "")
    )
    for s in info["stacks"]:
        console.print(f"stack {s['prefix'] or '(top level)'}: chunks " + ", ".join(f"{a}..{b}" for a, b in s["chunks"]))
    one_stack = len(info["stacks"]) == 1
    table = Table(title="Plan" + (f" of {info['stacks'][0]['prefix']}" if one_stack else ""))
    for col in ("family", "shape", "store", "chunk", "base", "topology", "ranks", "exports"):
        table.add_column(col, justify="left" if col in ("family", "exports") else "right", overflow="fold")
    for f in info["families"]:
        for i, c in enumerate(f["chunks"]):
            table.add_row((f["suffix"] if one_stack else f["family"]) if i == 0 else "", "x".join(map(str, f["shape"])) if i == 0 else "",
                          storage_label(f["quant"], f["group_size"], f["store_dtype"]) if i == 0 else "",
                          _span(c["layers"]),
                          str(c["base"]), c["topology"],
                          ",".join(map(str, c["ranks"])), (", ".join(f["exports"]) or "-") if i == 0 else "")
    console.print(table)
    console.print("exports: the formats vlora-export writes each family to exactly (- : none; every family runs at "
                  "its size packed: vlora-eval --runtime packed)")
    if info["decisions"]:
        render_decisions(info["decisions"], console)
    for note in info["notes"]:
        console.print(f"[yellow]note:[/] {note}")


def render_decisions(decisions: list[dict], console: Console) -> None:
    """The planner's decisions as a table: per family, every candidate it fitted and measured (the
    chosen one marked), those fitted but not measured, and how many more it ranked out by their
    estimate alone."""
    measure = {d["measure"] for d in decisions}
    what = MEASURED_BY[next(iter(measure))] if len(measure) == 1 else "each decision's measure"
    table = Table(title=f"What the planner weighed at each family's budget: error is {what}")
    for col in ("family", "candidate", "form", "rank", "stored", "estimate", "fitted", "error", ""):
        table.add_column(col, justify="left" if col in ("family", "candidate", "form") else "right", overflow="fold")
    for d in decisions:
        shown = [(i, c) for i, c in enumerate(d["candidates"])
                 if c["error"] is not None or c.get("fitted") is not None or i == d["chosen"]]
        rows = [(c, "chosen" if i == d["chosen"] else "") for i, c in shown]
        rows += [(d["allocated"], "stored")] if d.get("allocated") else []  # after rank allocation
        for j, (c, mark) in enumerate(rows):
            name = (f"{d['scope']}: " if d["scope"] else "") + d["family"]
            table.add_row(name if j == 0 else "", c["label"], c["form"], str(c["rank"] or "dense"),
                          human_bytes(c["bytes"]), short_number(c["estimate"]), short_number(c.get("fitted")),
                          short_number(c["error"]), mark)
        left = len(d["candidates"]) - len(shown)
        if left:
            table.add_row("", f"({left} more ranked out by their estimate)", "", "", "", "", "", "", "")
    console.print(table)


def _span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0])
