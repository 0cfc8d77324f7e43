"""The GPTQ v1 checkpoint layout, which transformers loads through gptqmodel (packed in memory) and
vLLM serves.

Per quantized Linear ``M``: ``M.qweight`` (int32 ``[in·b/32, out]``: each output's codes
``q + 2^(b-1)`` along the inputs as one little-endian bit stream, least significant bit first,
which is compressed-tensors' ``weight_packed`` transposed), ``M.qzeros`` (int32
``[groups, out·b/32]``, every zero ``2^(b-1)``, stored as v1 stores it, one less), ``M.scales``
(float16 ``[groups, out]``: the file's own scales) and ``M.g_idx`` (int32 ``[in]``, ``i // group``).
A GPTQ checkpoint has one bit width and one group size, so the file's integer layers must share a
scheme; int8 (one scale a row) is ``group_size`` -1. Rows must be a multiple of 32 inputs, as
GPTQ kernels pack them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..io.fileformat import VloraFile
from .base import ExportReport, Exporter, register, rest_of_model
from .compressed_tensors import pack_int32
from .folder import copy_model_files
from .layers import Layer, integers, regroup

BITS = (2, 3, 4, 8)


def _bits(layer: Layer) -> int:
    from ..fit.integers import BITS as SCHEME_BITS, MIDRISE

    return SCHEME_BITS[layer.scheme] + (layer.scheme in MIDRISE)


def _group(layer: Layer) -> int:
    return -1 if layer.scheme == "int8" else layer.group_size


@register
class Gptq(Exporter):
    name = "gptq"

    def problems(self, layers: list[Layer], config: dict | None) -> dict[str, str]:
        ints = [layer for layer in layers if layer.scheme != "none"]
        out = {}
        kinds = sorted({(_bits(layer), layer.scheme == "int8") for layer in ints})
        if len(kinds) > 1:
            out["schemes"] = f"one bit width a checkpoint, and this file has {', '.join(str(b) for b, _ in kinds)} bits"
        for layer in ints:
            rows, cols = layer.shape
            if cols % 32 or (rows * _bits(layer)) % 32:
                out[layer.key] = f"GPTQ packs 32 inputs a word and whole words of outputs; it is {rows} x {cols}"
        return out

    def write(self, vfile: VloraFile, layers: list[Layer], folder: Path, config_dir: Path,
              report: ExportReport, pre_tokenizer: str | None = None) -> None:
        from safetensors.torch import save_file

        tensors = rest_of_model(vfile, layers, report)
        ints = [layer for layer in layers if layer.scheme != "none"]
        bits = _bits(ints[0]) if ints else 4
        group = -1 if ints and ints[0].scheme == "int8" else math.gcd(*(x for layer in ints for x in (layer.group_size, layer.shape[1]))) if ints else 128
        for layer in ints:
            q = integers(vfile, layer)
            rows, cols = layer.shape
            scale = q.scale if group == -1 else regroup(q, group)
            if group not in (-1, q.group_size):
                report.note(f"groups of {q.group_size} written as groups of {group}, each scale repeated (one group "
                            "size a GPTQ checkpoint, dividing every row)", layer.key, 2 * (scale.numel() - q.scale.numel()))
            if q.widened:
                report.note(f"{layer.scheme} written as {q.bits}-bit codes at half the scale (exact)", layer.key,
                            rows * cols // 8)
            tensors[layer.module + ".qweight"] = pack_int32(q.codes, bits).T.contiguous()
            tensors[layer.module + ".qzeros"] = pack_int32(torch.full((scale.shape[1], rows), -1, dtype=torch.int8), bits)
            tensors[layer.module + ".scales"] = scale.T.contiguous().to(torch.float16)
            tensors[layer.module + ".g_idx"] = (torch.arange(cols, dtype=torch.int32) // (cols if group == -1 else group))
        quant = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": True,
                 "true_sequential": True, "lm_head": False, "checkpoint_format": "gptq", "format": "gptq",
                 "pack_dtype": "int32", "damp_percent": 0.01, "static_groups": False}
        copy_model_files(config_dir, folder, {"quantization_config": quant})
        (folder / "quantize_config.json").write_text(json.dumps(quant, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
