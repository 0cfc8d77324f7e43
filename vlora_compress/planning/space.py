"""The search space: which forms, storages and chunk counts the config asks the planner to weigh
for a family (``candidates``: each form lists its own, ``Form.asked`` and ``bit_candidates``, asked
here in one order), and the one form whose bytes set every candidate's budget (``reference``: the
form asked for, auto read as first-layer bases in a chain). Every other module asks these two;
outside the forms nothing else reads `method`, `base` or `topology` to find a form."""

from __future__ import annotations

from dataclasses import replace

from ..config import CompressConfig
from ..errors import VloraError
from ..fit.integers import AUTO_SCHEMES
from ..forms import FORMS, Candidate, candidate_bytes, dense, per_layer, quantized_base, shared, vlora
from ..plan import SHARED

AUTO_BASES = ("first", "mean", "none")  # "best" costs a fit per layer of every chunk: ask for it by name
# the order the forms are asked for their candidates in, which decides ties (the guard pins it): with
# no base, per-layer SVD (or the quantized base --base-quantize puts in its place) before shared
# bases; of the choices of bits, every layer dense before quantized bases under low rank
ORDER = tuple(FORMS[name] for name in ("dense", "per-layer", "quantized + low rank", "shared", "vlora"))


def candidates(config: CompressConfig, n_layers: int) -> list[Candidate]:
    """Every candidate the planner weighs for a family of ``n_layers``, in the order it tries them
    (which decides ties): for each storage and each base kind asked for, every form's own
    (``Form.asked``) in ``ORDER``: VLoRA over a layer or a mean for each topology and chunk count;
    with no base, per-layer SVD (or with ``--base-quantize``, a quantized base under low rank) and
    shared bases. Then, with no base or chunk count pinned, the choices of bits
    (``Form.bit_candidates``): every layer dense, and under ``--quantize auto`` quantized bases under
    low rank of each scheme."""
    base = "none" if config.method == "svd" else config.base
    bases = list(AUTO_BASES) if base == "auto" else [base]
    schemes = AUTO_SCHEMES if config.quantize == "auto" else (config.family_scheme,)  # auto: more rank, or fewer bits
    out = [c for q in schemes for b in bases for form in ORDER for c in form.asked(config, n_layers, q, b)]
    if base == "auto" and not config.chunks:
        out += [c for form in ORDER for c in form.bit_candidates(config)]
    return out


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


def default_storage(config: CompressConfig, calibrated: bool, stacks) -> tuple[CompressConfig, str | None]:
    """The config with ``quantize`` left unset (None) resolved, and the note that says so where the
    default plan weighs every storage: ``auto`` where the plan is calibrated and sized (calibration
    data, ``target_size`` or ``target_bits``) and the form is left to the planner (`method` vlora,
    `base`, `topology` and `chunks` auto, no `base_quantize`): every form and scheme at once, floats
    in 16 bits (``dtype`` fp16 for float32 families where no dtype is asked for). Otherwise
    ``none``: the storage is what was asked for (docs/planning.md, "The default plan")."""
    asked = config.quantize
    if asked is None:
        sized = config.target_size is not None or config.target_bits is not None or config.max_drop is not None
        free = (config.method == "vlora" and config.base == "auto" and config.topology == "auto"
                and config.chunks is None and config.base_quantize is None and config.planning != "blocks")
        if not (calibrated and sized and free):
            if config.quantize_passthrough:
                raise VloraError("`quantize_passthrough` needs `quantize` int8, int4, int3, int2 or auto")
            return replace(config, quantize="none"), None
        config = replace(config, quantize="auto")
    if config.quantize != "auto" or config.dtype is not None:
        return config, None
    # every storage weighed: floats in 16 bits, where a float32 factor would hold no more than rounding
    wide = all(f.dtype == "F32" for s in stacks for f in s.families)
    note = "floats stored in fp16 (--quantize auto, no --dtype)" if wide else None
    if asked is None:
        note = "the default plan: every storage weighed per family (--quantize auto)" + (
            f"; {note}" if note else "")
    return (replace(config, dtype="fp16") if wide else config), note


def worth_fitting(fam, cand: Candidate, budget: int, config: CompressConfig) -> bool:
    """Whether a candidate is worth a fit at ``budget``: not a quantized base under low rank where
    every layer fits dense in int8, which measures lower error (on all-MiniLM-L6-v2 at half the
    stack, int8 alone left 2e-6 to 5e-5 of each family's output error, an int4 base under int4 low
    rank filling the same bytes 9e-6 to 2e-4: docs/planning.md). The sizes a sweep starts at
    cost what dense candidates cost."""
    if cand.form != quantized_base.QuantizedBase.name:
        return True
    return candidate_bytes(fam, dense.candidate("int8"), 0, config) > budget
