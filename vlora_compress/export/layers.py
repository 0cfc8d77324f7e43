"""What a VLoRA file holds, as the layers a standard format can take: an integer (or float) weight,
and where the file has one, a low-rank increment on top (W = Q + B A) for a LoRA adapter.

A family is exportable when every chunk is one layer stored whole (dense: the layer is its own
base, in integers or floats) or one layer over a base of its own with a low-rank increment (the
quantized base under a low-rank increment, ``--base-quantize``). Chains, stars over a base that
several layers share, shared bases and low-rank factors with no base store what no standard
format holds exactly; ``holds`` says so per family, and ``--format transformers-remote`` runs them.

Integers are re-expressed, never rounded again: a mid-rise grid (``(q + 1/2)·s``) is the grid one
bit wider at half the scale (``(2q + 1)·(s/2)``, exact in float16 for every normal scale), and a
group that does not divide a row becomes several smaller groups that repeat its scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import VloraError
from ..fit.integers import BITS, MIDRISE, SCALE_SUFFIX
from ..io.fileformat import VloraFile
from ..forms.stored import form_of, walk
from ..plan import FamilyPlan

CONV1D_MODELS = {"gpt2"}  # model types whose Linear layers store (in, out): their integer groups run the other way


@dataclass(frozen=True)
class Layer:
    """One Linear of the file as a standard format sees it."""

    key: str  # the checkpoint key of its weight, ``<module>.weight``
    shape: tuple[int, int]  # (out, in)
    dtype: str  # the family's float dtype
    base: str  # the stored tensor that is its weight (or the base under its increment)
    scheme: str  # the base's scheme: none (float) or an integer scheme of fit/integers.py
    group_size: int
    factors: tuple[str, str] | None = None  # (B, A): the increment, for a LoRA adapter
    factor_scheme: str = "none"

    @property
    def module(self) -> str:
        return self.key[: -len(".weight")] if self.key.endswith(".weight") else self.key


def family_layers(fp: FamilyPlan) -> list[Layer] | str:
    """The family's layers, or why no standard format holds it."""
    out = []
    terms = list(walk(fp))
    for ci, chunk in enumerate(fp.chunks):
        mine = [t for t in terms if t.chunk == ci]
        shared = form_of(chunk).basis_side(chunk) is not None
        if len(chunk.layers) != 1 or shared:
            what = "shared bases" if shared else f"a {chunk.topology} over one base"
            return f"its chunks of {len(chunk.layers)} layers store {what}"
        base = mine[0]
        if base.base is None:
            return "low-rank factors over no base (per-layer low rank): no integer weight to hold"
        if base.layer is not None:  # the layer stored whole
            out.append(Layer(base.key, fp.shape, fp.dtype, base.base, fp.quant_of(base.base), fp.group_size))
            continue
        step = mine[1]
        if step.residual:
            return "residual factors"
        out.append(Layer(step.key, fp.shape, fp.dtype, base.base, fp.quant_of(base.base), fp.group_size,
                         step.factors, fp.quant if step.factors else "none"))
    return out


def file_layers(vfile: VloraFile) -> tuple[list[Layer], dict[str, str]]:
    """Every exportable layer of the file, and family name -> why it is not exportable."""
    layers, problems = [], {}
    for fp in vfile.plan.families:
        got = family_layers(fp)
        if isinstance(got, str):
            problems[fp.name] = got
        else:
            layers += got
    return layers, problems


@dataclass(frozen=True)
class Integers:
    """A layer's base as a standard symmetric grid: signed codes, float16 scales, bits, group."""

    codes: torch.Tensor  # int8 (out, in), in [-2^(bits-1), 2^(bits-1) - 1] (the top code unused)
    scale: torch.Tensor  # float16 (out, ceil(in / group)); int8: (out, 1)
    bits: int
    group_size: int  # the row for int8 (one scale a row)
    widened: bool  # a mid-rise grid held one bit wider at half the scale


def integers(vfile: VloraFile, layer: Layer) -> Integers:
    """The layer's base as codes and scales (a mid-rise grid widened by one bit)."""
    from ..runtime.packed import unpack_codes

    q, scale = vfile.checkpoint.read(layer.base), vfile.checkpoint.read(layer.base + SCALE_SUFFIX)
    rows, cols = layer.shape
    if layer.scheme == "int8":
        return Integers(q, scale, 8, cols, False)
    bits = BITS[layer.scheme]
    codes = unpack_codes(q, cols, bits).to(torch.int16) - (1 << (bits - 1))
    if layer.scheme in MIDRISE:
        half = scale.float() / 2
        if not bool((half >= torch.finfo(torch.float16).tiny).all()):
            raise VloraError(f"{vfile.path}: {layer.base}: a scale below float16's normal range has no exact half")
        return Integers((2 * codes + 1).to(torch.int8), half.to(torch.float16), bits + 1, layer.group_size, True)
    return Integers(codes.to(torch.int8), scale, bits, layer.group_size, False)


def regroup(ints: Integers, group: int) -> torch.Tensor:
    """The scales at a smaller ``group`` that divides both the file's group and the row: each of the
    file's groups repeated over the smaller ones it covers."""
    cols = ints.codes.shape[1]
    if ints.bits == 8 and ints.group_size == cols and group == cols:
        return ints.scale
    if ints.group_size % group or cols % group:
        raise ValueError(f"group {group} does not divide {ints.group_size} and {cols}")
    scale = ints.scale if ints.bits != 8 else ints.scale.expand(-1, math.ceil(cols / ints.group_size))
    return scale.repeat_interleave(ints.group_size // group, 1)[:, : cols // group].contiguous()


def common_group(layers: list[tuple[Layer, Integers]], sizes: tuple[int, ...]) -> int | None:
    """The largest of ``sizes`` that divides every layer's row and group, or None."""
    for g in sorted(sizes, reverse=True):
        if all(i.group_size % g == 0 and layer.shape[1] % g == 0 for layer, i in layers):
            return g
    return None


def increment(vfile: VloraFile, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of the layer's increment as float32 (integer factors dequantized: exact)."""
    b, a = layer.factors
    return vfile.get(b).float(), vfile.get(a).float()
