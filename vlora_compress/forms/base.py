"""What every storage form declares, the registry, and a candidate: (form, parameters, storage).

A storage form says how a family of layers is stored (every layer dense, per-layer factors, a
VLoRA chain or star over a base, a basis shared by a group, a quantized base under low rank). Each
is one class in this package, registered by name, and code that needs to know a form's rule asks
the form: its label, the kind a decision records, the plan it stores at a rank (whose matrices
give its bytes: ``stored.family_bytes`` is the only byte rule), and the choices it makes from the
weights (chunk bounds, groups, a base). A written chunk (plan.ChunkPlan) is read through the form
that stores it (stored.form_of): its terms in the walk (``terms``, ``steps``), the least format
version it needs (``version``), whether it can be fitted a layer at a time (``sequential``), and
the names it stores under its chunk's index (``renames``). ``stored.py`` holds the registry and the
one walk, below the planning side, so that the fit and the readers can ask a chunk's form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

from ..config import STORE_DTYPES, CompressConfig
from ..io.stacks import Family
from ..io.versions import FORMAT_VERSION
from ..plan import ChunkPlan, FamilyPlan, Term, increment_keys, split_equal
from .stored import FORMS, family_bytes, form_of, register  # noqa: F401 - the registry, re-exported


@dataclass(frozen=True)
class Candidate:
    """One way to store a family: a registered form, its parameters, and its storage.

    Parameters a form does not read keep their defaults, so two candidates are equal exactly when
    they store the same thing."""

    form: str  # a registered form's name (FORMS)
    quant: str = "none"  # storage of the factors, and of the bases unless ``base_quant``: none (the store
    # dtype) | int8 | int4 | int3 | int2 | int3-midrise | int2-midrise
    base_quant: str | None = None  # the bases' scheme where it is not ``quant``
    chunks: int = 1  # vlora: chunks, each with a base; shared: groups, each with a basis
    base: str = "first"  # vlora: first | mean (the chunk's whitened mean) | best (the layer that leaves least)
    topology: str = "chain"  # vlora: chain | star; shared: shared (the right factor) | shared-left
    grouping: str = "adjacent"  # shared: adjacent layers, or similar (the layers whose pairs lose least by
    # sharing, adjacent or not: shared.similar_groups)
    residual: bool = False  # shared: each layer's own factors on top, at shared.residual_rank(rank)
    group_size: int | None = None  # values a scale where it is not the config's (--group-size): int4 and
    # int3 in wider groups: with groups of 64, int4 in 4.06 bits a weight where its own take 4.25 (allocate._bit_options)

    @property
    def spec(self) -> "Form":
        return FORMS[self.form]

    @property
    def label(self) -> str:
        """The candidate in words, e.g. "shared basis + residual, 10 groups by similarity, int4"."""
        group = f"/g{self.group_size}" if self.group_size is not None else ""
        return self.spec.label(self) + ("" if self.quant == "none" else f", {self.quant}{group}")

    @property
    def kind(self) -> str:
        """What a decision records as the candidate's form (plan.Weighed.form)."""
        return self.spec.kind(self)


class Form:
    """A storage form. Subclasses set ``name`` and override what differs; ``register`` adds them."""

    name: ClassVar[str]
    ranked: ClassVar[bool] = True  # stores low-rank factors (a rank to choose); dense: False
    rounded: ClassVar[bool] = False  # its error is mostly its integers' rounding, which singular values do not
    # see: never ranked by the estimate, always fitted and measured
    chunked: ClassVar[bool] = False  # cuts the stack into chunks (VLoRA) or groups (shared bases)

    def label(self, cand: Candidate) -> str:
        raise NotImplementedError

    def kind(self, cand: Candidate) -> str:
        return self.name

    def asked(self, config: CompressConfig, n_layers: int, quant: str, base: str) -> list[Candidate]:
        """Its candidates the config asks the planner to weigh for a family of ``n_layers``, stored in
        ``quant``, for the base kind ``base`` (a VLoRA base, or ``none``). planning/space.candidates
        asks every form, for each storage and base kind, in its one order (which decides ties)."""
        return []

    def bit_candidates(self, config: CompressConfig) -> list[Candidate]:
        """Its candidates that are a choice of bits (quantization alone, or a quantized base under low
        rank), weighed after every other where the config pins no base or chunk count."""
        return []

    def stores_increments(self, fam: Family, cand: Candidate) -> bool:
        """Whether it stores any low-rank factor (a rank to choose) for ``fam``."""
        return self.ranked

    def chunks(self, fam: Family, cand: Candidate, rank: int,
               groups: list[tuple[int, ...]] | None = None) -> list[ChunkPlan]:
        """The chunks it stores at a uniform ``rank`` over ``groups`` of the family's layers (by
        default ``cand.chunks`` equal contiguous ones)."""
        raise NotImplementedError

    def layout(self, fam: Family, cand: Candidate, rank: int, config: CompressConfig,
               groups: list[tuple[int, ...]] | None = None) -> FamilyPlan:
        """The family plan at ``rank``: what the fit fills and the file stores. Where its factors
        cost at least every layer dense (a rank past the break-even), every layer dense instead."""
        rank = min(rank, *fam.shape)
        fp = family_plan(fam, config, self.chunks(fam, cand, rank, groups), cand.quant, cand.base_quant,
                         cand.group_size)
        return fp if self.rounded else dense_if_cheaper(fp)

    def choose(self, fam: Family, cand: Candidate, rank: int, weights, whitener, config: CompressConfig,
               spectra: dict | None, score: Callable[[FamilyPlan], float]) -> FamilyPlan | None:
        """The plan at ``rank`` with the choices the weights make (bounds, groups, a base); None where
        the candidate adds nothing another one does not already try. ``score(fp)`` is a plan's
        error once fitted (planning/budget.fit_candidate gives it). By default, ``layout``."""
        return self.layout(fam, cand, rank, config)

    # What a written chunk is read as: every reader asks the chunk's form (stored.form_of).

    def stores(self, chunk: ChunkPlan) -> bool:
        """Whether a written chunk is this form's: exactly one registered form says so."""
        raise NotImplementedError

    def steps(self, chunk: ChunkPlan) -> list[tuple[int, int | None]]:
        """(layer, reference) in rebuild order; reference None means the chunk's base tensor. By
        default every layer over the base (a star)."""
        return [(layer, None) for layer in chunk.layers if layer != chunk.base]

    def terms(self, fp: FamilyPlan, ci: int, chunk: ChunkPlan) -> Iterator[Term]:
        """Chunk ``ci``'s walk (stored.walk merges the chunks): its base, then each layer's own
        factors over the base or over the layer just before it (``steps``)."""
        base, layer = fp.base_key(ci), chunk.base_layer
        yield Term(ci, layer, fp.key(layer) if layer is not None else None, base, "", 0, None)
        for layer, ref in self.steps(chunk):
            key, rank = fp.key(layer), chunk.rank_of(layer)
            over = "base" if ref is None or ref == chunk.base else "previous"
            yield Term(ci, layer, key, base, over, rank, increment_keys(key) if rank else None)

    def version(self, chunk: ChunkPlan) -> int:
        """The least format version (io/versions.py) that holds the chunk, its storage aside."""
        return FORMAT_VERSION

    def sequential(self, chunk: ChunkPlan, bases: bool) -> bool:
        """Whether fit_family can fit the chunk a layer at a time (pipelines/sequential.py), with
        ``bases`` (the original model's weights and Grams, for what is fitted from all the chunk's
        layers at once) given up front or not: by default where its base is its first layer or
        none, or the chunk is one layer (whose base is made from that layer: W ≈ Q + B A)."""
        return chunk.base == "none" or chunk.base == chunk.layers[0] or len(chunk.layers) == 1

    def renames(self, fp: FamilyPlan, ci: int, to: int) -> dict[str, str]:
        """Stored name -> its name when chunk ``ci`` becomes chunk ``to`` of its family (a block's
        chunks placed after the blocks' before it): what is named by the chunk's index, by default
        a synthetic base (a whitened mean, a quantized base)."""
        return {fp.synthetic_base_key(ci): fp.synthetic_base_key(to)} if fp.chunks[ci].base == "synthetic" else {}

    def basis_side(self, chunk: ChunkPlan) -> str | None:
        """Which factor the chunk's layers all read, ``right`` or ``left``; None where they share none."""
        return None


def equal_groups(layers: tuple[int, ...], k: int) -> list[tuple[int, ...]]:
    """``k`` contiguous groups of ``layers``, earlier ones one longer where they do not divide."""
    return [layers[a:b] for a, b in split_equal(len(layers), k)]


def store_dtype(fam: Family, config: CompressConfig) -> str:
    """The dtype bases and factors are stored in: ``config.dtype``, else the family's own."""
    return STORE_DTYPES[config.dtype] if config.dtype else fam.dtype


def family_plan(fam: Family, config: CompressConfig, chunks, quant: str, base_quant: str | None = None,
                group_size: int | None = None) -> FamilyPlan:
    """``base_quant`` is kept only where some chunk has a base to store in it; ``group_size``: the
    config's where None."""
    base_quant = base_quant if any(c.base != "none" for c in chunks) else None
    return FamilyPlan(fam.stack, fam.suffix, fam.shape, fam.dtype, store_dtype(fam, config), tuple(chunks),
                      quant, group_size or config.group_size, base_quant)


def dense_chunks(layers: tuple[int, ...]) -> list[ChunkPlan]:
    """Every layer its own chunk, stored whole as its own base."""
    return [ChunkPlan((layer,), (0,), base=layer, topology="chain") for layer in layers]


def dense_if_cheaper(fp: FamilyPlan) -> FamilyPlan:
    """The plan, or every layer dense when its factors would cost at least that: at a rank of
    mn/(m + n) or more, factors are larger than the matrix and dense is exact."""
    dense = FamilyPlan(fp.stack, fp.suffix, fp.shape, fp.dtype, fp.store_dtype, tuple(dense_chunks(fp.layers)),
                       fp.quant, fp.group_size, fp.base_quant)
    return dense if family_bytes(dense) <= family_bytes(fp) else fp


def candidate_bytes(fam: Family, cand: Candidate, rank: int, config: CompressConfig) -> int:
    """Exact stored bytes of ``fam`` as ``cand`` at a uniform ``rank``, scales included: those of its
    plan (``stored.family_bytes``, the one byte rule), at most every layer dense."""
    return family_bytes(cand.spec.layout(fam, cand, rank, config))


def fit_rank(cap: int, fits: Callable[[int], bool]) -> int:
    """The largest rank in 0..``cap`` whose exact bytes fit, by bisection (-1 where none does):
    bytes grow with the rank, but not affinely (scales step with it), and an affine estimate per
    value would leave bytes unused (int8's one scale per row of 384 is 0.5% more, not the 6% a safe
    per-value estimate charges)."""
    lo, hi = 0, cap
    if not fits(lo):
        return -1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
