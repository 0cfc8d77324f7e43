"""What a file stores: chunk bounds, the base of each chunk, the topology and the rank of every layer.

A plan is pure data (frozen dataclasses) that round-trips through the file header as JSON
(io/plan_record.py reads and checks it), so the plan written by ``compress`` is exactly what
``expand`` follows. A chunk is read through its storage form (forms/stored.py: ``form_of``, and
``walk``, the one order every reader rebuilds a family in, one ``Term`` a step; with
``matrix_bytes`` here, ``family_matrices`` is the one rule for what a family stores and its
bytes). The forms that make plans are in forms/, the math in fit/factorise.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .config import CompressConfig
from .fit.integers import SCALE_SUFFIX
from .fit.integers import nbytes as quantized_nbytes
from .io.checkpoint import FLOAT_DTYPES, ITEMSIZE
from .io.stacks import layer_key

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
    part: W_l = B_l A + b_l a_l (or B A_l + b_l a_l), what the shared basis cannot hold. The form
    that stores such a chunk (forms/stored.form_of) says the order its layers are rebuilt in.
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
    error: float | None = None  # measured, by the decision's ``measure``; None: not measured (left out of the short
    # list, or with a meter, not among the least fitted errors)
    fitted: float | None = None  # once fitted, the family's own relative (whitened) output error; None: not fitted


MEASURES = ("logits", "embedding", "model", "block", "outputs", "weights")  # what a decision's errors are,
# on held-back samples: a causal LM's next-token KL, the pooled embeddings' 1 - cosine, the model's final
# hidden-state error, a block's output error (--planning blocks); or the family's summed whitened
# output error, or its weight error (calibrate.OutputMeter)


@dataclass(frozen=True)
class Together:
    """A family's choice checked with every family compressed at once (planning/allocate.joint_check):
    the model's output error as chosen and with the family per-layer SVD at its bytes instead; the
    lower ships. Errors are None where the measure was not finite (JSON has no NaN)."""

    form: str  # the label of the candidate checked (as rank allocation left it)
    error: float | None  # the model's output error with it
    per_layer: float | None  # with per-layer SVD in its place

    @property
    def per_layer_ships(self) -> bool:
        return self.error is not None and self.per_layer is not None and self.per_layer < self.error

    def line(self, family: str) -> str:
        """The family's part of the joint check's note."""
        return (f"{family} {self.form} {_g(self.error)} vs per-layer SVD {_g(self.per_layer)}"
                + (": per-layer SVD ships" if self.per_layer_ships else ""))


@dataclass(frozen=True)
class Decision:
    """What the planner chose for one family (or one block's layers of it), and every candidate it
    weighed: the plan's record of why it is what it is, which reports render."""

    family: str  # or a pass-through matrix's key
    budget: int  # the bytes every candidate was fitted within (a pass-through matrix's: in int8, where it started)
    measure: str  # one of MEASURES
    candidates: tuple[Weighed, ...]
    chosen: int  # the index of the one taken: the least measured error (a pass-through matrix's, whose
    # storages differ in bytes: the allocation's pick, planning/passthrough.py)
    scope: str = ""  # the layers a block planned alone ("layers 0-9"), else empty
    allocated: Weighed | None = None  # what the file stores instead, where measured rank allocation
    # moved bytes or bits to or from the family after the choice (its errors are not the family's alone: None)
    together: Together | None = None  # the joint check of the choice, where the family had one

    @property
    def taken(self) -> Weighed:
        return self.candidates[self.chosen]

    def to_dict(self) -> dict:
        """The decision as JSON reads it back (lists, not tuples), for reports and vlora-inspect."""
        data = asdict(self)
        data["candidates"] = list(data["candidates"])
        if data["together"] is None:  # written only where checked: decisions without read as before
            del data["together"]
        return data


def together_note(decisions) -> str:
    """The joint check's note, rendered from the decisions it recorded (empty where none was checked)."""
    lines = [d.together.line(d.family) for d in decisions if d is not None and d.together is not None]
    return "checked together (output error, every family compressed): " + "; ".join(lines) if lines else ""


ALLOCATIONS = ("uniform", "allocated", "kept")  # what measured rank allocation did (Allocation.outcome)


@dataclass(frozen=True)
class Allocation:
    """What measured rank allocation did (``--ranks measured``, planning/allocate.allocate_ranks), with
    the model's output error measured with every family compressed at once."""

    outcome: str  # "uniform": no family measured better at another budget, nothing to try together;
    # "allocated": the allocation measured better and the file stores it; "kept": it measured worse, uniform kept
    error: float | None = None  # the allocated plan's output error (None where not measured: "uniform")
    uniform_error: float | None = None  # the uniform plan's
    moved: tuple[tuple[str, str, str], ...] = ()  # (family, candidate before, after) where it moved bits or form
    scope: str = ""  # the layers a block planned alone ("layers 0-9"), else empty

    @property
    def note(self) -> str:
        """The plan's note on it, rendered from the data."""
        if self.outcome == "uniform":
            return "ranks: uniform (no reallocation measured better per family)"
        if self.outcome == "kept":
            return f"ranks: uniform kept, output error {_g(self.uniform_error)} vs {_g(self.error)} allocated"
        moved = "; ".join(f"{family} {before} -> {after}" for family, before, after in self.moved)
        return (f"ranks: allocated by measured sensitivity, output error {_g(self.error)} vs {_g(self.uniform_error)} "
                "uniform" + (f"; bits moved: {moved}" if moved else ""))


def finite(x) -> float | None:
    """A measured error as a plan records it: a float, or None where it is not finite (JSON has no NaN)."""
    return float(x) if x is not None and math.isfinite(x) else None


def _g(x: float | None) -> str:
    return "nan" if x is None else f"{x:.4g}"


@dataclass(frozen=True)
class Plan:
    stacks: tuple[StackPlan, ...]
    families: tuple[FamilyPlan, ...]
    notes: tuple[str, ...] = field(default=())
    aligned: bool = False  # the stored weights are the layer-aligned (function-equivalent) ones
    passthrough: tuple[QuantizedTensor, ...] = ()  # pass-through tensors stored quantized
    decisions: tuple[Decision, ...] = ()  # the planner's, per family, where it planned by measurement
    allocations: tuple[Allocation, ...] = ()  # measured rank allocation's, one per planning (per block by blocks)

    @property
    def quantized(self) -> bool:
        return bool(self.passthrough) or any(f.quantized for f in self.families)

    def to_dict(self) -> dict:
        data = asdict(self)
        for f in data["families"]:
            for c in f["chunks"]:
                if not c["residual"]:  # written only where a chunk has one: plans without read as before
                    del c["residual"]
        for d in data["decisions"]:
            if d["together"] is None:  # written only where checked: decisions without read as before
                del d["together"]
        for key in ("decisions", "allocations"):
            if not data[key]:  # a plan made without measurement (or allocation) reads as before
                del data[key]
        return data


def quantized_passthrough(tensors, factorised: set[str], config: CompressConfig) -> tuple[QuantizedTensor, ...]:
    """The pass-through tensors ``--quantize-passthrough`` stores as integers: the ``large_passthrough``
    ones, in its scheme. ``tensors`` is (key, dtype, shape) in checkpoint order."""
    scheme = config.passthrough_scheme
    if scheme == "none":
        return ()
    return tuple(QuantizedTensor(key, scheme, config.group_size) for key, _, _ in large_passthrough(tensors, factorised))


def large_passthrough(tensors, factorised: set[str]) -> list[tuple[str, str, tuple]]:
    """(key, dtype, shape) of the pass-through tensors that may be stored as integers: 2-D
    floating-point matrices of at least PASSTHROUGH_MIN values (embeddings, a language-model head),
    and not one whose scale name would clash with a tensor already in the checkpoint."""
    names = {key for key, _, _ in tensors}
    return [(key, dt, tuple(shape)) for key, dt, shape in tensors
            if key not in factorised and dt in FLOAT_DTYPES and len(shape) == 2
            and shape[0] * shape[1] >= PASSTHROUGH_MIN and key + SCALE_SUFFIX not in names]


def split_equal(n_layers: int, chunks: int) -> tuple[tuple[int, int], ...]:
    """Contiguous [start, end) bounds; earlier chunks take the remainder, one layer each."""
    size, extra = divmod(n_layers, chunks)
    bounds, start = [], 0
    for c in range(chunks):
        end = start + size + (1 if c < extra else 0)
        bounds.append((start, end))
        start = end
    return tuple(bounds)


def matrix_bytes(shape: tuple[int, int], store_dtype: str, quant: str = "none", group_size: int = 128) -> int:
    """Stored bytes of one matrix: its values in the store dtype, or integers and scales."""
    if quant != "none":
        return quantized_nbytes(shape, quant, group_size)
    return ITEMSIZE[store_dtype] * shape[0] * shape[1]
