"""compressed-tensors ``pack-quantized``: the folder transformers loads with ``from_pretrained`` and
vLLM serves (its W8A16 and W4A16 kernels).

Per quantized Linear ``M``: ``M.weight_packed`` (int32, the row's codes ``q + 2^(b-1)`` as one
little-endian bit stream, least significant bit first, ``ceil(in·b/32)`` words a row: exactly the
file's own packing, in words instead of bytes), ``M.weight_scale`` (one scale a row for int8, the
``channel`` strategy; one a group for narrower grids) and ``M.weight_shape`` (``[out, in]``). One
config group per (bits, group), its targets the modules by name. Scales are written in float32
(float16 for a float16 model): exact, since a float16 scale is a float32 one.

compressed-tensors refuses a group that does not divide the row (576 inputs in groups of 128), so
such a layer is written at the largest group that divides both (64), each of the file's scales
repeated: the same numbers, more scale bytes (noted). Mid-rise grids are written one bit wider
(export/layers.py). The safetensors file is written whole, one tensor at a time from the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..io.checkpoint import DTYPES
from ..io.fileformat import VloraFile
from .base import ExportReport, Exporter, register, rest_of_model
from .folder import copy_model_files
from .layers import Integers, Layer, integers, regroup


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (rows, cols) -> int32 (rows, ceil(cols·bits/32)): ``q + 2^(bits-1)`` in one
    little-endian bit stream a row, least significant bit first."""
    from ..fit.integers import pack_bits

    rows, cols = codes.shape
    stream = ((codes.to(torch.int16) + 128).to(torch.uint8) if bits == 8 else pack_bits(codes, bits))
    words = math.ceil(cols * bits / 32)
    pad = words * 4 - stream.shape[1]
    if pad:
        stream = torch.cat([stream, stream.new_zeros(rows, pad)], 1)
    return stream.contiguous().view(torch.int32)


def _packed_bytes(shape, bits: int) -> int:
    return shape[0] * math.ceil(shape[1] * bits / 32) * 4


def layer_group(ints: Integers) -> int | None:
    """The group the format stores: int8's whole row (None: the channel strategy), else the largest
    group dividing both the file's group and the row."""
    if ints.bits == 8:
        return None
    return math.gcd(ints.group_size, ints.codes.shape[1])


def weight_args(bits: int, group: int | None) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel" if group is None else "group",
            "group_size": group, "dynamic": False, "actorder": None, "block_structure": None,
            "observer": "minmax", "observer_kwargs": {}}


@register
class CompressedTensors(Exporter):
    name = "compressed-tensors"

    def write(self, vfile: VloraFile, layers: list[Layer], folder: Path, config_dir: Path,
              report: ExportReport, pre_tokenizer: str | None = None) -> None:
        from safetensors.torch import save_file

        tensors = rest_of_model(vfile, layers, report)
        groups: dict[tuple[int, int | None], list[str]] = {}
        for layer in layers:
            if layer.scheme == "none":
                continue
            ints = integers(vfile, layer)
            group = layer_group(ints)
            scale = ints.scale if group is None else regroup(ints, group)
            dtype = torch.float16 if DTYPES[layer.dtype] == torch.float16 else torch.float32
            if group is not None and group != ints.group_size:
                report.note(f"groups of {ints.group_size} written as groups of {group}, each scale repeated "
                            "(compressed-tensors needs a group that divides the row)", layer.key,
                            2 * (scale.numel() - ints.scale.numel()))
            if ints.widened:
                report.note(f"{layer.scheme} written as {ints.bits}-bit codes at half the scale (exact)", layer.key,
                            _packed_bytes(ints.codes.shape, ints.bits) - _packed_bytes(ints.codes.shape, ints.bits - 1))
            tensors[layer.module + ".weight_packed"] = pack_int32(ints.codes, ints.bits)
            tensors[layer.module + ".weight_scale"] = scale.to(dtype)
            tensors[layer.module + ".weight_shape"] = torch.tensor(layer.shape, dtype=torch.int64)
            groups.setdefault((ints.bits, group), []).append(layer.module)
        config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                  "config_groups": {f"group_{i}": {"targets": [f"re:^{m.replace('.', '[.]')}$" for m in modules],
                                                   "weights": weight_args(bits, group), "input_activations": None,
                                                   "output_activations": None}
                                    for i, ((bits, group), modules) in enumerate(sorted(groups.items(), key=str))},
                  "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None,
                  "sparsity_config": {}, "transform_config": {}}
        copy_model_files(config_dir, folder, {"quantization_config": config})
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
