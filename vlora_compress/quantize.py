"""Integer storage of bases and factors: int8 per row, int4 per group of a row, two values a byte.

Symmetric, with float16 scales beside the integers, all plain safetensors; the integers rounded to
nearest, or with calibration chosen by GPTQ against the inputs' Grams (``gptq``):

- int8: one scale per row (the output channel of a Linear weight and of a B factor), ``q`` in
  [-127, 127], ``x ≈ q · scale``;
- int4: one scale per group of ``group_size`` consecutive values in a row (the last group may be
  shorter), ``q`` in [-7, 7] stored as ``q + 8`` in a nibble, even columns in the low nibble and odd
  columns in the high one; a row of odd length is padded with one zero nibble.

The few lines here are the whole scheme: a library (torchao, bitsandbytes) would bring its own
tensor subclasses or CUDA kernels and a layout this file format would have to follow, while the
VLoRA file only needs integers and scales that any safetensors reader can take apart. GPTQ
likewise: torchao's, llm-compressor's and GPTQModel's each run their own hooks over a whole model
and write their own layouts and kernels, while here the Grams already exist (calibrate.py,
sequential.py) and only the choice of integers changes: a few dozen lines on them.
"""

from __future__ import annotations

import math

import torch

from .errors import VloraError

SCHEMES = ("none", "int8", "int4", "int3", "int2")
AUTO_SCHEMES = ("none", "int8", "int4")  # what --quantize auto weighs (below 4 bits, round-off dominates)
BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
LEVELS = {"int8": 127, "int4": 7, "int3": 3, "int2": 1}  # symmetric: q in [-level, level]
SCALE_DTYPE = torch.float16
SCALE_TAG = "F16"
SCALE_SUFFIX = ".scale"


def packed_shape(shape: tuple[int, int], scheme: str) -> tuple[int, int]:
    rows, cols = shape
    return (rows, cols) if scheme == "int8" else (rows, math.ceil(cols * BITS[scheme] / 8))


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


def quantize(x: torch.Tensor, scheme: str, group_size: int = 128,
             hessian: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers, float16 scales) of a 2-D tensor.

    ``hessian`` = (U, order, side) chooses the integers by GPTQ instead of rounding each to
    nearest: the inputs are rounded in ``order``, U is the upper Cholesky factor of H⁻¹ in that
    order for the inputs' Hessian H = XᵀX + δI (factorise.Whitener.hessian), and ``side`` says
    where the input dimension is (1: columns, as nn.Linear stores (out, in); 0: rows, as Conv1D
    stores (in, out)). The scales are round-to-nearest's either way, fixed before rounding (GPTQ's
    static groups), so the stored layout is the same."""
    x = x.float()
    rows, cols = x.shape
    level = LEVELS[scheme]
    groups = _grouped(x, scheme, group_size)  # (rows, n_groups, g)
    scale = (groups.abs().amax(-1) / level).to(SCALE_DTYPE)
    # a scale that underflows float16 (or an all-zero group) would divide by zero: 1 stores zeros exactly
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if hessian is None:
        q = torch.round(groups / scale.float()[..., None]).clamp(-level, level)
        q = q.reshape(rows, -1)[:, :cols]
    else:
        per_value = _grouped(torch.ones_like(x), scheme, group_size) * scale.float()[..., None]
        per_value = per_value.reshape(rows, -1)[:, :cols]
        u, order, side = hessian
        w, step = (x, per_value) if side == 1 else (x.T, per_value.T)
        q = torch.empty_like(w)
        q[:, order] = gptq(w[:, order], step[:, order], level, u)
        q = q if side == 1 else q.T
    if scheme == "int8":
        return q.to(torch.int8).contiguous(), scale
    return pack_bits(q.to(torch.int8), BITS[scheme]), scale


GPTQ_BLOCK = 128  # columns whose error is spread within the block before one update of the rest


def gptq(w: torch.Tensor, scale: torch.Tensor, level: int, u: torch.Tensor) -> torch.Tensor:
    """Integers for ``w`` (out x in) at fixed per-value ``scale``, chosen one input column at a time
    with each column's rounding error spread over the columns not yet rounded (GPTQ, Frantar et
    al. 2023: the optimal update under the Hessian H = XᵀX, read from the upper Cholesky factor
    ``u`` of H⁻¹). It minimises the layer's output error ‖(W − Ŵ)X‖ where round-to-nearest
    minimises the weight error. The column loop is the algorithm's own; the lazy block update
    makes the rest matrix products."""
    w = w.float().clone()
    u = u.to(w)
    rows, cols = w.shape
    q = torch.empty_like(w)
    for start in range(0, cols, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, cols)
        block = w[:, start:end]
        err = torch.empty_like(block)
        for j in range(end - start):
            c = start + j
            qj = torch.round(block[:, j] / scale[:, c]).clamp(-level, level)
            q[:, c] = qj
            e = (block[:, j] - qj * scale[:, c]) / u[c, c]
            block[:, j + 1:] -= e[:, None] * u[c, c + 1:end][None, :]
            err[:, j] = e
        w[:, end:] -= err @ u[start:end, end:]
    return q


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
    values = q.float() if scheme == "int8" else unpack_bits(q, cols, BITS[scheme]).float()
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


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values in [-2^(bits-1), 2^(bits-1) - 1] -> uint8, each row a little-endian bit stream
    of ``q + 2^(bits-1)``: value j in bits [bits·j, bits·(j+1)), least significant bit first. A row
    is padded with zero codes to a multiple of 8 values and cut to ceil(cols·bits / 8) bytes. For
    4 bits that is two values a byte, even column in the low nibble."""
    rows, cols = q.shape
    offset = 1 << (bits - 1)
    u = (q.to(torch.int16) + offset).to(torch.uint8)
    pad = -cols % 8
    if pad:
        u = torch.cat([u, u.new_full((rows, pad), offset)], 1)
    shifts = torch.arange(bits, dtype=torch.uint8, device=q.device)
    stream = ((u[..., None] >> shifts) & 1).reshape(rows, -1, 8)  # (rows, bytes, 8 bits)
    packed = (stream << torch.arange(8, dtype=torch.uint8, device=q.device)).sum(-1, dtype=torch.uint8)
    return packed[:, :math.ceil(cols * bits / 8)].contiguous()


def unpack_bits(packed: torch.Tensor, cols: int, bits: int) -> torch.Tensor:
    """pack_bits undone: ``cols`` int8 values a row."""
    rows = packed.shape[0]
    full = (cols + -cols % 8) * bits // 8
    if packed.shape[1] < full:
        packed = torch.cat([packed, packed.new_zeros((rows, full - packed.shape[1]))], 1)
    stream = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    codes = (stream.reshape(rows, -1, bits).to(torch.int16)
             << torch.arange(bits, dtype=torch.int16, device=packed.device)).sum(-1)
    return (codes[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] -> uint8, two per byte (even column low nibble)."""
    return pack_bits(q, 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    return unpack_bits(packed, cols, 4)


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
