"""Integer storage of bases and factors: int8 per row, int4 per group of a row, two values a byte.

Symmetric, with float16 scales beside the integers, all plain safetensors; the integers rounded to
nearest, or with calibration chosen by GPTQ against the inputs' Grams (``gptq``):

- int8: one scale per row (the output channel of a Linear weight and of a B factor), ``q`` in
  [-127, 127], ``x ≈ q · scale``;
- int4: one scale per group of ``group_size`` consecutive values in a row (the last group may be
  shorter), ``q`` in [-7, 7] stored as ``q + 8`` in a nibble, even columns in the low nibble and odd
  columns in the high one; a row of odd length is padded with one zero nibble;
- int3, int2: groups as int4, ``q`` in [-3, 3] or [-1, 1], three or two bits a value in a
  little-endian bit stream; int3-midrise, int2-midrise: the same with half-integer ``q`` that use
  every code (int2-midrise: ±1/2, ±3/2), no zero level (docs/format.md, sections 9 and 12).

The few lines here are the whole scheme: a library (torchao, bitsandbytes) would bring its own
tensor subclasses or CUDA kernels and a layout this file format would have to follow, while the
VLoRA file only needs integers and scales that any safetensors reader can take apart. GPTQ
likewise: torchao's, llm-compressor's and GPTQModel's each run their own hooks over a whole model
and write their own layouts and kernels, while here the Grams already exist (calibrate/grams.py,
pipelines/sequential.py) and only the choice of integers changes: a few dozen lines on them.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from contextlib import contextmanager

import torch

from ..errors import VloraError

SCHEMES = ("none", "int8", "int4", "int3", "int2", "int3-midrise", "int2-midrise")
AUTO_SCHEMES = ("none", "int8", "int4")  # what --quantize auto weighs (below 4 bits, round-off dominates)
BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2, "int3-midrise": 3, "int2-midrise": 2}
LEVELS = {"int8": 127, "int4": 7, "int3": 3, "int2": 1, "int3-midrise": 3, "int2-midrise": 1}  # q in [-level, level]; mid-rise: half a step more (top)
# mid-rise grids use every code: q in {-L-1/2, ..., L+1/2} (int2-midrise: ±1/2, ±3/2), stored as q - 1/2,
# with no zero level, where the mid-tread int2 (-1, 0, 1) leaves one of four codes unused and int3
# one of eight. Alone they measure worse end to end (a group's many small values lose their exact
# zero); as the base under a low-rank increment, better (docs/planning.md)
MIDRISE = {"int3-midrise", "int2-midrise"}
SCALE_DTYPE = torch.float16
SCALE_TAG = "F16"
SCALE_SUFFIX = ".scale"


def top(scheme: str) -> float:
    """The largest grid value: max|x| / scale at max-abs scales."""
    return LEVELS[scheme] + (0.5 if scheme in MIDRISE else 0.0)


def to_grid(v: torch.Tensor, scheme: str) -> torch.Tensor:
    """``v`` (values over their scale) rounded to the nearest grid value, as floats."""
    t = top(scheme)
    if scheme in MIDRISE:
        return (torch.floor(v) + 0.5).clamp_(-t, t)
    return torch.round(v).clamp_(-t, t)


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


def quantize(x: torch.Tensor, scheme: str, group_size: int = 128, hessian: tuple | None = None,
             scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers, float16 scales) of a 2-D tensor.

    ``hessian`` = (U, order, side[, diagonal]) chooses the integers by GPTQ instead of rounding
    each to nearest: the inputs are rounded in ``order``, U is the upper Cholesky factor of H⁻¹ in
    that order for the inputs' Hessian H = XᵀX + δI (fit/svd.Whitener.hessian), and ``side``
    says where the input dimension is (1: columns, as nn.Linear stores (out, in); 0: rows, as
    Conv1D stores (in, out)). The scales are fixed before rounding (GPTQ's static groups), so the
    stored layout is the same: max|x|/L, or below 8 bits searched scales (_scales, weighted by
    H's ``diagonal``) where GPTQ then leaves less output error; round-to-nearest takes max|x|/L.
    ``scale`` given (a file's own, as healing writes back to it) is used as it is."""
    x = x.float()
    key = _memo_key(x, scheme, group_size, hessian, scale)
    if key is not None and key in _MEMO:
        q, s = _MEMO[key]
        return q.clone(), s.clone()
    q, s = _quantize(x, scheme, group_size, hessian, scale)
    if key is not None and _MEMO_BYTES[0] + q.nbytes + s.nbytes <= MEMO_LIMIT:
        _MEMO[key] = q.clone(), s.clone()
        _MEMO_BYTES[0] += q.nbytes + s.nbytes
    return q, s


# Rounding by GPTQ is most of a plan's time under --quantize auto, and the planner asks for the same
# rounding many times: a layer dense in int4 and as the int4 base under low rank, again in rank
# allocation, again at every point of a sweep. Within ``rounding_memo`` each is made once: keyed by
# the bytes of the matrix, the Hessian's factor and order, the scheme and any fixed scales.
_MEMO: dict = {}
_MEMO_BYTES = [0]
_MEMO_ON = [0]
MEMO_LIMIT = 2 << 30  # bytes of integers and scales kept; past it, new roundings are not kept


@contextmanager
def rounding_memo():
    """GPTQ's integers for the same inputs made once while inside (nested: the outermost clears)."""
    _MEMO_ON[0] += 1
    try:
        yield
    finally:
        _MEMO_ON[0] -= 1
        if not _MEMO_ON[0]:
            _MEMO.clear()
            _HESSIAN_DIGESTS.clear()
            _MEMO_BYTES[0] = 0


def _digest(t: torch.Tensor) -> bytes:
    data = t.detach().to("cpu").contiguous()
    return hashlib.blake2b(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"",
                           digest_size=16).digest() + str((data.dtype, tuple(data.shape))).encode()


_HESSIAN_DIGESTS: dict[int, tuple] = {}  # id(hessian) -> (weakref to its U, its digest), while the memo is on


def _hessian_digest(hessian) -> tuple:
    """The digest of a Hessian tuple, made once per tuple while the memo is on: a layer's Whitener
    hands out the same one to every rounding of the layer, and digesting its n x n factor each time
    cost a tenth of SmolLM2's planning. Only a weak reference to the factor is kept beside the
    digest, so the Grams' cache still frees it (a 7B layer's is GBs); a freed factor, or a new tuple
    under an old id, is digested again."""
    kept = _HESSIAN_DIGESTS.get(id(hessian))
    if kept is None or kept[0]() is not hessian[0]:
        kept = (weakref.ref(hessian[0]), (hessian[2], *(_digest(h) for h in (hessian[0], hessian[1])),
                                          _digest(hessian[3]) if len(hessian) > 3 else None))
        _HESSIAN_DIGESTS[id(hessian)] = kept
    return kept[1]


def _memo_key(x, scheme: str, group_size: int, hessian, scale) -> tuple | None:
    if not _MEMO_ON[0] or hessian is None:  # rounding to nearest costs less than its key
        return None
    return (_digest(x), scheme, group_size, *_hessian_digest(hessian),
            _digest(scale) if scale is not None else None)


def _quantize(x: torch.Tensor, scheme: str, group_size: int, hessian, scale) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    groups = _grouped(x, scheme, group_size)  # (rows, n_groups, g)
    fixed = scale is not None
    scale = _scales(groups, scheme) if scale is None else scale.to(device=x.device, dtype=SCALE_DTYPE)
    if hessian is None:
        q = to_grid(groups / scale.float()[..., None], scheme)
        q = q.reshape(rows, -1)[:, :cols]
    else:
        search = CLIP and scheme != "int8" and not fixed  # searched scales too: kept where GPTQ then does better
        scales = [scale]
        if search:
            weights = None  # each value's error weighted by how strongly the layer reads its input
            if len(hessian) > 3 and hessian[2] == 1:
                weights = _grouped(hessian[3].to(x)[None, :], scheme, group_size)
            searched = _scales(groups, scheme, search=True, weights=weights)
            scales += [] if torch.equal(searched, scale) else [searched]
        # both scales' integers in one GPTQ pass (its rows are independent: one column loop for both)
        found = _gptq_at(x, scales, scheme, group_size, hessian, measure=len(scales) > 1)
        (q, err), scale = found[0], scales[0]
        if len(found) > 1 and found[1][1] < err:
            q, scale = found[1][0], scales[1]
    if scheme == "int8":
        return q.to(torch.int8).contiguous(), scale
    if scheme in MIDRISE:
        q = q - 0.5  # half-integers to integers in [-2^(bits-1), 2^(bits-1) - 1]
    return pack_bits(q.to(torch.int8), BITS[scheme]), scale


def _gptq_at(x: torch.Tensor, scales: list[torch.Tensor], scheme: str, group_size: int, hessian,
             measure: bool = True) -> list[tuple[torch.Tensor, float]]:
    """Per scale of ``scales``: (integers GPTQ chooses at it, the output error they leave,
    tr(ΔW H ΔWᵀ) = ||ΔW U⁻¹||² with H⁻¹ = UᵀU in GPTQ's order; NaN without ``measure``: the solve
    costs about what GPTQ does). GPTQ's rows are independent, so every scale's rows are stacked and
    rounded in one pass."""
    rows, cols = x.shape
    u, order, side = hessian[:3]
    steps = []
    for scale in scales:
        per_value = _grouped(torch.ones_like(x), scheme, group_size) * scale.float()[..., None]
        steps.append(per_value.reshape(rows, -1)[:, :cols])
    w = (x if side == 1 else x.T)[:, order]
    step = torch.cat([(s if side == 1 else s.T)[:, order] for s in steps])
    q_all = gptq(w.repeat(len(scales), 1), step, scheme, u)
    out = []
    for i in range(len(scales)):
        q_ordered, at = q_all[i * len(w):(i + 1) * len(w)], step[i * len(w):(i + 1) * len(w)]
        err = math.nan
        if measure:
            delta = (w - q_ordered * at).double()
            err = float(torch.linalg.solve_triangular(u.to(delta), delta, upper=True, left=False).square().sum())
        q = torch.empty_like(w)
        q[:, order] = q_ordered
        out.append(((q if side == 1 else q.T), err))
    return out


CLIP_GRID = 20  # scales tried per group, from max|x|/level down to CLIP_LOW of it
CLIP_LOW = 0.5
CLIP = True


def _scales(groups: torch.Tensor, scheme: str, search: bool = False, weights: torch.Tensor | None = None) -> torch.Tensor:
    """float16 scales, one a group: max|x|/top, or with ``search`` of the scales from that down to
    CLIP_LOW of it the one whose rounding to nearest leaves the least squared error in the group,
    each value's error weighted by ``weights`` (its input's Hessian diagonal, so an input the layer
    reads strongly keeps its outliers). Clipping a few outliers buys a finer step for the rest; the
    caller (quantize, under GPTQ) keeps the searched scales only where GPTQ's output error with them
    is lower, as it is not always (a heavy-tailed int4 matrix may need its outliers)."""
    peak, level = groups.abs().amax(-1), top(scheme)
    best = (peak / level).to(SCALE_DTYPE)
    if search:
        best_err = None
        for alpha in torch.linspace(1.0, CLIP_LOW, CLIP_GRID).tolist():
            s = (alpha * peak / level).to(SCALE_DTYPE)
            s = torch.where(s > 0, s, torch.ones_like(s)).float()[..., None]
            err = to_grid(groups / s, scheme).mul_(s).sub_(groups).square_()
            err = (err if weights is None else err.mul_(weights)).sum(-1)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best = torch.where(better, s[..., 0].to(SCALE_DTYPE), best)
                best_err = torch.where(better, err, best_err)
    # a scale that underflows float16 (or an all-zero group) would divide by zero. 1 stores zeros exactly
    # on a grid with a zero; a mid-rise grid has none, and stores them as ±tiny/2 at the least normal scale
    floor = torch.finfo(SCALE_DTYPE).tiny if scheme in MIDRISE else 1.0
    return torch.where(best > 0, best, torch.full_like(best, floor))


GPTQ_BLOCK = 128  # columns whose error is spread within the block before one update of the rest


def gptq(w: torch.Tensor, scale: torch.Tensor, scheme: str, u: torch.Tensor) -> torch.Tensor:
    """Grid values for ``w`` (out x in) at fixed per-value ``scale``, chosen one input column at a time
    with each column's rounding error spread over the columns not yet rounded (GPTQ, Frantar et
    al. 2023: the optimal update under the Hessian H = XᵀX, read from the upper Cholesky factor
    ``u`` of H⁻¹). It minimises the layer's output error ‖(W − Ŵ)X‖ where round-to-nearest
    minimises the weight error. The column loop is the algorithm's own; the lazy block update
    makes the rest matrix products."""
    # columns as rows (contiguous), the per-column work in place: the loop is the algorithm's own, so
    # its cost is the number of small operations a column (half of it was temporaries and strided reads)
    wt = w.float().t().clone(memory_format=torch.contiguous_format)  # a copy: the loop writes into it
    st = scale.float().t().contiguous()
    u = u.to(wt)
    cols = wt.shape[0]
    diagonal = u.diagonal().tolist()
    qt = torch.empty_like(wt)
    for start in range(0, cols, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, cols)
        block = wt[start:end]
        err = torch.empty_like(block)
        for j in range(end - start):
            c = start + j
            qj = to_grid(block[j] / st[c], scheme)
            qt[c] = qj
            e = err[j]
            torch.addcmul(block[j], qj, st[c], value=-1.0, out=e)
            e.div_(diagonal[c])
            if j + 1 < end - start:
                block[j + 1:].addr_(u[c, c + 1:end], e, alpha=-1.0)
        if end < cols:
            wt[end:].addmm_(u[start:end, end:].t(), err, alpha=-1.0)
    return qt.t().contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], scheme: str,
               group_size: int = 128, name: str = "tensor") -> torch.Tensor:
    """float32 values of stored integers; refuses scales that no quantize call could have written."""
    rows, cols = shape
    check_stored(q, scale, shape, scheme, group_size, name)
    s = scale.float()
    values = q.float() if scheme == "int8" else unpack_bits(q, cols, BITS[scheme]).float()
    if scheme in MIDRISE:
        values += 0.5
    return (_grouped(values, scheme, group_size) * s[..., None]).reshape(rows, -1)[:, :cols]


def check_stored(q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], scheme: str, group_size: int,
                 name: str) -> None:
    """Refuse integers and scales that no quantize call could have written for a ``shape`` matrix."""
    if tuple(q.shape) != packed_shape(shape, scheme) or tuple(scale.shape) != scale_shape(shape, scheme, group_size):
        raise VloraError(f"{name}: packed size {list(q.shape)} with scales {list(scale.shape)} does not hold "
                         f"a {list(shape)} {scheme} matrix")
    s = scale.float()
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise VloraError(f"{name}: corrupted scales (not finite and positive)")


def fake_quantize(x: torch.Tensor, scheme: str, group_size: int = 128, scale: torch.Tensor | None = None) -> torch.Tensor:
    """What the stored matrix reads back as (at ``scale`` where given): the closed-loop fit works from this."""
    if scheme == "none":
        return x.float()
    q, s = quantize(x, scheme, group_size, scale=scale)
    return dequantize(q, s, tuple(x.shape), scheme, group_size)


def straight_through(x: torch.Tensor, scheme: str, group_size: int = 128,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """Forward: the stored (quantized) values; backward: the identity, so float master weights train
    against exactly what the file will hold (quantization-aware healing). ``scale``: the file's
    scales, kept (healing trains the integers; searched scales would be lost to max-abs ones)."""
    if scheme == "none":
        return x
    with torch.no_grad():
        target = fake_quantize(x.detach(), scheme, group_size, scale).to(x.dtype)
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
