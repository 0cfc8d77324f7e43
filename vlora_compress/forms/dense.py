"""Every layer whole: quantization alone (in integers), or the original (in its dtype)."""

from __future__ import annotations

from .base import Candidate, Form, dense_chunks, register

DENSE_SCHEMES = ("int8", "int4", "int3", "int2")  # --quantize auto: every layer dense (mid-rise grids alone measure worse)
# and in the store dtype (none): under the default plan 16-bit floats, the whole layer at half of float32


@register
class Dense(Form):
    name = "dense"
    ranked = False
    rounded = True  # its error is all rounding

    def label(self, cand: Candidate) -> str:
        return "dense"

    def bit_candidates(self, config):
        """Quantization alone, the yardstick, as a choice: every layer dense in the scheme asked for,
        or under ``--quantize auto`` in each (bits as a choice)."""
        schemes = DENSE_SCHEMES + ("none",) if config.quantize == "auto" else (config.family_scheme,)
        return [candidate(q) for q in schemes if q != "none" or config.quantize == "auto"]

    def stores(self, chunk):
        return len(chunk.layers) == 1 and chunk.base == chunk.layers[0]

    def chunks(self, fam, cand, rank, groups=None):
        return dense_chunks(fam.layers)


def candidate(quant: str, group_size: int | None = None) -> Candidate:
    """Every layer dense in ``quant``, its scales ``group_size`` values apart (None: the config's)."""
    return Candidate("dense", quant, group_size=group_size)
