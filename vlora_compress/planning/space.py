"""The search space: which forms, storages and chunk counts the config asks the planner to weigh
for a family (``candidates``), and the one form whose bytes set every candidate's budget
(``reference``: the form asked for, auto read as first-layer bases in a chain). Every other module
asks these two; nothing else reads `method`, `base` or `topology` to find a form."""

from __future__ import annotations

from ..config import CompressConfig
from ..fit.integers import AUTO_SCHEMES
from ..forms import Candidate, dense, per_layer, quantized_base, shared, vlora
from ..forms.shared import SHARED_GROUPS
from ..forms.vlora import MAX_AUTO_CHUNKS
from ..plan import SHARED

AUTO_BASES = ("first", "mean", "none")  # "best" costs a fit per layer of every chunk: ask for it by name
DENSE_SCHEMES = ("int8", "int4", "int3", "int2")  # --quantize auto: every layer dense (mid-rise grids alone measure worse)
# --quantize auto: schemes of a quantized base under a low-rank increment (below 4 bits the mid-rise
# grids, measured better there: docs/planning.md)
QLR_BASES = ("int4", "int3-midrise", "int2-midrise")
QLR_FACTORS = "int4"  # and of its factors: twice int8's rank at equal bytes, measured better (docs/planning.md)


def candidates(config: CompressConfig, n_layers: int) -> list[Candidate]:
    """Every candidate the planner weighs for a family of ``n_layers``, in the order it tries them
    (which decides ties): for each storage, VLoRA for each base, topology and chunk count, then
    per-layer SVD (or with ``base_quantize``, a quantized base under low rank) and shared bases;
    then, with no base or chunk count pinned, every layer dense, and under ``--quantize auto``
    quantized bases under low rank of each scheme."""
    base = "none" if config.method == "svd" else config.base
    bases = list(AUTO_BASES) if base == "auto" else [base]
    topologies = ["chain", "star"] if config.topology == "auto" else [config.topology]
    counts = [config.chunks] if config.chunks else list(range(1, min(MAX_AUTO_CHUNKS, n_layers) + 1))
    schemes = AUTO_SCHEMES if config.quantize == "auto" else (config.quantize,)  # auto: more rank, or fewer bits
    out = []
    bq = config.base_quantize
    for q in schemes:
        for b in bases:
            if b == "none" and bq is not None and config.method == "svd":  # every layer W ≈ Q + B A
                out.append(quantized_base.candidate(q, bq))
            elif b == "none":
                if config.topology not in SHARED:
                    out.append(per_layer.candidate(q))
                out += _shared(config, n_layers, q)
            else:
                out += [vlora.candidate(b, t, k, q, bq) for t in topologies if t not in SHARED for k in counts
                        if k <= n_layers]
    if base == "auto" and not config.chunks:
        # quantization alone, the yardstick, as a choice: every layer dense in the scheme, or under
        # auto in each (bits as a choice), with below 8 bits a dense layer under a low-rank increment
        # that mends what its rounding lost (W ≈ Q + B A)
        out += [dense.candidate(q) for q in (DENSE_SCHEMES if config.quantize == "auto" else schemes) if q != "none"]
        if config.quantize == "auto":
            out += [quantized_base.candidate(QLR_FACTORS, q) for q in QLR_BASES]
    return out


def _shared(config: CompressConfig, n_layers: int, quant: str) -> list[Candidate]:
    """Shared bases: the side asked for, or under ``shared`` both sides, each in groups of at most
    2, 3 or 4 layers (or ``--chunks`` groups), adjacent or by similarity, with or without residual
    factors."""
    sides = [config.topology] if config.topology in SHARED else list(SHARED) if config.shared else []
    if not sides or config.topology not in SHARED + ("auto",):
        return []
    groups = ([config.chunks] if config.chunks and config.topology in SHARED
              else sorted({-(-n_layers // size) for size in SHARED_GROUPS}))  # at most size each
    return [shared.candidate(t, k, quant, g, res) for t in sides for k in groups if 1 <= k and 2 * k <= n_layers
            for g in ("adjacent", "similar") for res in (False, True)]


def reference(config: CompressConfig, n_layers: int) -> Candidate:
    """The form the config asks for, whose bytes at ``config.rank`` set every candidate's budget:
    ``auto`` read as first-layer bases in a chain, no ``--chunks`` as one chunk (at most one a
    layer). ``method`` dense is every layer dense; svd, or base none, every layer its own factors
    (over a quantized base of its own with ``base_quantize``)."""
    if config.method == "dense":
        return dense.candidate(config.family_scheme)
    chunks = min(config.chunks or 1, n_layers)
    if config.topology in SHARED:
        return shared.candidate(config.topology, chunks, config.family_scheme)
    base = "none" if config.method == "svd" else "first" if config.base == "auto" else config.base
    if base == "none":
        return (quantized_base.candidate(config.family_scheme, config.base_quantize)
                if config.base_quantize is not None else per_layer.candidate(config.family_scheme))
    topology = "chain" if config.topology == "auto" else config.topology
    return vlora.candidate(base, topology, chunks, config.family_scheme, config.base_quantize)


def needs_measurement(config: CompressConfig) -> bool:
    """Whether the plan needs the weights: a form to choose, chunk bounds to place or a base to pick."""
    base = "none" if config.method == "svd" else config.base
    if config.method == "dense":
        return False
    if config.quantize == "auto":
        return True
    if base == "none":
        return False
    if "auto" in (base, config.topology) or config.chunks is None or base in ("mean", "best"):
        return True
    return config.bounds == "dp" and config.chunks > 1
