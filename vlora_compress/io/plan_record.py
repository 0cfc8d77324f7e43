"""A plan read from a file header: rebuilt from JSON and checked against every rule docs/format.md
sets for a plan alone, so that code after it may index and do arithmetic on the plan without
meeting a value it did not expect. Any defect is a VloraError naming it."""

from __future__ import annotations

import math
import reprlib

from ..errors import VloraError
from ..fit.integers import check_scheme
from ..plan import (ALLOCATIONS, BASE_KINDS, DIM_LIMIT, MEASURES, SHARED, TOPOLOGIES, Allocation, ChunkPlan, Decision,
                    FamilyPlan, Plan, QuantizedTensor, StackPlan, Together, Weighed)
from .checkpoint import FLOAT_DTYPES


def read_plan(data) -> Plan:
    """Rebuild and validate a plan read from a file header; any defect is a VloraError.

    JSON lists become tuples and nothing else is converted: ``check_plan`` refuses a value of the
    wrong type in a sentence, where ``int()`` or ``str()`` would accept ``"3"`` or ``None``.
    """
    try:
        data = _object(data, "the plan")
        stacks = tuple(_stack_plan(s) for s in _list(data["stacks"], "stacks"))
        families = tuple(_family_plan(f) for f in _list(data["families"], "families"))
        passthrough = tuple(_quantized_tensor(q) for q in _list(data.get("passthrough", ()), "passthrough"))
        decisions = tuple(_decision(d) for d in _list(data.get("decisions", ()), "decisions"))
        allocations = tuple(_allocation(a) for a in _list(data.get("allocations", ()), "allocations"))
        plan = Plan(stacks, families, _list(data.get("notes", ()), "notes"), data.get("aligned", False), passthrough,
                    decisions, allocations)
    except KeyError as e:
        raise VloraError(f"corrupted plan: field {e} is missing") from None
    check_plan(plan)
    return plan


def check_plan(self: Plan) -> None:
    """Every rule docs/format.md sets for a plan alone, types first: after this, code may index
    and do arithmetic on the plan without meeting a value it did not expect."""
    if not all(isinstance(n, str) for n in self.notes):
        raise VloraError("corrupted plan: the notes are not all text")
    if not isinstance(self.aligned, bool):
        raise VloraError(f"corrupted plan: 'aligned' is {_brief(self.aligned)}, not true or false")
    stacks = {}
    for s in self.stacks:
        _check_stack(s)
        if s.prefix in stacks:
            raise VloraError(f"corrupted plan: stack {s.prefix!r} is listed twice")
        stacks[s.prefix] = set(s.layers)
    for q in self.passthrough:
        if not isinstance(q.key, str):
            raise VloraError(f"corrupted plan: pass-through key {_brief(q.key)} is not a string")
        _check_storage(q.quant, q.group_size, repr(q.key))
        if q.quant == "none":
            raise VloraError(f"corrupted plan: pass-through {q.key!r} is listed as quantized with scheme none")
    if len({q.key for q in self.passthrough}) != len(self.passthrough):
        raise VloraError("corrupted plan: a pass-through tensor is listed twice")
    for d in self.decisions:
        _check_decision(d)
    for a in self.allocations:
        _check_allocation(a)
    planned = set()
    for f in self.families:
        _check_family(f, stacks)
        for layer in f.layers:
            if f.key(layer) in planned:  # expand would write it twice
                raise VloraError(f"corrupted plan: {f.key(layer)!r} is planned twice")
            planned.add(f.key(layer))


def is_whole(value) -> bool:
    """An int that is not a bool: JSON's true would pass ``isinstance(value, int)``."""
    return isinstance(value, int) and not isinstance(value, bool)


def _brief(value) -> str:
    """A value for a one-line message, however large or deep the JSON it came from."""
    return reprlib.repr(value)


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise VloraError(f"corrupted plan: {what} is {_brief(value)}, not a JSON object")
    return value


def _list(value, what: str) -> tuple:
    if not isinstance(value, (list, tuple)):  # tuples: a plan's own to_dict()
        raise VloraError(f"corrupted plan: {what} is {_brief(value)}, not a list")
    return tuple(value)


def _stack_plan(data) -> StackPlan:
    s = _object(data, "a stack")
    return StackPlan(s["prefix"], _list(s["layers"], "stack layers"),
                     tuple(_list(b, "a chunk's bounds") for b in _list(s["bounds"], "stack bounds")))


def _family_plan(data) -> FamilyPlan:
    f = _object(data, "a family")
    chunks = []
    for c in _list(f["chunks"], "chunks"):
        c = _object(c, "a chunk")
        chunks.append(ChunkPlan(_list(c["layers"], "chunk layers"), _list(c["ranks"], "chunk ranks"), c["base"],
                                c.get("topology", "chain"), _list(c.get("residual", []), "chunk residual ranks")))
    return FamilyPlan(f["stack"], f["suffix"], _list(f["shape"], "a family's shape"), f["dtype"], f["store_dtype"],
                      tuple(chunks), f.get("quant", "none"), f.get("group_size", 128), f.get("base_quant"))


def _quantized_tensor(data) -> QuantizedTensor:
    q = _object(data, "a pass-through entry")
    return QuantizedTensor(q["key"], q["quant"], q.get("group_size", 128))


def _decision(data) -> Decision:
    d = _object(data, "a decision")
    candidates = [_weighed(c) for c in _list(d["candidates"], "a decision's candidates")]
    allocated, together = d.get("allocated"), d.get("together")
    if together is not None:
        t = _object(together, "a decision's joint check")
        together = Together(t["form"], t["error"], t["per_layer"])
    return Decision(d["family"], d["budget"], d["measure"], tuple(candidates), d["chosen"], d.get("scope", ""),
                    None if allocated is None else _weighed(allocated), together)


def _allocation(data) -> Allocation:
    a = _object(data, "an allocation")
    moved = tuple(_list(m, "a move of an allocation") for m in _list(a.get("moved", ()), "an allocation's moves"))
    return Allocation(a["outcome"], a.get("error"), a.get("uniform_error"), moved, a.get("scope", ""))


def _weighed(data) -> Weighed:
    c = _object(data, "a weighed candidate")
    return Weighed(c["label"], c["form"], c["rank"], c["storage"], c["bytes"], c.get("estimate"), c.get("error"),
                   c.get("fitted"))


def _check_decision(d: Decision) -> None:
    """Types a report renders without a second look: text, whole numbers, numbers or null."""
    what = f"decision {_brief(d.family)}"
    if not all(isinstance(x, str) for x in (d.family, d.scope)) or d.measure not in MEASURES:
        raise VloraError(f"corrupted plan: {what} has a family, scope or measure that is not one of its kind")
    if (not is_whole(d.budget) or d.budget < 0 or not d.candidates or not is_whole(d.chosen)
            or not 0 <= d.chosen < len(d.candidates)):
        raise VloraError(f"corrupted plan: {what} has budget {_brief(d.budget)} and chosen {_brief(d.chosen)} "
                         f"of {len(d.candidates)} candidates")
    for c in d.candidates + ((d.allocated,) if d.allocated is not None else ()):
        if not (all(isinstance(x, str) for x in (c.label, c.form, c.storage)) and is_whole(c.rank) and c.rank >= 0
                and is_whole(c.bytes) and c.bytes >= 0 and _number(c.estimate) and _number(c.error)
                and _number(c.fitted)):
            raise VloraError(f"corrupted plan: {what} has a candidate of the wrong types: {_brief(c)}")
    t = d.together
    if t is not None and not (isinstance(t.form, str) and _number(t.error) and _number(t.per_layer)):
        raise VloraError(f"corrupted plan: {what} has a joint check of the wrong types: {_brief(t)}")


def _check_allocation(a: Allocation) -> None:
    """An outcome of its kind, errors numbers or null, moves (family, before, after) in text."""
    if (a.outcome not in ALLOCATIONS or not _number(a.error) or not _number(a.uniform_error)
            or not isinstance(a.scope, str)
            or not all(len(m) == 3 and all(isinstance(x, str) for x in m) for m in a.moved)):
        raise VloraError(f"corrupted plan: an allocation is not of its kind and types: {_brief(a)}")


def _number(x) -> bool:
    """A finite number or null (JSON has no NaN; a plan records a non-finite error as null)."""
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))


def _check_stack(s: StackPlan) -> None:
    """Layers distinct whole numbers; bounds contiguous non-empty [start, end) pairs covering them."""
    if not isinstance(s.prefix, str):
        raise VloraError(f"corrupted plan: stack prefix {_brief(s.prefix)} is not a string")
    layers = s.layers
    if not layers or not all(is_whole(layer) and layer >= 0 for layer in layers) or len(set(layers)) != len(layers):
        raise VloraError(f"corrupted plan: stack {s.prefix!r} has layers {_brief(list(s.layers))}, "
                         "not one or more distinct whole numbers")
    end = 0
    for b in s.bounds:
        if len(b) != 2 or not all(is_whole(x) for x in b) or b[0] != end or b[1] <= b[0]:
            end = -1
            break
        end = b[1]
    if end != len(s.layers):
        raise VloraError(f"corrupted plan: stack {s.prefix!r} has bounds {_brief([list(b) for b in s.bounds])}, "
                         f"not contiguous non-empty chunks covering its {len(s.layers)} layers")


def _check_storage(scheme, group_size, what: str) -> None:
    if not isinstance(scheme, str) or not is_whole(group_size):
        raise VloraError(f"corrupted plan: {what} has quantization {_brief(scheme)} "
                         f"with group size {_brief(group_size)}")
    try:
        check_scheme(scheme, group_size)
    except VloraError as e:
        raise VloraError(f"corrupted plan: {what}: {e}") from None


def _check_family(f: FamilyPlan, stacks: dict[str, set[int]]) -> None:
    """Types and rules of one family; ``stacks`` maps each stack's prefix to its layers."""
    if not isinstance(f.stack, str) or not isinstance(f.suffix, str):
        raise VloraError("corrupted plan: family names must be strings")
    if len(f.shape) != 2 or not all(is_whole(d) and 1 <= d < DIM_LIMIT for d in f.shape):
        raise VloraError(f"corrupted plan: {f.name} has shape {_brief(list(f.shape))}")
    if not all(isinstance(dt, str) and dt in FLOAT_DTYPES for dt in (f.dtype, f.store_dtype)):
        raise VloraError(f"corrupted plan: {f.name} has dtype {_brief(f.dtype)}/{_brief(f.store_dtype)}")
    _check_storage(f.quant, f.group_size, f.name)
    if f.base_quant is not None:
        _check_storage(f.base_quant, f.group_size, f.name + "'s bases")
    if f.stack not in stacks:
        raise VloraError(f"corrupted plan: {f.name} names stack {f.stack!r}, which the plan does not list")
    if not f.chunks:
        raise VloraError(f"corrupted plan: {f.name} has no chunks")
    for c in f.chunks:
        if (not c.layers or not all(is_whole(layer) for layer in c.layers) or not all(is_whole(r) for r in c.ranks)
                or len(c.ranks) != len(c.layers) or len(set(c.layers)) != len(c.layers)):
            raise VloraError(f"corrupted plan: a chunk of {f.name} has mismatched layers and ranks")
        if not isinstance(c.topology, str) or c.topology not in TOPOLOGIES:
            raise VloraError(f"corrupted plan: {f.name} has unknown topology {_brief(c.topology)}")
        if c.residual and (c.topology not in SHARED or len(c.residual) != len(c.layers)
                           or not all(is_whole(r) and 0 <= r <= min(f.shape) for r in c.residual)):
            raise VloraError(f"corrupted plan: a chunk of {f.name} has residual ranks {_brief(list(c.residual))}: "
                             "only a shared chunk has them, one whole rank in 0..min(m, n) per layer")
        if c.topology in SHARED and (c.base != "none" or len(set(c.ranks)) != 1 or c.ranks[0] < 1):
            raise VloraError(f"corrupted plan: a shared chunk of {f.name} needs a zero base and one rank of at "
                             "least 1 for all its layers")
        if not (is_whole(c.base) or isinstance(c.base, str)):
            raise VloraError(f"corrupted plan: base {_brief(c.base)} of {f.name} is not a layer or a kind")
        if isinstance(c.base, str) and c.base not in BASE_KINDS:
            raise VloraError(f"corrupted plan: {f.name} has unknown base kind {c.base!r}")
        if isinstance(c.base, int) and c.base not in c.layers:
            raise VloraError(f"corrupted plan: base {c.base!r} of {f.name} is not in its chunk")
        if isinstance(c.base, int) and c.rank_of(c.base) != 0:
            raise VloraError(f"corrupted plan: base layer {c.base} of {f.name} has a rank")
        if any(r < 0 or r > min(f.shape) for r in c.ranks):
            raise VloraError(f"corrupted plan: {f.name} has a rank outside 0..{min(f.shape)}")
        outside = [layer for layer in c.layers if layer not in stacks[f.stack]]
        if outside:
            raise VloraError(f"corrupted plan: layer {outside[0]} of {f.name} is not a layer of stack {f.stack!r}")
    # a family that stores nothing (zero bases at rank 0) has a shape no stored tensor confirms, and
    # expand would allocate whatever the header claims; compress never writes one
    if all(c.base == "none" and not any(c.ranks) for c in f.chunks):
        raise VloraError(f"corrupted plan: {f.name} stores no tensor")
