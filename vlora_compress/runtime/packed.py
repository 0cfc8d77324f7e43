"""Integer matrices held as the file stores them, dequantized one matrix at a time inside a forward.

A ``PackedMatrix`` keeps a base's or a factor's integers and float16 scales exactly as the VLoRA
file has them (docs/format.md, section 9: int8 one byte a value, int4/int3/int2 and the mid-rise
grids a little-endian bit stream per row), so a loaded model holds about the file's bytes. A
forward forms the float matrix it needs, uses it and lets it go: one layer's weight at a time.

Unpacking is a few whole-tensor operations (shifts and masks, eight 3-bit codes from each 24-bit
word), not fit/integers.unpack_bits' bit-by-bit reference, and gives the same values: float32
``(code - offset [+ 1/2]) × scale``, the numbers ``expand`` writes, so the packed model computes
what the expanded one does up to the order of float sums.

Where torch has a weight-only integer matmul for the scheme and device, ``linear`` uses it instead
of forming the weight: int8 per row is ``torch._weight_int8pack_mm`` (a CPU and CUDA kernel, the
layout this file already has: int8 rows and one scale a row). Torch's int4 kernels want their own
tile layout, group sizes that divide the row and bfloat16 activations; the file's int4 groups may
end short (a 576-wide row in groups of 128), so int4 and narrower grids are dequantized here (see
docs/export.md for the engines whose int4 kernels take an exported file).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import VloraError
from ..fit.integers import BITS, MIDRISE, check_stored


def unpack_codes(packed: torch.Tensor, cols: int, bits: int) -> torch.Tensor:
    """The unsigned codes of each row's bit stream, ``cols`` a row (uint8 or int32)."""
    rows = packed.shape[0]
    if bits in (2, 4):
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(rows, -1)[:, :cols]
    if bits == 3:  # eight codes in each three bytes, least significant bit first
        pad = -packed.shape[1] % 3
        if pad:
            packed = torch.cat([packed, packed.new_zeros(rows, pad)], 1)
        b = packed.reshape(rows, -1, 3).to(torch.int32)
        words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        return ((words[..., None] >> shifts) & 7).reshape(rows, -1)[:, :cols]
    raise VloraError(f"no packed layout of {bits} bits")


def dequantize_packed(q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], scheme: str,
                      group_size: int) -> torch.Tensor:
    """float32 values of stored integers (the numbers fit/integers.dequantize gives)."""
    rows, cols = shape
    if scheme == "int8":
        return q.float() * scale.float()
    bits = BITS[scheme]
    values = unpack_codes(q, cols, bits).float()
    values -= (1 << (bits - 1)) - (0.5 if scheme in MIDRISE else 0.0)
    s = scale.float()
    if cols % group_size == 0:
        return (values.view(rows, -1, group_size) * s[..., None]).view(rows, cols)
    return values * s.repeat_interleave(group_size, 1)[:, :cols]


class PackedMatrix(torch.nn.Module):
    """A matrix of the file held as its integers and scales (buffers), read as ``dtype`` floats.

    ``use_kernels()`` moves it to torch's weight-only integer matmuls (bfloat16 activations):
    int8 as it is stored, every narrower grid as int4 tiles (int3 and int2 widened to 4 bits, the
    mid-rise grids at twice their integers and half their scale, which is exact)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], scheme: str,
                 group_size: int, dtype: torch.dtype, name: str = "tensor"):
        super().__init__()
        shape = tuple(shape)
        check_stored(q, scale, shape, scheme, group_size, name)
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.shape, self.scheme, self.group_size, self.dtype = shape, scheme, group_size, dtype
        self.kernel: str | None = None  # "int8", "int4" (torch's kernels) or "bf16" (a factor as values) after use_kernels()
        self.kernel_group = 0

    def dequantize(self) -> torch.Tensor:
        """The whole matrix in its dtype (float32 products, then rounded, as expand writes it)."""
        if self.kernel == "bf16":
            return self.q.to(self.dtype)
        if self.kernel == "int4":  # the tiles are all it holds: read them back through the kernel
            eye = torch.eye(self.shape[1], dtype=torch.bfloat16, device=self.q.device)
            return torch._weight_int4pack_mm_for_cpu(eye, self.q, self.kernel_group, self.scale).T.to(self.dtype)
        s = self.scale.reshape(self.shape[0], -1)
        return dequantize_packed(self.q, s, self.shape, self.scheme, self.group_size).to(self.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (any shape) in its dtype, unpacking only those: an embedding lookup."""
        if self.kernel in ("int4", "bf16"):
            return self.dequantize()[index]
        flat = index.reshape(-1)
        q, s = self.q[flat], self.scale.reshape(self.shape[0], -1)[flat]
        out = dequantize_packed(q, s, (flat.numel(), self.shape[1]), self.scheme, self.group_size)
        return out.to(self.dtype).reshape(*index.shape, self.shape[1])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Wᵀ`` for W (out, in) as stored: by the integer kernel after ``use_kernels``, else
        with W formed for the call in ``x``'s dtype."""
        if self.kernel is None or x.requires_grad or x.device != self.q.device:
            return F.linear(x, self.dequantize().to(x.dtype))
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.kernel == "bf16":
            return F.linear(x.to(torch.bfloat16), self.q).to(x.dtype)
        if self.kernel == "int8":
            y = torch._weight_int8pack_mm(flat, self.q, self.scale)
        else:
            y = torch._weight_int4pack_mm_for_cpu(flat, self.q, self.kernel_group, self.scale)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    def use_kernels(self, thin: bool = False) -> bool:
        """Hold the matrix in the layout of torch's weight-only integer matmul for its scheme, where
        there is one here (CPU; int4 tiles need a group of 32 to 256 that divides both the row and
        the file's group); True if it moved. Activations and scales then run in bfloat16. ``thin``
        (a low-rank factor): what has no kernel is held as bfloat16 values instead, a few times its
        integers' bytes, which a factor can afford and forming it at every call cannot."""
        if self.kernel is not None or self.q.device.type != "cpu":
            return self.kernel is not None
        if self._use_kernel():
            return True
        if thin:
            self.q = self.dequantize().to(torch.bfloat16)
            self.scale = self.scale.new_empty(0)
            self.kernel = "bf16"
            return True
        return False

    def _use_kernel(self) -> bool:
        rows, cols = self.shape
        if self.scheme == "int8":
            # torch 2.13's CPU kernel on AVX512 takes rows that start 16-byte aligned: a row length
            # that is not a multiple of 16 (8, 24, 40, 72, 100 inputs) or integers read in place
            # from a file at an odd offset end in a segmentation fault. Such rows are formed per
            # call; the integers are copied to an aligned allocation of their own
            if not hasattr(torch, "_weight_int8pack_mm") or cols % 16:
                return False
            if self.q.data_ptr() % 64:
                self.q = self.q.clone(memory_format=torch.contiguous_format)
            self.scale = self.scale.reshape(-1).to(torch.bfloat16)
            self.kernel = "int8"
            return True
        group = next((g for g in (256, 128, 64, 32) if self.group_size % g == 0 and cols % g == 0), None)
        if group is None or not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
            return False
        bits = BITS[self.scheme]
        codes = unpack_codes(self.q, cols, bits).to(torch.int32) - (1 << (bits - 1))
        scale = self.scale.float()
        if self.scheme in MIDRISE:  # (q + 1/2)·s = (2q + 1)·(s/2)
            codes, scale = 2 * codes + 1, scale / 2
        scale = scale.repeat_interleave(self.group_size // group, 1)[:, :cols // group]
        try:
            self.q = torch._convert_weight_to_int4pack_for_cpu((codes + 8).contiguous(), 2)
        except RuntimeError:
            return False
        self.scale = torch.stack([scale.T, torch.zeros_like(scale.T)], -1).to(torch.bfloat16).contiguous()
        self.kernel, self.kernel_group = "int4", group
        return True

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def extra_repr(self) -> str:
        kernel = f", {self.kernel} kernel" if self.kernel else ""
        return f"{self.scheme}, {list(self.shape)}, group {self.group_size}{kernel}"


class PackedEmbedding(torch.nn.Module):
    """An embedding table stored in integers: a lookup unpacks only the rows it reads."""

    def __init__(self, matrix: PackedMatrix, padding_idx: int | None = None):
        super().__init__()
        self.matrix = matrix
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = matrix.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.matrix.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.matrix.rows(ids)


class PackedLinear(torch.nn.Module):
    """A Linear whose weight is stored in integers (a pass-through head, or one tied to a packed table)."""

    def __init__(self, matrix: PackedMatrix, bias: torch.Tensor | None = None):
        super().__init__()
        self.matrix = matrix
        self.bias = bias
        self.out_features, self.in_features = matrix.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.matrix.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matrix.linear(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)
