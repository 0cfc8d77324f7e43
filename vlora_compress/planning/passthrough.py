"""The large pass-through matrices (embeddings, an untied head) in the default plan's budget.

Under the default plan (``--quantize auto``) with a target of the whole model (``--target-of
model``), the tensors outside the stacks count against the same bytes as the layers: on a model with
a large vocabulary the embedding alone can be most of the file (all-MiniLM-L6-v2's word embeddings
are half its parameters; a 270M model with 262,144 tokens, 63%). Each such matrix
(plan.large_passthrough) is weighed as stored, in int8 (a scale a row) and in int4 (a scale a
group), each measured on the model with that matrix alone rounded (as the writer rounds it: to
nearest; an embedding has no input Gram for GPTQ), and the rank allocation's Lagrangian picks its
storage with every family's (planning/allocate.py): bytes go where the measured error falls
fastest, in the layers or in the embedding. The plan starts from int8 (what the stacks' budget is
worked out with); what it took and what it weighed are recorded as decisions (plan.Decision).
"""

from __future__ import annotations

from ..fit.integers import fake_quantize
from ..plan import Decision, QuantizedTensor, Weighed, finite, matrix_bytes

SCHEMES = ("int8", "none", "int4")  # the storages weighed, the starting one (int8) first; none: as stored


def weighs(config, calibrated: bool) -> bool:
    """Whether the plan weighs the pass-through matrices: the default plan over every storage
    (``quantize`` auto, no ``--quantize-passthrough`` pinning them to int8), calibrated, and a
    ``target_size`` of the whole model, whose bytes they share with the stacks."""
    return (config.quantize == "auto" and not config.quantize_passthrough and calibrated
            and config.target_size is not None and config.target_bits is None and config.target_of == "model")


def start_storage(tensors, group_size: int) -> list[QuantizedTensor]:
    """The storage the budget is set with, before the allocation weighs it: every matrix in int8."""
    return [QuantizedTensor(key, SCHEMES[0], group_size) for key, _, _ in tensors]


def decided(plan, tensors) -> bool:
    """Whether ``plan`` took the matrices' storage itself (its decisions hold them): else they are
    stored as the config says (plan.quantized_passthrough)."""
    keys = {key for key, _, _ in tensors}
    return any(d.family in keys for d in plan.decisions)


def measurable(tensors, meter) -> list[tuple]:
    """The matrices the meter can replace: a weight of the model it runs (not a head outside the
    base model it measures, nor a tensor no module holds as its weight)."""
    finds = getattr(meter, "finds", None)
    return [t for t in tensors if finds is None or finds(t[0])]


def taken(tensors, weighed, opts: list[list[tuple]], picked: list[int], group_size: int) -> list[QuantizedTensor]:
    """What the file stores quantized: each weighed matrix's pick (as stored: nothing), every other
    in int8, as the budget counted it."""
    picks = {key: o[i][2] for (key, _, _), o, i in zip(weighed, opts, picked)}
    start = {q.key: q for q in start_storage(tensors, group_size)}
    return [q for q in (picks[key] if key in picks else start[key] for key, _, _ in tensors) if q is not None]


def note(tensors, weighed) -> str | None:
    """The plan's note on the matrices it did not weigh, stored in int8; None where it weighed all."""
    left = [key for key, _, _ in tensors if key not in {t[0] for t in weighed}]
    if not left:
        return None
    return (f"pass-through {', '.join(left)}: int8, as the budget counted {'it' if len(left) == 1 else 'them'} "
            "(not weighed: no measured allocation, or not a weight of the model the plan is measured on)")


def options(tensors, read, meter, group_size: int) -> list[list[tuple]]:
    """Per matrix ``(key, dtype, shape)``, its options as the allocation takes them: [(bytes, error
    on the model, QuantizedTensor or None (as stored), storage)], int8 first. Two measurements a
    matrix; as stored is exact (error 0)."""
    out = []
    for key, dtype, shape in tensors:
        weight = read(key)
        opts = []
        for scheme in SCHEMES:
            nbytes = matrix_bytes(shape, dtype, scheme, group_size)
            if scheme == "none":
                opts.append((nbytes, 0.0, None, scheme))
                continue
            rounded = fake_quantize(weight.float(), scheme, group_size).to(weight.dtype)
            # at least 0: a matrix the measure never reads (a pooler under pooled embeddings) measures
            # the float noise of the model's own outputs, -1e-8 on all-MiniLM-L6-v2
            err = max(meter({key: rounded}), 0.0)
            opts.append((nbytes, err, QuantizedTensor(key, scheme, group_size), scheme))
        out.append(opts)
    return out


def replacements(picked: list[tuple], read) -> dict:
    """The rounded weights of the picked options (as stored: none), to measure a plan with them."""
    out = {}
    for _, _, q, _ in picked:
        if q is not None:
            weight = read(q.key)
            out[q.key] = fake_quantize(weight.float(), q.quant, q.group_size).to(weight.dtype)
    return out


def decisions(tensors, opts: list[list[tuple]], picked: list[int], measure: str) -> list[Decision]:
    """One decision per matrix: every storage weighed (bytes, error measured alone), the one taken
    by the allocation's Lagrangian; its budget is where the plan started (int8)."""
    out = []
    for (key, dtype, _), o, i in zip(tensors, opts, picked):
        weighed = tuple(Weighed(_label(storage, dtype), "dense", 0, storage, nbytes, None, finite(err), None)
                        for nbytes, err, _, storage in o)
        out.append(Decision(key, o[0][0], measure, weighed, i))
    return out


def _label(storage: str, dtype: str) -> str:
    return f"pass-through as stored ({dtype})" if storage == "none" else f"pass-through, {storage}"
