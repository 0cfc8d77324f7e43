"""What every reader asks of a stored plan: which form stores a chunk, and the one walk.

The registry lives here, below the forms' planning side, so that the fit, the readers and the
file's layout can ask a chunk's form (``form_of``) without importing what plans (forms' choices
read the weights). ``walk`` is the one order every reader rebuilds a family in: each chunk's
terms come from its form (``Form.terms``), and the chunks are merged here, once. With it,
``family_matrices`` (and ``plan.matrix_bytes``) is the one rule for what a family stores and its
bytes.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import replace

from ..errors import VloraError
from ..plan import ChunkPlan, FamilyPlan, Plan, Term, matrix_bytes

FORMS: dict[str, "Form"] = {}  # noqa: F821 - forms/base.Form, which imports this module


def register(cls):
    """Class decorator: the form is known by its ``name`` from import on."""
    FORMS[cls.name] = cls()
    return cls


def form_of(chunk: ChunkPlan) -> "Form":  # noqa: F821
    """The registered form that stores such a chunk (``Form.stores``: exactly one does)."""
    for form in FORMS.values():
        if form.stores(chunk):
            return form
    raise VloraError(f"no storage form stores a chunk over base {chunk.base!r} with topology {chunk.topology!r}")


def walk(fp: FamilyPlan) -> Iterator[Term]:
    """The family's terms in the one order that fitting, expand, factored loading and healing all
    follow: per chunk its base, then each layer over the base or over the layer just before it in
    the chunk (its form's ``terms``), so that what compress writes is what every reader rebuilds.

    Chunks whose layers interleave (a shared basis over layers 0 and 2, another over 1 and 3) are
    merged by layer, each chunk's own order kept, a base just before its chunk's first step: the
    sequential fit meets each layer when the stream reaches it. A reader keeps what it holds per
    chunk (``Term.chunk``); ``Term.last`` marks a chunk's last term, after which it may let go."""
    runs = [list(form_of(chunk).terms(fp, ci, chunk)) for ci, chunk in enumerate(fp.chunks)]
    for run in runs:
        run[-1] = replace(run[-1], last=True)
    first = [min(chunk.layers) for chunk in fp.chunks]  # where a base that is no layer goes
    return heapq.merge(*runs, key=lambda t: first[t.chunk] if t.layer is None else t.layer)


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


def family_bytes(fp: FamilyPlan) -> int:
    """Stored bytes of a family plan: its bases and its factors (fileformat.family_layout's sum)."""
    return sum(matrix_bytes(shape, fp.store_dtype, fp.quant_of(name), fp.group_size)
               for name, shape in family_matrices(fp))


def matrix_roles(fp: FamilyPlan) -> dict[str, str]:
    """Each stored matrix's role, from the walk: ``base`` (a dense matrix a chunk's layers build on:
    a layer stored whole, a whitened mean, a quantized base) or ``factor`` (a low-rank factor: a
    layer's own, its residual factors, or a basis its group shares). Inspection counts bytes by it
    and healing's ``--train``/``--freeze`` choose by it."""
    roles = {}
    for t in walk(fp):
        if not t.over:
            if t.base is not None:
                roles[t.base] = "base"
            if t.basis is not None:
                roles[t.basis] = "factor"
        for name in (t.factors or ()) + (t.residual or ()):
            roles.setdefault(name, "factor")
    return roles


def plan_roles(plan: Plan) -> dict[str, str]:
    """``matrix_roles`` of every family of the plan."""
    return {name: role for fp in plan.families for name, role in matrix_roles(fp).items()}
