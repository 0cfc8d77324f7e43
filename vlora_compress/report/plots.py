"""Pictures, for where people would rather look than read. Needs the ``plot`` extra (matplotlib)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..errors import VloraError
from ..io.stacks import layer_key, split_key
from ..io.write import atomic_output


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VloraError("plots need matplotlib: pip install 'vlora-compress[plot]'") from None
    return plt


PLOTS = ("spectra", "subspaces", "bytes", "ranks", "errors", "tradeoff")


def _target(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg"):
        raise VloraError(f"{out}: plots are written as .png or .svg")
    if not out.parent.is_dir():
        raise VloraError(f"{out.parent}: output folder does not exist")
    return out


def _save(fig, plt, out: Path) -> Path:
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format=out.suffix[1:].lower())
    plt.close(fig)
    return out


def plot_bytes(info: dict, out: str | Path) -> Path:
    """Where a VLoRA file's bytes went: bases, increments and pass-through, per stack and outside."""
    out, plt = _target(out), _pyplot()
    per_stack: dict[str, dict[str, int]] = {}
    for f in info["families"]:  # the file's own layout, counted by inspect_vlora: every form's bytes
        row = per_stack.setdefault(f["stack"] or "(top level)", {"bases": 0, "increments": 0})
        row["bases"] += f["bytes"]["bases"]
        row["increments"] += f["bytes"]["increments"]
    names = list(per_stack) + ["pass-through"]
    bases = [per_stack[k]["bases"] / 1e6 for k in per_stack] + [0]
    incs = [per_stack[k]["increments"] / 1e6 for k in per_stack] + [0]
    passthrough = [0] * len(per_stack) + [info["bytes_by_role"]["passthrough"] / 1e6]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, bases, label="dense bases")
    ax.bar(names, incs, bottom=bases, label="increments / factors")
    ax.bar(names, passthrough, bottom=[a + b for a, b in zip(bases, incs)], label="pass-through")
    ax.set_ylabel("MB")
    ax.set_title(f"{Path(info['path']).name}: {info['bytes'] / 1e6:.1f} MB, {info['size_ratio']:.3f} of the source")
    ax.legend()
    return _save(fig, plt, out)


def plot_ranks(report: dict, out: str | Path) -> Path:
    """The rank each layer of each family was stored at (0: a dense base)."""
    out, plt = _target(out), _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for fam, rows in _per_family(report).items():
        ax.plot([t["layer"] for t in rows], [t["rank"] for t in rows], marker="o", label=fam)
    ax.set_xlabel("layer")
    ax.set_ylabel("rank (0 = dense base)")
    ax.set_title("Ranks per layer")
    ax.legend(fontsize=6)
    return _save(fig, plt, out)


def plot_errors(report: dict, out: str | Path) -> Path:
    """Reconstruction error per layer; with calibration, the output (whitened) error beside it."""
    out, plt = _target(out), _pyplot()
    whitened = any(t.get("out_error") is not None for t in report["tensors"])
    fig, axes = plt.subplots(1, 2 if whitened else 1, figsize=(11 if whitened else 6, 4), squeeze=False)
    for fam, rows in _per_family(report).items():
        layers = [t["layer"] for t in rows]
        axes[0][0].plot(layers, [t["rel_error"] for t in rows], marker="o", label=fam)
        if whitened:
            axes[0][1].plot(layers, [t["out_error"] for t in rows], marker="o", label=fam)
    axes[0][0].set_title("weight error ||W - Ŵ|| / ||W||")
    if whitened:
        axes[0][1].set_title("output error ||(W - Ŵ)S|| / ||WS||")
    for ax in axes[0]:
        ax.set_xlabel("layer")
        ax.legend(fontsize=6)
    return _save(fig, plt, out)


def plot_tradeoff(reports: list[dict], out: str | Path, metric: str | None = None) -> Path:
    """An eval metric against the size ratio, one point per compress report, and the alternatives
    the reports measured (int8 and int4 alone, per-layer SVD, the original) as points beside them."""
    out, plt = _target(out), _pyplot()
    points = []
    for r in reports:
        metrics = (r.get("evaluation") or {}).get("metrics") or []
        m = next((m for m in metrics if metric in (None, m["name"])), None)
        if m is None:
            raise VloraError(f"{r.get('output')}: the report has no evaluation{f' of {metric}' if metric else ''}"
                             " (compress with --eval)")
        points.append((r["size_ratio"], m["model"], m["name"], Path(r["output"]).name))
    alternatives = {}  # name -> (size ratio, score): the reports' alternatives, once each
    for r in reports:
        block = r.get("alternatives")
        if block and block["metric"] == points[0][2]:
            original = next(a["bytes"] for a in block["rows"] if a["name"] == "original")
            for a in block["rows"]:
                if a["name"] != "this file":
                    alternatives.setdefault((a["name"], a["bytes"]), (a["bytes"] / original, a["value"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    curve = sorted(points)  # the runs by size: a sweep's curve
    ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="o", label="runs")
    for x, y, _, label in points:
        ax.annotate(label, (x, y), fontsize=6)
    if alternatives:
        ax.scatter([x for x, _ in alternatives.values()], [y for _, y in alternatives.values()], marker="s",
                   color="tab:red", label="alternatives")
        for (name, _), (x, y) in alternatives.items():
            ax.annotate(name, (x, y), fontsize=6, color="tab:red")
        ax.legend(fontsize=7)
    ax.set_xlabel("size ratio (compressed / original)")
    ax.set_ylabel(points[0][2])
    ax.set_title("Accuracy against size")
    return _save(fig, plt, out)


def _per_family(report: dict) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = defaultdict(list)
    for t in report["tensors"]:
        prefix, _, suffix = split_key(t["key"])
        by[layer_key(prefix, "*", suffix)].append(t)
    return {k: sorted(v, key=lambda t: t["layer"]) for k, v in by.items()}


def plot_subspaces(rows: list[dict], out: str | Path) -> Path:
    """One heat map per family: the energy of layer j (column) that layer i's (row) top-r output
    subspace keeps, as a share of what j's own keeps; bright off the diagonal means could share."""
    out, plt = _target(out), _pyplot()
    n = len(rows)
    cols = min(4, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.2 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        kept = r["kept"]
        rel = [[kept[i][j] / kept[j][j] if kept[j][j] > 0 else 0.0 for j in range(len(kept))] for i in range(len(kept))]
        im = ax.imshow(rel, vmin=0, vmax=1, cmap="viridis")
        ticks = range(0, len(r["layers"]), max(1, len(r["layers"]) // 6))
        ax.set_xticks(list(ticks), [r["layers"][t] for t in ticks], fontsize=6)
        ax.set_yticks(list(ticks), [r["layers"][t] for t in ticks], fontsize=6)
        ax.set_title(f"{r['suffix']} ({r['side']} side)", fontsize=8)
        ax.set_xlabel("layer kept", fontsize=7)
        ax.set_ylabel("subspace of layer", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    what = "whitened output" if rows and rows[0]["whitened"] else "output (weights)"
    fig.suptitle(f"Which layers could share a basis: {what} energy a top-{rows[0]['rank'] if rows else 0} "
                 "subspace keeps, as a share of the layer's own")
    return _save(fig, plt, out)


def plot_spectra(rows: list[dict], out: str | Path) -> Path:
    """One panel per family: normalised singular values of each consecutive-layer delta, log scale."""
    out, plt = _target(out), _pyplot()
    by_family = defaultdict(list)
    for r in rows:
        by_family[r["family"]].append(r)
    n = len(by_family)
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (family, fam_rows) in zip(axes.flat, by_family.items()):
        for r in fam_rows:
            x, s = r["profile"]["index"], r["profile"]["value"]
            ax.semilogy(x, [v / s[0] for v in s], label=f"{r['layers'][0]}→{r['layers'][1]}")
        ax.axvline(fam_rows[0]["rank"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(family, fontsize=8)
        ax.set_xlabel("index")
        ax.set_ylabel("σ / σ₁")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Singular values of consecutive-layer deltas (dotted: chosen rank)")
    return _save(fig, plt, out)
