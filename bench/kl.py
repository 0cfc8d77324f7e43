"""What one planner measurement of a causal LM costs: next-token KL with the head over the vocabulary
per measurement (the plain measure) against the hidden-state measure (calibrate/kl.py), side by side
in one run, and how far apart their numbers are.

    OMP_NUM_THREADS=2 python bench/kl.py                  # SmolLM2-135M (49,152 tokens) and a
                                                          # synthetic 4-layer Llama with 262,144
    OMP_NUM_THREADS=2 python bench/kl.py --holdout 16 --repeats 3

Each model gets the planner's meter built both ways on the same held-back windows of the bundled
calibration text; each meter is timed on the same perturbed weights (one family's layers with
Gaussian noise at 5% and 20% of their spread), so the error columns show what the shortcut changes.
Run it alone on an idle machine: the seconds are what it measures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from vlora_compress.calibrate import grams  # noqa: E402
from vlora_compress.calibrate.grams import OutputMeter, text_windows  # noqa: E402
from vlora_compress.io.data import BUNDLED  # noqa: E402


def _models(which: list[str]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in which:
        if name == "smollm2":
            from smollm2 import smollm2_folder

            folder = smollm2_folder()
            yield name, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), \
                AutoTokenizer.from_pretrained(folder)
        else:  # a 262k-token vocabulary under a small stack: Gemma 3 270M's shape, four layers of it
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(0)
            config = LlamaConfig(num_hidden_layers=4, hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                                 num_key_value_heads=1, vocab_size=262144, max_position_embeddings=512)
            lm = LlamaForCausalLM(config).eval()
            lm.lm_head.weight.data *= 20  # peaked distributions, as a trained LM's
            from smollm2 import smollm2_folder

            yield name, lm, AutoTokenizer.from_pretrained(smollm2_folder())  # its ids are all below 262,144


def _meter(lm, tok, held, plain: bool, length: int) -> tuple[OutputMeter, float]:
    saved = grams.kl.plain_head
    if plain:
        grams.kl.plain_head = lambda model: None
    try:
        t = time.perf_counter()
        meter = OutputMeter(lm, tok, held, length, measure="logits")
        return meter, time.perf_counter() - t
    finally:
        grams.kl.plain_head = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,vocab-262k")
    ap.add_argument("--holdout", type=int, default=16, help="held-back windows (the planner's default)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = ["| model | vocabulary | measure | reference s | s a measurement | KL at 5% | KL at 20% |",
            "|---|---|---|---|---|---|---|"]
    for name, lm, tok in _models(args.models.split(",")):
        held = text_windows(tok, (BUNDLED / "austen-calibration.txt").read_text(), args.max_length,
                            args.holdout)
        layers = lm.model.layers
        key = "model.layers.{}.mlp.down_proj.weight"
        originals = {key.format(i): layers[i].mlp.down_proj.weight.detach().clone() for i in range(len(layers))}
        torch.manual_seed(1)
        noise = {k: torch.randn_like(w) * w.std() for k, w in originals.items()}
        bent = {s: {k: w + s * noise[k] for k, w in originals.items()} for s in (0.05, 0.2)}
        for plain in (True, False):
            meter, made = _meter(lm, tok, held, plain, args.max_length)
            errors = {s: meter(b) for s, b in bent.items()}
            t = time.perf_counter()
            for _ in range(args.repeats):
                meter(bent[0.05])
            each = (time.perf_counter() - t) / args.repeats
            rows.append(f"| {name} | {lm.config.vocab_size:,} | {'plain' if plain else 'hidden-state'} | {made:.1f} | "
                        f"{each:.2f} | {errors[0.05]:.6f} | {errors[0.2]:.5f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
