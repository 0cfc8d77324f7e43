"""Every layer whole: quantization alone (in integers), or the original (in its dtype)."""

from __future__ import annotations

from .base import Candidate, Form, dense_chunks, register


@register
class Dense(Form):
    name = "dense"
    ranked = False
    rounded = True  # its error is all rounding

    def label(self, cand: Candidate) -> str:
        return "dense"

    def stores(self, chunk):
        return len(chunk.layers) == 1 and chunk.base == chunk.layers[0]

    def chunks(self, fam, cand, rank, groups=None):
        return dense_chunks(fam.layers)


def candidate(quant: str) -> Candidate:
    return Candidate("dense", quant)
