"""Every layer a quantized base under its own low-rank increment, W ≈ Q + B A (CALDERA's form).

The base is the layer itself in ``base_quant``'s integers (rounded by GPTQ where calibrated); the
increment is fitted to what the rounding lost (fit/factorise.py, _fit_synthetic)."""

from __future__ import annotations

from ..plan import ChunkPlan
from .base import Candidate, Form, register

# --quantize auto: schemes of a quantized base under a low-rank increment (below 4 bits the mid-rise
# grids, measured better there: docs/planning.md)
QLR_BASES = ("int4", "int3-midrise", "int2-midrise")
QLR_FACTORS = "int4"  # and of its factors: twice int8's rank at equal bytes, measured better (docs/planning.md)


@register
class QuantizedBase(Form):
    name = "quantized + low rank"
    rounded = True  # the base's rounding, which the estimate does not see

    def label(self, cand: Candidate) -> str:
        return f"{cand.base_quant} + low rank"

    def asked(self, config, n_layers, quant, base):
        """Every layer over a quantized base of its own, where per-layer SVD is asked for with
        ``--base-quantize``."""
        if base == "none" and config.base_quantize is not None and config.method == "svd":
            return [candidate(quant, config.base_quantize)]
        return []

    def bit_candidates(self, config):
        """Under ``--quantize auto``, below 8 bits: a quantized base of each scheme under a low-rank
        increment that mends what its rounding lost."""
        return [candidate(QLR_FACTORS, q) for q in QLR_BASES] if config.quantize == "auto" else []

    def stores(self, chunk):
        """One layer over a base of its own (synthetic: made from the layer)."""
        return len(chunk.layers) == 1 and chunk.base == "synthetic" and chunk.topology in ("chain", "star")

    def chunks(self, fam, cand, rank, groups=None):
        return [ChunkPlan((layer,), (rank,), base="synthetic", topology="star") for layer in fam.layers]


def candidate(quant: str, base_quant: str) -> Candidate:
    return Candidate("quantized + low rank", quant, base_quant)
