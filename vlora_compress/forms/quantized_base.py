"""Every layer a quantized base under its own low-rank increment, W ≈ Q + B A (CALDERA's form).

The base is the layer itself in ``base_quant``'s integers (rounded by GPTQ where calibrated); the
increment is fitted to what the rounding lost (fit/factorise.py, _fit_synthetic)."""

from __future__ import annotations

from ..plan import ChunkPlan
from .base import Candidate, Form, register


@register
class QuantizedBase(Form):
    name = "quantized + low rank"
    rounded = True  # the base's rounding, which the estimate does not see

    def label(self, cand: Candidate) -> str:
        return f"{cand.base_quant} + low rank"

    def stores(self, chunk):
        """One layer over a base of its own (synthetic: made from the layer)."""
        return len(chunk.layers) == 1 and chunk.base == "synthetic" and chunk.topology in ("chain", "star")

    def chunks(self, fam, cand, rank, groups=None):
        return [ChunkPlan((layer,), (rank,), base="synthetic", topology="star") for layer in fam.layers]


def candidate(quant: str, base_quant: str) -> Candidate:
    return Candidate("quantized + low rank", quant, base_quant)
