"""Every layer its own low-rank factors over a zero base: per-layer (whitened) SVD, the baseline."""

from __future__ import annotations

from ..plan import SHARED, ChunkPlan
from .base import Candidate, Form, register


@register
class PerLayer(Form):
    name = "per-layer"

    def label(self, cand: Candidate) -> str:
        return "per-layer SVD"

    def asked(self, config, n_layers, quant, base):
        """The baseline, wherever no base is asked for (``--method svd``, ``--base none``), unless a
        quantized base under each layer is (``--base-quantize``) or a shared basis is the topology."""
        pinned = config.base_quantize is not None and config.method == "svd"
        return [candidate(quant)] if base == "none" and not pinned and config.topology not in SHARED else []

    def stores(self, chunk):
        """Every layer over a zero base: a star, or one layer (a chain of one is the same)."""
        return chunk.base == "none" and (chunk.topology == "star" or chunk.topology == "chain" and len(chunk.layers) == 1)

    def chunks(self, fam, cand, rank, groups=None):
        return [ChunkPlan(fam.layers, (rank,) * len(fam.layers), base="none", topology="star")]


def candidate(quant: str = "none") -> Candidate:
    return Candidate("per-layer", quant)
