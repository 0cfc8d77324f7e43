"""The guard: a fixed set of compressions whose output files are pinned byte for byte (sha256).

Code that moves (a refactor) must leave every hash as it is; a hash that must change (a bug
found on the way) changes in a commit of its own that says why. The set covers every storage
form, pipeline and integer scheme on small inputs: the real all-MiniLM-L6-v2 data-free and with
a little calibration, a seeded tiny Llama (transformers) calibrated, and a healed file.

The hashes are of float computations (SVDs, GPTQ, healing), which differ between torch builds,
CPU kernels and thread counts, so the guard runs on one thread, whatever the test run gives torch
(CI's two xdist workers, or a developer's whole machine), and ``tests/guard_hashes.json`` records
the torch version and the CPU capability they were made under; on another, the test skips and
says how to pin them there:

    VLORA_GUARD_UPDATE=1 ./dev test tests/test_guard.py
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import CALIB, tiny_model
from vlora_compress import CalibConfig, compress

PINNED = Path(__file__).with_name("guard_hashes.json")
UPDATE = os.environ.get("VLORA_GUARD_UPDATE") == "1"

SMALL = CalibConfig(samples=16, max_length=32, holdout=4, batch_size=8)  # a little calibration, quickly
CORE = dict(base="first", topology="chain", bounds="equal", ranks="uniform")

# name -> (model, options): "minilm" is all-MiniLM-L6-v2, "llama" a seeded 4-layer Llama; "calib" in
# the options reads CALIB with SMALL unless it gives its own calibration
CASES: dict[str, tuple[str, dict]] = {
    # MiniLM, data-free: every topology, the default plan, per-layer SVD, alignment, shared bases
    "minilm-free-default": ("minilm", dict(rank=4)),
    "minilm-free-svd": ("minilm", dict(method="svd", rank=8)),
    "minilm-free-chain": ("minilm", dict(rank=8, chunks=2, **CORE)),
    "minilm-free-star-mean": ("minilm", dict(rank=8, chunks=2, base="mean", topology="star", bounds="equal",
                                             ranks="uniform")),
    "minilm-free-shared": ("minilm", dict(rank=8, chunks=3, base="none", topology="shared", ranks="uniform")),
    "minilm-free-shared-left": ("minilm", dict(rank=8, chunks=3, base="none", topology="shared-left",
                                               ranks="uniform")),
    "minilm-free-align": ("minilm", dict(rank=8, chunks=2, align=True, **CORE)),
    "minilm-free-int8": ("minilm", dict(method="dense", quantize="int8")),
    "minilm-free-int4-chain": ("minilm", dict(rank=8, chunks=2, quantize="int4", group_size=64, **CORE)),
    # MiniLM, calibrated (a few samples): the float plan (the default before every storage was weighed)
    # and per-layer SVD at a size target
    "minilm-calib-default": ("minilm", dict(target_size="0.5", target_of="stack", quantize="none", calib=True)),
    "minilm-calib-svd": ("minilm", dict(method="svd", ranks="uniform", target_size="0.5", target_of="stack",
                                        calib=True)),
    # a tiny Llama, calibrated: the default plan (every storage weighed), the float plan (shared bases
    # tried: next-token KL measures it), the sequential pipeline, planning by blocks, feedback
    "llama-default-all-forms": ("llama", dict(target_size="0.6", target_of="stack", calib=True)),
    "llama-default": ("llama", dict(target_size="0.6", target_of="stack", quantize="none", calib=True)),
    "llama-no-shared": ("llama", dict(target_size="0.6", target_of="stack", quantize="none", shared=False,
                                      calib=True)),
    "llama-svd-inputs": ("llama", dict(method="svd", rank=8, ranks="uniform", calib=True)),
    "llama-svd-none": ("llama", dict(method="svd", rank=8, ranks="uniform", feedback="none", calib=True)),
    "llama-svd-outputs": ("llama", dict(method="svd", rank=8, ranks="uniform", feedback="outputs", calib=True)),
    "llama-at-once": ("llama", dict(method="svd", rank=8, ranks="uniform", sequential=False, calib=True)),
    "llama-blocks": ("llama", dict(target_size="0.6", target_of="stack", planning="blocks", calib=True)),
    "llama-shared-blocks": ("llama", dict(rank=8, base="none", topology="shared", chunks=2, planning="blocks",
                                          calib=True)),
    # every integer scheme, GPTQ and nearest
    "llama-int8-gptq": ("llama", dict(method="dense", quantize="int8", calib=True)),
    "llama-int4-gptq": ("llama", dict(method="dense", quantize="int4", group_size=32, calib=True)),
    "llama-int3-gptq": ("llama", dict(method="dense", quantize="int3", group_size=32, calib=True)),
    "llama-int2-gptq": ("llama", dict(method="dense", quantize="int2", group_size=32, calib=True)),
    "llama-int3-midrise-gptq": ("llama", dict(method="dense", quantize="int3-midrise", group_size=32, calib=True)),
    "llama-int2-midrise-nearest": ("llama", dict(method="dense", quantize="int2-midrise", group_size=32,
                                                 rounding="nearest", calib=True)),
    "llama-int4-passthrough": ("llama", dict(method="svd", rank=8, ranks="uniform", quantize="int4", group_size=32,
                                             quantize_passthrough=True, calib=True)),
    # a quantized base under a low-rank increment, --quantize auto, --target-bits
    "llama-q-plus-ba": ("llama", dict(method="svd", base_quantize="int2-midrise", quantize="int4", group_size=32,
                                      rank=4, ranks="uniform", calib=True)),
    "llama-q-plus-ba-bits": ("llama", dict(method="svd", base_quantize="int2-midrise", quantize="int4", group_size=32,
                                           target_bits=4.0, calib=True)),
    "llama-vlora-int4-base": ("llama", dict(rank=8, chunks=2, base_quantize="int4", quantize="int8", group_size=32,
                                            calib=True, **CORE)),
    "llama-auto-bits": ("llama", dict(quantize="auto", group_size=32, target_bits=3.0, calib=True)),
    "llama-shared-residual-int4": ("llama", dict(rank=4, ranks="uniform", shared=True, quantize="int4",
                                                 group_size=32, calib=True)),
}


def fingerprint() -> str:
    return f"torch {torch.__version__.split('+')[0]}, {torch.backends.cpu.get_cpu_capability()}, 1 thread"


@pytest.fixture(autouse=True)
def one_thread():
    """Float sums split across threads round differently: the pinned bytes are one thread's."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_dir) -> dict[str, Path]:
    return {"minilm": minilm_dir, "llama": tiny_model(tmp_path_factory.mktemp("guard") / "llama", "llama")}


@pytest.fixture(scope="module")
def pinned():
    data = json.loads(PINNED.read_text()) if PINNED.exists() else {"fingerprint": fingerprint(), "hashes": {}}
    if not UPDATE and data["fingerprint"] != fingerprint():
        pytest.skip(f"the guard's hashes were pinned under {data['fingerprint']}, this is {fingerprint()}: "
                    "VLORA_GUARD_UPDATE=1 ./dev test tests/test_guard.py pins them here")
    yield data
    if UPDATE:
        data["fingerprint"] = fingerprint()
        known = set(CASES) | {"minilm-healed"}
        data["hashes"] = {k: v for k, v in sorted(data["hashes"].items()) if k in known}
        PINNED.write_text(json.dumps(data, indent=1) + "\n")


def make(name: str, models: dict[str, Path], out: Path) -> Path:
    model, options = CASES[name]
    options = dict(options)
    if options.pop("calib", False):
        options = {"calib": CALIB, "calibration": SMALL, **options}
    torch.manual_seed(0)
    path = out / f"{name}.vlora.safetensors"
    compress(models[model], path, device="cpu", **options)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_the_same_options_write_the_same_bytes(name, models, pinned, tmp_path):
    got = sha256(make(name, models, tmp_path))
    if UPDATE:
        pinned["hashes"][name] = got
    assert got == pinned["hashes"].get(name), f"{name}: the file's bytes changed"


@pytest.mark.slow
def test_a_healed_file_keeps_its_bytes(models, pinned, tmp_path):
    from vlora_compress.heal.distill import HealConfig, heal

    start = make("minilm-free-chain", models, tmp_path)
    healed = tmp_path / "healed.vlora.safetensors"
    torch.manual_seed(0)
    heal(start, models["minilm"], CALIB, healed, HealConfig(steps=2, batch_size=4, max_length=32, eval_samples=4,
                                                            local_steps=0, device="cpu"))
    got = sha256(healed)
    if UPDATE:
        pinned["hashes"]["minilm-healed"] = got
    assert got == pinned["hashes"].get("minilm-healed"), "the healed file's bytes changed"
