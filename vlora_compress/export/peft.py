"""Low-rank increments over exported bases as a PEFT LoRA adapter (``adapter_config.json`` and
``adapter_model.safetensors``), which transformers + peft and vLLM's ``--enable-lora`` apply.

The weight is ``W = Q + B A`` exactly, so every consumer must scale ``B A`` by 1. PEFT scales a
module by ``lora_alpha / r`` with both looked up per module (``rank_pattern``, ``alpha_pattern``);
vLLM reads neither pattern and scales every module by the global ``lora_alpha / r``. So the global
``r`` and ``lora_alpha`` are both the largest rank, and each module of another rank gets that rank
as its own ``r`` and ``lora_alpha``: 1 in both. The factors are float32, the integer ones
dequantized (exact); PEFT's tensors are ``lora_A`` (r, in) and ``lora_B`` (out, r), named by the
module's path under ``base_model.model.``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io.fileformat import VloraFile
from .layers import Layer, increment

TASKS = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS"}


def adapter_tensors(vfile: VloraFile, layers: list[Layer]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (B, A) float32, for every layer with an increment of rank at least 1."""
    out = {}
    for layer in layers:
        if layer.factors is not None:
            b, a = increment(vfile, layer)
            if b.shape[1]:
                out[layer.module] = (b, a)
    return out


def write_adapter(vfile: VloraFile, layers: list[Layer], folder: Path, config: dict, report) -> None:
    from safetensors.torch import save_file

    factors = adapter_tensors(vfile, layers)
    if not factors:
        return
    folder.mkdir()
    ranks = {module: b.shape[1] for module, (b, _) in factors.items()}
    top = max(ranks.values())
    pattern = {f"^{module}": r for module, r in ranks.items() if r != top}
    arch = (config.get("architectures") or [""])[0]
    task = next((t for suffix, t in TASKS.items() if arch.endswith(suffix)), "FEATURE_EXTRACTION")
    adapter_config = {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": "..", "r": top, "lora_alpha": top,
        "rank_pattern": pattern, "alpha_pattern": pattern, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    tensors = {}
    for module, (b, a) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    for layer in layers:
        if layer.module in factors:
            b, a = factors[layer.module]
            stored = sum(vfile.checkpoint.infos[n].nbytes for n in _stored(vfile, layer))
            report.note("increment written as float32 in the adapter (LoRA adapters hold floats)", layer.module,
                        (b.numel() + a.numel()) * 4 - stored)


def _stored(vfile: VloraFile, layer: Layer) -> list[str]:
    names = list(layer.factors)
    return names + [n + ".scale" for n in names if n + ".scale" in vfile.checkpoint.infos]
