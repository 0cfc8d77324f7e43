"""Plan what to store: chunk bounds, the base of each chunk, the topology and the rank of every layer.

A plan is pure data (frozen dataclasses) that round-trips through the file header as JSON, so the
plan written by ``compress`` is exactly what ``expand`` follows. The math lives in fit/factorise.py.
"""

from __future__ import annotations

import heapq
import math
import reprlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

from .io.checkpoint import FLOAT_DTYPES, ITEMSIZE
from .config import STORE_DTYPES, CompressConfig  # noqa: F401 - the plan's inputs, re-exported
from .errors import VloraError
from .fit.integers import SCALE_SUFFIX, check_scheme
from .fit.integers import nbytes as quantized_nbytes
from .io.stacks import Family, Stack, layer_key

TOPOLOGIES = ("chain", "star", "shared", "shared-left")
SHARED = ("shared", "shared-left")  # one factor per chunk that all its layers read: the right one, or the left
BASE_KINDS = ("synthetic", "none")
PASSTHROUGH_MIN = 1 << 16  # quantize_passthrough takes 2-D pass-through tensors of at least this many values
DIM_LIMIT = 1 << 64  # safetensors stores dimensions as unsigned 64-bit integers


@dataclass(frozen=True)
class ChunkPlan:
    """Layers sharing one base.

    ``base`` is a layer index (that layer stored dense), ``"synthetic"`` (a base tensor stored once
    under ``synthetic_base_key``), or ``"none"`` (a zero base: with star topology every layer is its
    own low-rank factors, i.e. per-layer SVD). ``ranks`` lines up with ``layers``; a base layer has
    rank 0, and any other layer with rank 0 equals its reference exactly. Topology ``shared`` (over
    a zero base, one rank for all) stores one right factor for the chunk, its basis (under
    ``basis_key``), and each layer its own left factor over it: W_l = B_l A (Basis Sharing's form;
    for nn.Linear the inputs' side). ``shared-left`` shares the left factor instead, W_l = B A_l
    (for nn.Linear the outputs' side: layers that write into one subspace). ``residual`` (shared
    topologies only; empty for none) gives each layer a rank of its own factors on top of the shared
    part: W_l = B_l A + b_l a_l (or B A_l + b_l a_l), what the shared basis cannot hold.
    """

    layers: tuple[int, ...]
    ranks: tuple[int, ...]
    base: int | str
    topology: str = "chain"
    residual: tuple[int, ...] = ()

    def residual_of(self, layer: int) -> int:
        return self.residual[self.layers.index(layer)] if self.residual else 0

    @property
    def base_layer(self) -> int | None:
        return self.base if isinstance(self.base, int) else None

    def steps(self) -> list[tuple[int, int | None]]:
        """(layer, reference) in rebuild order; reference None means the chunk's base tensor.

        Chain: each layer over its neighbour nearer the base, so every reference was rebuilt just
        before. Star: every layer over the base.
        """
        if self.topology in ("star",) + SHARED:
            return [(layer, None) for layer in self.layers if layer != self.base]
        if self.base_layer is None:
            return [(layer, prev) for prev, layer in zip((None,) + self.layers[:-1], self.layers)]
        p = self.layers.index(self.base)
        forward = [(self.layers[i], self.layers[i - 1]) for i in range(p + 1, len(self.layers))]
        backward = [(self.layers[i], self.layers[i + 1]) for i in range(p - 1, -1, -1)]
        return forward + backward

    def rank_of(self, layer: int) -> int:
        return self.ranks[self.layers.index(layer)]


@dataclass(frozen=True)
class FamilyPlan:
    stack: str
    suffix: str
    shape: tuple[int, int]
    dtype: str  # original dtype
    store_dtype: str  # dtype of the stored base and factors (after dequantizing, when quantized)
    chunks: tuple[ChunkPlan, ...]
    quant: str = "none"  # none | int8 | int4 | int3 | int2: the factors' scheme, and the bases' too unless
    group_size: int = 128  # int4, int3, int2: values per scale along a row
    base_quant: str | None = None  # the bases' scheme where it is not ``quant``: a quantized base under
    # low-rank increments (a one-layer chunk is W ≈ Q + B A, CALDERA's form)

    def quant_of(self, name: str) -> str:
        """The scheme a stored matrix of the family is in: ``base_quant`` for a chunk's base where
        it is set, ``quant`` for everything else."""
        if self.base_quant is None:
            return self.quant
        bases = {self.base_key(c) for c in range(len(self.chunks))}
        return self.base_quant if name in bases else self.quant

    @property
    def quantized(self) -> bool:
        return self.quant != "none" or self.base_quant not in (None, "none")

    def key(self, layer: int) -> str:
        return layer_key(self.stack, layer, self.suffix)

    @property
    def name(self) -> str:
        return layer_key(self.stack, "*", self.suffix)

    def summary(self) -> dict:
        """The identifying fields every report of a family starts with."""
        return {"family": self.name, "stack": self.stack, "suffix": self.suffix, "shape": list(self.shape),
                "dtype": self.dtype, "store_dtype": self.store_dtype, "quant": self.quant, "group_size": self.group_size,
                "base_quant": self.base_quant}

    def synthetic_base_key(self, chunk: int) -> str:
        return layer_key(self.stack, f"vlora_base{chunk}", self.suffix)

    def basis_key(self, chunk: int) -> str:
        """The name of the right factor that chunk ``chunk``'s layers all read, when it is shared."""
        return layer_key(self.stack, f"vlora_basis{chunk}", self.suffix)

    def base_key(self, chunk: int) -> str | None:
        """The stored tensor holding chunk ``chunk``'s base; None for a zero base."""
        base = self.chunks[chunk].base
        if isinstance(base, int):
            return self.key(base)
        return self.synthetic_base_key(chunk) if base == "synthetic" else None

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(layer for c in self.chunks for layer in c.layers)


INCREMENT_SUFFIXES = (".vlora_B", ".vlora_A")
RESIDUAL = ".residual"  # a shared chunk's layer's own factors: key + ".residual.vlora_B" and "...vlora_A"


def increment_keys(key: str) -> tuple[str, str]:
    return key + INCREMENT_SUFFIXES[0], key + INCREMENT_SUFFIXES[1]


@dataclass(frozen=True)
class Term:
    """One step of the walk that rebuilds a family: a chunk's base, or one layer's increment."""

    chunk: int
    layer: int | None  # the layer this step rebuilds; None for a base that is no layer (a whitened
    # mean, or a zero base)
    key: str | None  # that layer's weight
    base: str | None  # the chunk's stored base tensor; None: a zero base
    over: str  # what the step adds to: "" (the step *is* the base), "base" (the chunk's base: a
    # star, or a chain's first link) or "previous" (the chunk's layer rebuilt just before: a chain)
    rank: int
    factors: tuple[str, str] | None  # (B, A) names where the rank is not 0; one of them is the chunk's
    # basis when it has one (A under ``shared``, B under ``shared-left``)
    basis: str | None = None  # the chunk's shared factor: rank x n (shared) or m x rank (shared-left)
    last: bool = False  # the chunk's last term: nothing after it reads what the chunk holds
    shares_left: bool = False  # the basis is the left factor (topology shared-left)
    residual: tuple[str, str] | None = None  # (b, a) a shared chunk's layer adds after B A, when it has them
    residual_rank: int = 0


def walk(fp: FamilyPlan) -> Iterator[Term]:
    """The family's terms in the one order that fitting, expand, factored loading and healing all
    follow: per chunk its base, then each layer over the base or over the layer just before it in
    the chunk (ChunkPlan.steps), so that what compress writes is what every reader rebuilds.

    Chunks whose layers interleave (a shared basis over layers 0 and 2, another over 1 and 3) are
    merged by layer, each chunk's own order kept, a base just before its chunk's first step: the
    sequential fit meets each layer when the stream reaches it. A reader keeps what it holds per
    chunk (``Term.chunk``); ``Term.last`` marks a chunk's last term, after which it may let go."""
    runs = [list(_chunk_terms(fp, ci, chunk)) for ci, chunk in enumerate(fp.chunks)]
    for run in runs:
        run[-1] = replace(run[-1], last=True)
    first = [min(chunk.layers) for chunk in fp.chunks]  # where a base that is no layer goes
    return heapq.merge(*runs, key=lambda t: first[t.chunk] if t.layer is None else t.layer)


def _chunk_terms(fp: FamilyPlan, ci: int, chunk: ChunkPlan) -> Iterator[Term]:
    base, basis = fp.base_key(ci), fp.basis_key(ci) if chunk.topology in SHARED else None
    layer = chunk.base_layer
    yield Term(ci, layer, fp.key(layer) if layer is not None else None, base, "",
               chunk.ranks[0] if basis else 0, None, basis, shares_left=chunk.topology == "shared-left")
    for layer, ref in chunk.steps():
        key, rank = fp.key(layer), chunk.rank_of(layer)
        over = "base" if ref is None or ref == chunk.base else "previous"
        kb, ka = increment_keys(key)
        factors = ((basis, ka) if chunk.topology == "shared-left" else (kb, basis or ka)) if rank else None
        own = chunk.residual_of(layer)
        yield Term(ci, layer, key, base, over, rank, factors, basis, shares_left=chunk.topology == "shared-left",
                   residual=increment_keys(key + RESIDUAL) if own else None, residual_rank=own)


def family_matrices(fp: FamilyPlan) -> list[tuple[str, tuple[int, int]]]:
    """The family's bases and factors as matrices, (name, shape), chunk by chunk in walk order: the
    layout (docs/format.md section 4), whatever order interleaved chunks are fitted in."""
    m, n = fp.shape
    out = []
    for t in sorted(walk(fp), key=lambda t: t.chunk):  # stable: each chunk's own order
        if not t.over:
            out += [(t.base, (m, n))] if t.base is not None else []
            if t.basis is not None:  # stored once, read by every layer
                out += [(t.basis, (m, t.rank) if t.shares_left else (t.rank, n))]
        elif t.factors:
            out += [] if t.shares_left else [(t.factors[0], (m, t.rank))]
            out += [] if t.basis is not None and not t.shares_left else [(t.factors[1], (t.rank, n))]
        if t.residual:
            out += [(t.residual[0], (m, t.residual_rank)), (t.residual[1], (t.residual_rank, n))]
    return out


@dataclass(frozen=True)
class QuantizedTensor:
    """A pass-through tensor stored as integers and scales; expand gives it back in its own dtype."""

    key: str
    quant: str
    group_size: int = 128


@dataclass(frozen=True)
class StackPlan:
    prefix: str
    layers: tuple[int, ...]
    bounds: tuple[tuple[int, int], ...]  # [start, end) positions into ``layers``, one per chunk


@dataclass(frozen=True)
class Weighed:
    """One candidate form the planner weighed for a family at the family's byte budget."""

    label: str  # the candidate in words, e.g. "shared basis + residual, 10 groups by similarity, int4"
    form: str  # per-layer | vlora | shared | shared-left (either + residual) | dense | quantized + low rank
    rank: int  # the largest rank it stores within the budget (0: every layer dense)
    storage: str  # the factors' scheme: none (the store dtype) | int8 | int4 | int3 | int2
    bytes: int  # what it stores
    estimate: float | None = None  # relative output error from singular values; None: not estimated
    error: float | None = None  # measured, by the decision's ``measure``; None: not fitted (the short list left it out)


MEASURES = ("logits", "embedding", "model", "block", "outputs", "weights")  # what a decision's errors are,
# on held-back samples: a causal LM's next-token KL, the pooled embeddings' 1 - cosine, the model's final
# hidden-state error, a block's output error (--planning blocks); or the family's summed whitened
# output error, or its weight error (calibrate.OutputMeter)


@dataclass(frozen=True)
class Decision:
    """What the planner chose for one family (or one block's layers of it), and every candidate it
    weighed: the plan's record of why it is what it is, which reports render."""

    family: str
    budget: int  # the bytes every candidate was fitted within
    measure: str  # one of MEASURES
    candidates: tuple[Weighed, ...]
    chosen: int  # the index of the one taken: the least measured error
    scope: str = ""  # the layers a block planned alone ("layers 0-9"), else empty
    allocated: Weighed | None = None  # what the file stores instead, where measured rank allocation
    # moved bytes or bits to or from the family after the choice (its errors are not the family's alone: None)

    @property
    def taken(self) -> Weighed:
        return self.candidates[self.chosen]

    def to_dict(self) -> dict:
        """The decision as JSON reads it back (lists, not tuples), for reports and vlora-inspect."""
        data = asdict(self)
        data["candidates"] = list(data["candidates"])
        return data


@dataclass(frozen=True)
class Plan:
    stacks: tuple[StackPlan, ...]
    families: tuple[FamilyPlan, ...]
    notes: tuple[str, ...] = field(default=())
    aligned: bool = False  # the stored weights are the layer-aligned (function-equivalent) ones
    passthrough: tuple[QuantizedTensor, ...] = ()  # pass-through tensors stored quantized
    decisions: tuple[Decision, ...] = ()  # the planner's, per family, where it planned by measurement

    @property
    def quantized(self) -> bool:
        return bool(self.passthrough) or any(f.quantized for f in self.families)

    def to_dict(self) -> dict:
        data = asdict(self)
        for f in data["families"]:
            for c in f["chunks"]:
                if not c["residual"]:  # written only where a chunk has one: plans without read as before
                    del c["residual"]
        if not data["decisions"]:  # a plan made without measurement reads as before
            del data["decisions"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        """Rebuild and validate a plan read from a file header; any defect is a VloraError.

        JSON lists become tuples and nothing else is converted: ``validate`` refuses a value of the
        wrong type in a sentence, where ``int()`` or ``str()`` would accept ``"3"`` or ``None``.
        """
        try:
            data = _object(data, "the plan")
            stacks = tuple(_stack_plan(s) for s in _list(data["stacks"], "stacks"))
            families = tuple(_family_plan(f) for f in _list(data["families"], "families"))
            passthrough = tuple(_quantized_tensor(q) for q in _list(data.get("passthrough", ()), "passthrough"))
            decisions = tuple(_decision(d) for d in _list(data.get("decisions", ()), "decisions"))
            plan = cls(stacks, families, _list(data.get("notes", ()), "notes"), data.get("aligned", False), passthrough,
                       decisions)
        except KeyError as e:
            raise VloraError(f"corrupted plan: field {e} is missing") from None
        plan.validate()
        return plan

    def validate(self) -> None:
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
    allocated = d.get("allocated")
    return Decision(d["family"], d["budget"], d["measure"], tuple(candidates), d["chosen"], d.get("scope", ""),
                    None if allocated is None else _weighed(allocated))


def _weighed(data) -> Weighed:
    c = _object(data, "a weighed candidate")
    return Weighed(c["label"], c["form"], c["rank"], c["storage"], c["bytes"], c.get("estimate"), c.get("error"))


def _check_decision(d: Decision) -> None:
    """Types a report renders without a second look: text, whole numbers, numbers or null."""
    what = f"decision {_brief(d.family)}"
    if not all(isinstance(x, str) for x in (d.family, d.scope)) or d.measure not in MEASURES:
        raise VloraError(f"corrupted plan: {what} has a family, scope or measure that is not one of its kind")
    if (not is_whole(d.budget) or d.budget < 0 or not d.candidates or not is_whole(d.chosen)
            or not 0 <= d.chosen < len(d.candidates)):
        raise VloraError(f"corrupted plan: {what} has budget {_brief(d.budget)} and chosen {_brief(d.chosen)} "
                         f"of {len(d.candidates)} candidates")
    number = lambda x: x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))  # noqa: E731
    for c in d.candidates + ((d.allocated,) if d.allocated is not None else ()):
        if not (all(isinstance(x, str) for x in (c.label, c.form, c.storage)) and is_whole(c.rank) and c.rank >= 0
                and is_whole(c.bytes) and c.bytes >= 0 and number(c.estimate) and number(c.error)):
            raise VloraError(f"corrupted plan: {what} has a candidate of the wrong types: {_brief(c)}")


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


def quantized_passthrough(tensors, factorised: set[str], config: CompressConfig) -> tuple[QuantizedTensor, ...]:
    """The pass-through tensors ``--quantize-passthrough`` stores as integers: 2-D floating-point
    matrices of at least PASSTHROUGH_MIN values (embeddings, a language-model head), and not one
    whose scale name would clash with a tensor already in the checkpoint.

    ``tensors`` is (key, dtype, shape) in checkpoint order."""
    scheme = config.passthrough_scheme
    if scheme == "none":
        return ()
    names = {key for key, _, _ in tensors}
    return tuple(
        QuantizedTensor(key, scheme, config.group_size)
        for key, dt, shape in tensors
        if key not in factorised and dt in FLOAT_DTYPES and len(shape) == 2
        and shape[0] * shape[1] >= PASSTHROUGH_MIN and key + SCALE_SUFFIX not in names
    )


def split_equal(n_layers: int, chunks: int) -> tuple[tuple[int, int], ...]:
    """Contiguous [start, end) bounds; earlier chunks take the remainder, one layer each."""
    size, extra = divmod(n_layers, chunks)
    bounds, start = [], 0
    for c in range(chunks):
        end = start + size + (1 if c < extra else 0)
        bounds.append((start, end))
        start = end
    return tuple(bounds)


def plan_equal(stacks: list[Stack], config: CompressConfig) -> Plan:
    """The core plan: equal chunks, the first layer of each chunk as base, a closed-loop chain.

    With ``method="svd"`` every family is one star chunk over a zero base: per-layer truncated SVD,
    the obvious alternative every VLoRA result is measured against; with ``method="dense"`` every
    layer is stored whole (in ``quantize``'s integers: quantization alone, the other one).
    """
    stack_plans, family_plans, notes = [], [], []
    for stack in stacks:
        per_layer = config.method in ("svd", "dense") or (config.base == "none" and config.topology not in SHARED)
        chunks = 1 if per_layer else (config.chunks or 1)
        if chunks > len(stack.layers):
            raise VloraError(
                f"`chunks` {config.chunks} is more than the {len(stack.layers)} layers of stack {stack.prefix!r}"
            )
        bounds = split_equal(len(stack.layers), chunks)
        stack_plans.append(StackPlan(stack.prefix, stack.layers, bounds))
        for fam in stack.families:
            rank = min(config.rank, *fam.shape)
            if rank < config.rank:
                notes.append(f"{fam.name}: rank {config.rank} clipped to {rank}, the full rank of {list(fam.shape)}")
            if config.method == "dense":
                fp = _dense_family(fam, config)
            elif config.topology in SHARED:
                fp = _chain_family(fam, stack.layers, bounds, rank, config)
            elif config.method == "svd" or config.base == "none":
                fp = _per_layer_family(fam, rank, config)
            else:
                fp = _chain_family(fam, stack.layers, bounds, rank, config)
            if config.method != "dense" and all(r == 0 for c in fp.chunks for r in c.ranks) and \
                    len(fp.chunks) == len(fam.layers) > 1:
                notes.append(f"{fam.name}: stored dense: rank-{rank} factors would cost more than the matrices")
            family_plans.append(fp)
    return Plan(tuple(stack_plans), tuple(family_plans), tuple(notes))


def matrix_bytes(shape: tuple[int, int], store_dtype: str, quant: str = "none", group_size: int = 128) -> int:
    """Stored bytes of one matrix: its values in the store dtype, or integers and scales."""
    if quant != "none":
        return quantized_nbytes(shape, quant, group_size)
    return ITEMSIZE[store_dtype] * shape[0] * shape[1]


def family_bytes(fp: FamilyPlan) -> int:
    """Stored bytes of a family plan: its bases and its factors (fileformat.family_layout's sum)."""
    return sum(matrix_bytes(shape, fp.store_dtype, fp.quant_of(name), fp.group_size)
               for name, shape in family_matrices(fp))


def dense_if_cheaper(fp: FamilyPlan) -> FamilyPlan:
    """The plan, or every layer dense when its factors would cost at least that: at a rank of
    mn/(m + n) or more, factors are larger than the matrix and dense is exact."""
    dense = replace(fp, chunks=tuple(ChunkPlan((layer,), (0,), base=layer, topology="chain") for layer in fp.layers))
    return dense if family_bytes(dense) <= family_bytes(fp) else fp


def _dense_family(fam: Family, config: CompressConfig) -> FamilyPlan:
    """Every layer its own base, nothing low rank: the stored form of quantization alone."""
    chunks = tuple(ChunkPlan((layer,), (0,), base=layer, topology="chain") for layer in fam.layers)
    store = STORE_DTYPES[config.dtype] if config.dtype else fam.dtype
    return FamilyPlan(fam.stack, fam.suffix, fam.shape, fam.dtype, store, chunks, config.family_scheme,
                      config.group_size)


def _per_layer_family(fam: Family, rank: int, config: CompressConfig) -> FamilyPlan:
    store = STORE_DTYPES[config.dtype] if config.dtype else fam.dtype
    if config.base_quantize is not None:  # every layer W ≈ Q + B A: its own quantized base, one increment
        chunks = tuple(ChunkPlan((layer,), (rank,), base="synthetic", topology="star") for layer in fam.layers)
        return FamilyPlan(fam.stack, fam.suffix, fam.shape, fam.dtype, store, chunks, config.family_scheme,
                          config.group_size, config.base_quantize)
    chunk = ChunkPlan(fam.layers, (rank,) * len(fam.layers), base="none", topology="star")
    return dense_if_cheaper(FamilyPlan(fam.stack, fam.suffix, fam.shape, fam.dtype, store, (chunk,),
                                       config.family_scheme, config.group_size))


def _chain_family(fam: Family, stack_layers, bounds, rank: int, config: CompressConfig) -> FamilyPlan:
    chunks = []
    for start, end in bounds:
        layers = tuple(layer for layer in stack_layers[start:end] if layer in fam.layers)
        if layers and config.topology in SHARED:  # one basis per chunk, every layer its coefficients
            chunks.append(ChunkPlan(layers, (rank,) * len(layers), base="none", topology=config.topology))
        elif layers:
            ranks = (0,) + (rank,) * (len(layers) - 1)
            topology = "star" if config.topology == "star" else "chain"
            chunks.append(ChunkPlan(layers, ranks, base=layers[0], topology=topology))
    store = STORE_DTYPES[config.dtype] if config.dtype else fam.dtype
    base_quant = config.base_quantize if config.topology not in SHARED else None
    return dense_if_cheaper(FamilyPlan(fam.stack, fam.suffix, fam.shape, fam.dtype, store, tuple(chunks),
                                       config.family_scheme, config.group_size, base_quant))

