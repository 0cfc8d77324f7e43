"""Peak memory of compress and expand on a synthetic bf16 Llama of over 2 GB, against its size.

Each measurement runs in a fresh process that reports its own peak RSS. Side by side: the import
floor, loading the whole checkpoint with safetensors.torch.load_file (what a naive tool does),
loading it as a transformers model, vlora's streaming compress with a fixed plan (data-free: the
planner's search holds one family's layers at a time on top of this), a calibrated compress
(whitened per-layer SVD, 20% of the model's parameters removed, block-sequential: the model loaded
by layer), and expand.

    python bench/memory.py [--layers 74 --hidden 1024 --ffn 2816] [--keep DIR] [--only TEXT]

The default shape is deep and narrow, as the large models are: what a calibrated compress holds is
one layer's Grams and whitenings, so its share of the file falls with depth (a 2048-wide model of
the same size has 20 layers and ten times the share per layer: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlora_compress import synthetic

CALIB = Path(__file__).resolve().parent.parent / "vlora_compress" / "data" / "austen-calibration.txt"

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would include this parent.
# Peak RSS counts the pages of the memory-mapped input (safe_open reads through mmap), which the
# kernel can drop at any time; RssAnon, sampled every 2 ms, is the memory the process really holds.
CHILD = """
import json, re, threading, time
def status(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
peak_anon, done = [status("RssAnon")], []
def sample():
    while not done:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
{body}
seconds = time.perf_counter() - t
done.append(1)
peak_anon[0] = max(peak_anon[0], status("RssAnon"))
print(json.dumps({{"peak_rss": status("VmHWM"), "peak_anon": peak_anon[0], "seconds": seconds}}))
"""


def measure(body: str) -> dict:
    print(".", end="", flush=True)
    proc = subprocess.run([sys.executable, "-c", CHILD.format(body=body)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=74)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--keep", type=Path, help="write the files here instead of a temp folder")
    ap.add_argument("--only", help="measure the import floor and the rows whose name holds this text")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        model_dir = folder / "llama-synthetic"
        src = model_dir / "model.safetensors"
        vl = folder / "llama-synthetic.vlora.safetensors"
        calibrated = folder / "llama-synthetic.calibrated.vlora.safetensors"
        dense = folder / "llama-synthetic.expanded.safetensors"
        shape = dict(layers=args.layers, d=args.hidden, ffn=args.ffn, heads=16, kv_heads=16, vocab=32000)
        specs = synthetic.llama_keys(**shape)
        t = time.perf_counter()
        synthetic.llama_folder(model_dir, **shape, dtype=torch.bfloat16)
        size = src.stat().st_size
        largest = max(2 * s[0] * s[-1] for _, s in specs)
        print(f"synthetic Llama layout, bf16, {args.layers} layers of {args.hidden} / {args.ffn}: {size / 1e9:.2f} GB "
              f"(largest tensor {largest / 1e6:.0f} MB), made in {time.perf_counter() - t:.0f} s")
        jobs = [
            ("import torch + vlora_compress", "import torch, vlora_compress"),
            ("safetensors load_file, every tensor in memory",
             f"from safetensors.torch import load_file; sd = {{k: v.clone() for k, v in load_file({str(src)!r}).items()}}"),
            ("transformers from_pretrained (bf16)",
             f"from vlora_compress.io.models import load_model; m = load_model({str(model_dir)!r}, head='base')"),
            ("vlora compress --rank 4 --chunks 2 (fixed plan)",
             f"from vlora_compress import compress; compress({str(src)!r}, {str(vl)!r}, rank=4, chunks=2, "
             "base='first', topology='chain', bounds='equal', force=True)"),
            ("vlora compress --method svd --target-size 0.8 --calib",
             f"from vlora_compress import compress, CalibConfig; r = compress({str(model_dir)!r}, "
             f"{str(calibrated)!r}, method='svd', ranks='uniform', target_size='0.8', target_of='model', "
             f"calib={str(CALIB)!r}, calibration=CalibConfig(samples=32, max_length=128), force=True); "
             "assert r.calibration['model_loaded'] == 'by layer'"),
            ("vlora expand to file",
             f"from vlora_compress import expand_to_file; expand_to_file({str(vl)!r}, {str(dense)!r}, force=True)"),
        ]
        # --only: the import floor, and the rows whose name holds the text (expand needs the fixed plan's file)
        rows = [(name, measure(code)) for i, (name, code) in enumerate(jobs)
                if i == 0 or not args.only or args.only in name]
        floor = rows[0][1]["peak_anon"]
        print(f"\n{'what':46} {'peak RSS':>9} {'peak anon':>10} {'anon above floor':>17} {'/ file':>7} "
              f"{'/ largest tensor':>17} {'time':>7}")
        for name, r in rows:
            above = r["peak_anon"] - floor
            print(f"{name:46} {r['peak_rss'] / 1e9:8.2f}G {r['peak_anon'] / 1e9:9.2f}G {above / 1e9:16.2f}G "
                  f"{above / size:7.2f} {above / largest:17.1f} {r['seconds']:6.1f}s")
        found = dict(rows)
        naive = found.get(jobs[1][0])
        for name, what in ((jobs[3][0], "compress"), (jobs[4][0], "calibrated compress")):
            if name in found:
                held = found[name]["peak_anon"] - floor
                versus = f"{held / (naive['peak_anon'] - floor):.2f}x the anonymous memory of loading the model whole (" \
                    if naive else "("
                print(f"{what} holds {versus}{held / size:.2f}x the file size; "
                      f"{found[name]['peak_anon'] / size:.2f}x with the import floor)")

if __name__ == "__main__":
    main()
