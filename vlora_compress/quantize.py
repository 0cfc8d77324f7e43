"""Integer storage of bases and factors: int8 per row, int4 per group of a row, two values a byte.

Round-to-nearest, symmetric, with float16 scales beside the integers, all plain safetensors:

- int8: one scale per row (the output channel of a Linear weight and of a B factor), ``q`` in
  [-127, 127], ``x ≈ q · scale``;
- int4: one scale per group of ``group_size`` consecutive values in a row (the last group may be
  shorter), ``q`` in [-7, 7] stored as ``q + 8`` in a nibble, even columns in the low nibble and odd
  columns in the high one; a row of odd length is padded with one zero nibble.

The few lines here are the whole scheme: a library (torchao, bitsandbytes) would bring its own
tensor subclasses or CUDA kernels and a layout this file format would have to follow, while the
VLoRA file only needs integers and scales that any safetensors reader can take apart.
"""

from __future__ import annotations

import math

import torch

from .errors import VloraError

SCHEMES = ("none", "int8", "int4")
LEVELS = {"int8": 127, "int4": 7}
SCALE_DTYPE = torch.float16
SCALE_TAG = "F16"
SCALE_SUFFIX = ".scale"


def packed_shape(shape: tuple[int, int], scheme: str) -> tuple[int, int]:
    rows, cols = shape
    return (rows, cols) if scheme == "int8" else (rows, (cols + 1) // 2)


def scale_shape(shape: tuple[int, int], scheme: str, group_size: int) -> tuple[int, int]:
    rows, cols = shape
    return (rows, 1) if scheme == "int8" else (rows, math.ceil(cols / group_size))


def storage_tag(scheme: str) -> str:
    """The safetensors dtype of the integers."""
    return "I8" if scheme == "int8" else "U8"


def nbytes(shape: tuple[int, int], scheme: str, group_size: int) -> int:
    """Bytes of integers and scales for a ``shape`` matrix."""
    p, s = packed_shape(shape, scheme), scale_shape(shape, scheme, group_size)
    return p[0] * p[1] + 2 * s[0] * s[1]


def quantize(x: torch.Tensor, scheme: str, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers, float16 scales) of a 2-D tensor."""
    x = x.float()
    rows, cols = x.shape
    level = LEVELS[scheme]
    groups = _grouped(x, scheme, group_size)  # (rows, n_groups, g)
    scale = (groups.abs().amax(-1) / level).to(SCALE_DTYPE)
    # a scale that underflows float16 (or an all-zero group) would divide by zero: 1 stores zeros exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / scale.float()[..., None]).clamp(-level, level)
    q = q.reshape(rows, -1)[:, :cols]
    if scheme == "int8":
        return q.to(torch.int8).contiguous(), scale
    return pack_int4(q.to(torch.int8)), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], scheme: str,
               group_size: int = 128, name: str = "tensor") -> torch.Tensor:
    """float32 values of stored integers; refuses scales that no quantize call could have written."""
    rows, cols = shape
    if tuple(q.shape) != packed_shape(shape, scheme) or tuple(scale.shape) != scale_shape(shape, scheme, group_size):
        raise VloraError(f"{name}: packed size {list(q.shape)} with scales {list(scale.shape)} does not hold "
                         f"a {list(shape)} {scheme} matrix")
    s = scale.float()
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise VloraError(f"{name}: corrupted scales (not finite and positive)")
    values = q.float() if scheme == "int8" else unpack_int4(q, cols).float()
    return (_grouped(values, scheme, group_size) * s[..., None]).reshape(rows, -1)[:, :cols]


def fake_quantize(x: torch.Tensor, scheme: str, group_size: int = 128) -> torch.Tensor:
    """What the stored matrix reads back as: the closed-loop fit works from this."""
    if scheme == "none":
        return x.float()
    q, s = quantize(x, scheme, group_size)
    return dequantize(q, s, tuple(x.shape), scheme, group_size)


def straight_through(x: torch.Tensor, scheme: str, group_size: int = 128) -> torch.Tensor:
    """Forward: the stored (quantized) values; backward: the identity, so float master weights train
    against exactly what the file will hold (quantization-aware healing)."""
    if scheme == "none":
        return x
    with torch.no_grad():
        target = fake_quantize(x.detach(), scheme, group_size).to(x.dtype)
    return x + (target - x).detach()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] -> uint8, two per byte (even column low nibble)."""
    rows, cols = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if cols % 2:
        u = torch.cat([u, u.new_full((rows, 1), 8)], 1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], -1).reshape(packed.shape[0], -1)[:, :cols]


def _grouped(x: torch.Tensor, scheme: str, group_size: int) -> torch.Tensor:
    rows, cols = x.shape
    if scheme == "int8":
        return x[:, None, :]
    if cols % group_size == 0:
        return x.reshape(rows, cols // group_size, group_size)
    n_groups = math.ceil(cols / group_size)
    padded = x.new_zeros(rows, n_groups * group_size)
    padded[:, :cols] = x
    return padded.reshape(rows, n_groups, group_size)


def check_scheme(scheme: str, group_size: int) -> None:
    if scheme not in SCHEMES:
        raise VloraError(f"`quantize` must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    if group_size < 2 or group_size % 2:
        raise VloraError(f"`group_size` must be an even number of at least 2, not {group_size}")
