"""Find layer stacks: tensors whose names differ only in one integer path component.

``model.layers.7.self_attn.q_proj.weight`` splits at its *first* integer component into the stack
prefix ``model.layers``, the layer ``7`` and the family suffix ``self_attn.q_proj.weight``. Taking the
first integer keeps later ones in the suffix, so MoE experts (``mlp.experts.3.w1.weight``) and T5's
sub-layers (``layer.1.DenseReluDense.wi.weight``) become families of their own, never layers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from ..io.checkpoint import FLOAT_DTYPES, ITEMSIZE, TensorInfo


@dataclass(frozen=True)
class Family:
    """One 2-D float tensor repeated over consecutive layers with one shape and dtype."""

    stack: str
    suffix: str
    layers: tuple[int, ...]
    shape: tuple[int, int]
    dtype: str

    def key(self, layer: int) -> str:
        return layer_key(self.stack, layer, self.suffix)

    @property
    def name(self) -> str:
        return layer_key(self.stack, "*", self.suffix)

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's tensor in the source."""
        return ITEMSIZE[self.dtype] * self.shape[0] * self.shape[1] * len(self.layers)


@dataclass(frozen=True)
class Stack:
    prefix: str
    layers: tuple[int, ...]
    families: tuple[Family, ...]
    keys: tuple[str, ...]  # every tensor of the stack, factorised or not


def layer_key(prefix: str, layer: int | str, suffix: str) -> str:
    return f"{prefix}.{layer}.{suffix}" if prefix else f"{layer}.{suffix}"


def split_key(key: str) -> tuple[str, int, str] | None:
    """(prefix, layer, suffix) at the first integer component, or None if there is none."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() and part.isascii():
            return ".".join(parts[:i]), int(part), ".".join(parts[i + 1 :])
    return None


def find_stacks(infos: Mapping[str, TensorInfo]) -> list[Stack]:
    """Stacks with at least one family of two or more layers, in order of first appearance."""
    by_prefix: dict[str, dict[int, dict[str, TensorInfo]]] = defaultdict(lambda: defaultdict(dict))
    for key, info in infos.items():
        parts = split_key(key)
        if parts is not None:
            prefix, layer, suffix = parts
            by_prefix[prefix][layer][suffix] = info

    stacks = []
    for prefix, layers in by_prefix.items():
        order = tuple(sorted(layers))
        if len(order) < 2:
            continue
        suffixes = dict.fromkeys(s for layer in order for s in layers[layer])
        families = [f for s in suffixes for f in _families(prefix, s, order, layers)]
        if families:
            keys = tuple(info.key for layer in order for info in layers[layer].values())
            stacks.append(Stack(prefix, order, tuple(families), keys))
    return stacks


def _families(prefix, suffix, order, layers) -> list[Family]:
    """Maximal runs of consecutive layers where ``suffix`` is a 2-D float tensor of one shape.

    A change of shape or dtype, or a layer without the tensor, ends a run: such layers are never
    forced into one family.
    """
    runs: list[list[TensorInfo]] = []
    for layer in order:
        info = layers[layer].get(suffix)
        if info is None or len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
            runs.append([])
            continue
        if runs and runs[-1] and (runs[-1][-1].shape, runs[-1][-1].dtype) == (info.shape, info.dtype):
            runs[-1].append(info)
        else:
            runs.append([info])
    out = []
    for run in runs:
        if len(run) >= 2:
            run_layers = tuple(split_key(i.key)[1] for i in run)
            out.append(Family(prefix, suffix, run_layers, run[0].shape, run[0].dtype))
    return out
