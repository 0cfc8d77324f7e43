"""Plan by measurement: for every family, which base, topology, chunk bounds and rank to store.

Each family gets a byte budget: what the plan the user asked for (``--rank``/``--chunks``, or
``--target-size``) would store for it with first-layer bases and a chain. Every candidate form is
then fitted at that same budget, closed loop and whitened when calibrated:

- ``none``: every layer its own low-rank factors (per-layer SVD), the baseline, left unfitted or
  unmeasured only where its error (its estimate is its fitted error) is far above another's;
- a VLoRA form: base ``first``, ``mean`` (the whitened mean, stored once) or ``best`` (the layer
  whose choice leaves the least residual) with a ``chain`` or ``star`` topology, for each chunk
  count allowed. Chunk bounds come from dynamic programming over contiguous partitions, minimising
  the energy of the consecutive-layer deltas that a rank-r increment cannot hold;
- with ``shared`` (``--shared``; by default where next-token KL measures the plan, compress._shares),
  a basis shared by each group of at most 2, 3 or 4 layers, every layer its own coefficients: the
  right factor shared (Basis Sharing's form; nn.Linear's inputs) or the left one (``shared-left``:
  the outputs), the groups adjacent layers or the layers whose pairs lose least by sharing,
  adjacent or not (similar_groups); each also with residual factors of every layer's own on top
  (W_l = B_l A + b_l a_l).

With ``--quantize auto`` every form is also tried in int8 and int4 at the same bytes (a higher
rank in fewer bits against a lower rank in the store dtype), so the storage is chosen by the same
measurement.

Every candidate is ranked by an estimate from singular values shared by the family's candidates
(spectral_error, no fit); a short list (the best estimates and the best of each form) is fitted
and scored by the summed (whitened when calibrated) squared output error of the family's layers,
else their weight error; with a meter, the ``MEASURED`` least of those are measured on the model
(its output error on held-back calibration samples), and the one with the least error wins. The search is bounded: ``auto`` plans at most 3 chunk counts x 2 bases (first, mean) x 2
topologies + per-layer SVD = 13 candidates per family (x 3 storages, plus every layer dense in int8
and in int4, under ``--quantize auto``), fits at most 4 (8 under auto), fewer where the estimates
rule candidates out (``PRUNE``), and measures at most 3 on the model, those fitted within 1.5x of
the least (``MEASURE_WITHIN``); ``--shared`` adds 2 sides
x up to 3 group counts x 2 groupings x with or without residual factors, and one fit for the best
of each side with and without residual factors; ``best`` is tried only when asked for, since it
fits every layer of a chunk as the base.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from ..config import CompressConfig
from ..errors import VloraError
from ..fit.integers import rounding_memo
from ..fit.svd import Whitener
from ..forms import Candidate, candidate_bytes, dense, fit_rank
from ..forms.stored import family_bytes
from .allocate import allocate_ranks, joint_check
from . import passthrough as weighed_passthrough
from .estimate import PRUNE, spectral_error
from .measure import exact, family_error, rebuild_in_memory
from . import space
from ..plan import Decision, FamilyPlan, Plan, StackPlan, Weighed, split_equal, together_note
from .budget import fit_candidate
from ..io.stacks import Family, Stack


def plan_measured(
    stacks: list[Stack],
    config: CompressConfig,
    read: Callable[[str], torch.Tensor],
    whitener: Callable[[str], Whitener | None] = lambda key: None,
    meter: Callable[[dict[str, torch.Tensor]], float] | None = None,
    budgets: dict[str, int] | None = None,
    total: int | None = None,
    passthrough: tuple = (),
) -> Plan:
    """A plan whose every family took the least-error candidate at its byte budget.

    ``meter(replacements)`` measures the model's output error with some weights replaced.
    ``budgets`` (family name -> bytes) overrides the budget the reference form sets. ``total`` is
    the stacks' byte budget of a size target: measured rank allocation spends up to it (without
    one, up to what the uniform plan stores). ``passthrough``: (key, dtype, shape) of the large
    pass-through matrices whose storage the allocation weighs within the same bytes
    (planning/passthrough.py), ``total`` counting them in int8; the plan's ``passthrough`` is what it
    took. Only one family's layers are held in memory at a time.
    GPTQ's integers for the same layer and scheme are made once (fit/integers.rounding_memo).
    """
    with rounding_memo():
        return _plan(stacks, config, read, whitener, meter, budgets, total, passthrough)


def _plan(stacks, config: CompressConfig, read, whitener, meter, budgets, total, passthrough) -> Plan:
    stack_plans, family_plans, notes, chosen, decisions, allocations = [], [], [], [], [], []
    known: dict[FamilyPlan, float] = {}  # the meter's error of a plan measured alone: choice and allocation share it
    fitted: dict[FamilyPlan, float] = {}  # the family's own error of a plan fitted: shared the same way
    for stack in stacks:
        k_ref = config.chunks or 1
        if k_ref > len(stack.layers):
            raise VloraError(f"`chunks` {k_ref} is more than the {len(stack.layers)} layers of stack {stack.prefix!r}")
        stack_plans.append(StackPlan(stack.prefix, stack.layers, split_equal(len(stack.layers), k_ref)))
        for fam in stack.families:
            budget = (budgets[fam.name] if budgets is not None
                      else candidate_bytes(fam, space.reference(config, len(fam.layers)), config.rank, config))
            measure = (getattr(meter, "name", "model") if meter is not None else
                       "outputs" if whitener(fam.key(fam.layers[0])) is not None else "weights")
            weights = {layer: read(fam.key(layer)).float() for layer in fam.layers}
            best, weighed = _choose(fam, space.candidates(config, len(fam.layers)), weights, whitener, config, budget,
                                    meter, known, fitted)
            if best is None:
                raise VloraError(f"{fam.name}: no candidate fits its budget of {budget:,} bytes")
            cand, fp, index = best
            # more than one candidate: the choice is a decision, recorded with what it weighed
            decisions.append(Decision(fam.name, budget, measure, tuple(weighed), index) if weighed else None)
            family_plans.append(fp)
            chosen.append((fam, cand, budget))
    picked = [cand for _, cand, _ in chosen]
    stored = weighed_passthrough.start_storage(passthrough, config.group_size)
    weighed, held = [], []  # the pass-through matrices the allocation weighs, and its decisions on them
    if meter is not None and config.ranks == "measured" and len(chosen) > 1:
        uniform = family_plans
        weighed = weighed_passthrough.measurable(passthrough, meter)
        options = weighed_passthrough.options(weighed, read, meter, config.group_size)
        family_plans, allocation, picked, took = allocate_ranks(chosen, family_plans, config, read, whitener, meter,
                                                                total, known, fitted, options)
        stored = weighed_passthrough.taken(passthrough, weighed, options, took, config.group_size)
        held = weighed_passthrough.decisions(weighed, options, took, getattr(meter, "name", "model"))
        allocations.append(allocation)
        notes.append(allocation.note)
        decisions = [d if d is None or new == old else replace(d, allocated=_weighed(c, new))
                     for d, old, new, c in zip(decisions, uniform, family_plans, picked)]
    if meter is not None and len(chosen) > 1:
        before = family_plans
        family_plans, picked, checks = joint_check(chosen, family_plans, config, read, whitener, meter, picked)
        decisions = [d if d is None else replace(d, allocated=d.allocated if new == old else _weighed(c, new),
                                                  together=check)
                     for d, old, new, c, check in zip(decisions, before, family_plans, picked, checks)]
        note = together_note(decisions)
        if note:
            notes.append(note)
    note = weighed_passthrough.note(passthrough, weighed)
    if note:
        notes.append(note)
    return Plan(tuple(stack_plans), tuple(family_plans), tuple(notes), passthrough=tuple(stored),
                decisions=tuple(d for d in decisions if d is not None) + tuple(held), allocations=tuple(allocations))


SHORT_LIST = 3  # candidates, best by their estimated error, that are fitted and measured


def _choose(fam: Family, cands: list[Candidate], weights, whitener, config: CompressConfig, budget: int, meter,
            known: dict | None = None, fitted: dict | None = None):
    """(best (candidate, plan, its index in the list) or None, [Weighed] of every candidate that
    fits, in the order tried: empty where there was only one)

    Every candidate is planned at the budget and ranked by spectral_error, an estimate from singular
    values that all candidates of the family share (no fit: on SmolLM2 fitting every candidate cost
    70% of the plan). The ``SHORT_LIST`` best, per-layer SVD (the baseline), and
    under ``--quantize auto`` the best of each other storage and every dense one (the estimate does
    not see rounding) are then fitted, but for those whose estimate rules them out (``PRUNE``), and
    scored by the family's summed (whitened) output error;
    with a meter, the least of those by the model's output error instead (_scored). At most
    ``MEASURED`` rebuilt candidates' weights are held at once."""
    spectra: dict = {}  # singular values per (reference, layer): every candidate's estimate reads them
    planned = []  # (estimate, index, candidate, plan)
    seen: dict[FamilyPlan, int] = {}  # plan -> its place in planned: candidates that store the same are one
    for i, cand in enumerate(cands):
        if not space.worth_fitting(fam, cand, budget, config):
            continue
        fp = fit_candidate(fam, cand, weights, whitener, config, budget, spectra)
        if fp is None:
            continue
        if len(cands) == 1:  # nothing to choose between: no need to measure
            return (cand, fp, 0), []
        if fp in seen:  # e.g. past the break-even every low-rank form is every layer dense: fitted once,
            # as per-layer SVD where that is one of them (it wins ties: see below)
            j = seen[fp]
            if cand.kind == "per-layer" and planned[j][2].kind != "per-layer":
                planned[j] = (planned[j][0], i, cand, fp)
            continue
        seen[fp] = len(planned)
        est = float("nan") if cand.spec.rounded else spectral_error(fp, weights, whitener, spectra,
                                                                 config.calibration.damping)
        planned.append((est, i, cand, fp))
    del spectra
    # per-layer SVD first, so that it wins ties: where every form comes out dense (a budget past the
    # break-even) the family is then per-layer SVD, whose scaled budgets rank allocation tries next
    # (SmolLM2's k and v at 35% removed were a first-layer chain, whose scaled-down options are worse)
    short = sorted(_short_list(planned, config), key=lambda t: (t[2].kind != "per-layer", t[1]))
    errors, scores = _scored(fam, short, weights, whitener, config, meter, {} if known is None else known,
                             {} if fitted is None else fitted)
    best = None
    for _, i, cand, fp in short:
        if i in scores and (best is None or scores[i] < best[2] * (1 - 1e-9)):
            best = (cand, fp, scores[i], i)
    if best is None:
        return None, []
    at = [i for _, i, _, _ in planned]
    weighed = [_weighed(cand, fp, est, scores.get(i), errors.get(i)) for est, i, cand, fp in planned]
    return (*best[:2], at.index(best[3])), weighed


MEASURED = 3  # with a meter: the short list's candidates of least fitted (family) error that the model measures


def _scored(fam: Family, short: list, weights, whitener, config: CompressConfig, meter, known: dict, fitted: dict):
    """({index: the family's own fitted error}, {index: score}) of the short list's candidates.

    Each is fitted and scored by the family's summed (whitened) output error, those the estimate
    cannot rank first (rounded forms, residual factors) and then the rest by estimate, skipping any whose estimate is above ``PRUNE`` times the least
    fitted error so far (``_bounded``: its fit cannot come below it by that much); with a meter, the
    ``MEASURED`` least of those, of those within ``MEASURE_WITHIN`` times the least, are then measured
    on the model (a forward pass each, 10 s on SmolLM2 where a fit's own error costs none: the rest
    are left unmeasured) and scored by that. On SmolLM2 at 2.5 bits the least fitted won the model's
    measure in every family, by a wider margin on the model than fitted. A plan storing
    every layer whole scores 0 unfitted; one measured before (``known``) keeps its measurement, one
    fitted before (``fitted``, by plan) its fitted error."""
    errors, scores = {}, {}
    kept: list = []  # (fitted error, place, index, plan, rebuilt weights): the MEASURED least so far
    cache: dict = {}  # per-layer decompositions, shared by per-layer SVD in every storage
    least = math.inf  # the least fitted error so far: an estimate far above it is not worth a fit
    for place, (est, i, cand, fp) in sorted(enumerate(short), key=_fitting_order):
        if exact(fp):  # every layer stored whole in its own dtype: nothing to fit or measure
            errors[i] = scores[i] = 0.0
            least = 0.0
            continue
        if meter is not None and fp in known:
            scores[i] = known[fp]
            errors[i] = fitted.get(fp)
            least = min(least, math.inf if errors[i] is None else errors[i])
            continue
        if _bounded(cand) and est > PRUNE * least:  # it cannot win: left unfitted (its estimate is reported)
            continue
        rebuilt = rebuild_in_memory(fp, weights, whitener, config, cache)
        errors[i] = fitted[fp] = family_error(fam, weights, rebuilt, whitener)
        least = min(least, errors[i])
        if meter is None:
            scores[i] = errors[i]
            continue
        kept = sorted(kept + [(errors[i], place, i, fp, rebuilt)], key=lambda k: k[:2])[:MEASURED]
        del rebuilt
    for err, _, i, fp, rebuilt in sorted(kept, key=lambda k: k[1]):
        if not err > MEASURE_WITHIN * least:  # else the model would only confirm that it loses (NaN: measured)
            scores[i] = known[fp] = meter(rebuilt)
    return errors, scores


MEASURE_WITHIN = 1.5  # with a meter, only candidates fitted within this many times the least fitted error are measured


def _bounded(cand: Candidate) -> bool:
    """Whether the candidate's spectral estimate is close to a lower bound of its fitted error: open
    loop, it leaves out what a closed-loop fit mends and a shared basis's own whitening gains (a
    little: far less than ``PRUNE``; measured, not proved): not where it rounds a whole layer
    (no estimate) or adds residual factors the estimate leaves out."""
    return not cand.spec.rounded and not cand.residual


def _fitting_order(item) -> tuple:
    """The short list in the order it is fitted: first what the estimate cannot rank (every layer
    whole, rounded forms, residual factors), then the rest by estimate, so that the least fitted
    error so far is low when the pruning reads it."""
    place, (est, _, cand, fp) = item
    return (_bounded(cand) and not exact(fp), est if _bounded(cand) else 0.0, place)


def _weighed(cand: Candidate, fp: FamilyPlan, estimate: float | None = None, error: float | None = None,
             fitted: float | None = None) -> Weighed:
    """A candidate and its plan as a decision records them (JSON has no NaN: None for none)."""
    finite = lambda x: x if x is not None and math.isfinite(x) else None  # noqa: E731
    shown = _shown(cand, fp)
    return Weighed(shown.label, shown.kind, _top_rank(fp), cand.quant, family_bytes(fp), finite(estimate), finite(error),
                   finite(fitted))


def _top_rank(fp: FamilyPlan) -> int:
    return max((r for c in fp.chunks for r in c.ranks), default=0)


def _shown(cand: Candidate, fp: FamilyPlan) -> Candidate:
    """The candidate as what it stores: one that came out every layer dense (its budget past the
    break-even) is named so."""
    return cand if _top_rank(fp) else dense.candidate(cand.quant, cand.group_size)


def _short_list(planned: list, config: CompressConfig) -> list:
    """The candidates worth a fit: the ``SHORT_LIST`` best estimates in the reference storage, the
    best of each form there (per-layer SVD, VLoRA, shared basis: the estimates are not equally
    optimistic across forms, a stacked spectrum the most, so no form may crowd another out of
    the fit), the best in each integer storage ``--quantize auto`` adds, and every dense candidate."""
    ranked = sorted((t for t in planned if not t[2].spec.rounded), key=lambda t: t[:2])
    short = [t for t in planned if t[2].spec.rounded]
    for quant in dict.fromkeys(t[2].quant for t in ranked):
        mine = [t for t in ranked if t[2].quant == quant]
        short += mine[:SHORT_LIST if quant == config.family_scheme else 1]
    reference = [t for t in ranked if t[2].quant == config.family_scheme]
    for kind in dict.fromkeys(t[2].kind for t in reference):
        short += [t for t in reference if t[2].kind == kind][:1]
    return list({t[1]: t for t in short}.values())  # once each, by candidate index


def rank_for_budget(stacks: list[Stack], config: CompressConfig, stack_budget: int) -> int:
    """The largest uniform rank at which the reference form stores every family in ``stack_budget``.

    The rank is found on the exact bytes (scales included) by bisection; ranks later clipped to a
    matrix's full rank only make the file smaller.
    """
    for stack in stacks:
        if config.chunks and config.chunks > len(stack.layers):
            raise VloraError(f"`chunks` {config.chunks} is more than the {len(stack.layers)} layers "
                             f"of stack {stack.prefix!r}")
    families = [fam for stack in stacks for fam in stack.families]
    stored = lambda r: sum(candidate_bytes(f, space.reference(config, len(f.layers)), r, config) for f in families)  # noqa: E731
    rank = fit_rank(max(min(f.shape) for f in families), lambda r: stored(r) <= stack_budget)
    if rank < 1:
        raise VloraError(f"the target leaves {max(stack_budget, 0):,} bytes for the layer stacks; with "
                         f"`chunks` {config.chunks or 1} the bases and rank-1 increments need at least "
                         f"{stored(1):,}")
    return int(rank)


def share_budget(stacks: list[Stack], stack_budget: int) -> dict[str, int]:
    """Each family's share of a stack budget, in proportion to its original bytes.

    ``--quantize auto`` under ``--target-size`` splits the budget this way: no single float form
    need fit it (a dense fp32 base alone can be more than 12.5% of a stack)."""
    sizes = {f.name: f.nbytes for s in stacks for f in s.families}
    total = sum(sizes.values())
    return {name: stack_budget * size // total for name, size in sizes.items()}  # integers: exact halves stay whole


