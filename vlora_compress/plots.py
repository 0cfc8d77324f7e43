"""Pictures, for where people would rather look than read. Needs the ``plot`` extra (matplotlib)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .errors import VloraError
from .write import atomic_output


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VloraError("plots need matplotlib: pip install 'vlora-compress[plot]'") from None
    return plt


def plot_spectra(rows: list[dict], out: str | Path) -> Path:
    """One panel per family: normalised singular values of each consecutive-layer delta, log scale."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg"):
        raise VloraError(f"{out}: plots are written as .png or .svg")
    if not out.parent.is_dir():
        raise VloraError(f"{out.parent}: output folder does not exist")
    plt = _pyplot()
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
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format=out.suffix[1:].lower())
    plt.close(fig)
    return out
