"""Plan by measurement: for every family, which base, topology, chunk bounds and rank to store.

Each family gets a byte budget: what the plan the user asked for (``--rank``/``--chunks``, or
``--target-size``) would store for it with first-layer bases and a chain. Every candidate form is
then fitted at that same budget, closed loop and whitened when calibrated:

- ``none``: every layer its own low-rank factors (per-layer SVD), so the planner never does worse
  than that baseline by its own measure;
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
(spectral_error, no fit); a short list (the best estimates and the best of each form) is fitted,
and the one with the least error wins: the
model's final hidden-state error on held-back calibration samples when a meter is given, else the
summed (whitened when calibrated) squared output error of the family's layers, else their weight
error. The search is bounded: ``auto`` plans at most 3 chunk counts x 2 bases (first, mean) x 2
topologies + per-layer SVD = 13 candidates per family (x 3 storages, plus every layer dense in int8
and in int4, under ``--quantize auto``) and fits at most 4 (8 under auto); ``--shared`` adds 2 sides
x up to 3 group counts x 2 groupings x with or without residual factors, and one fit for the best
of each side with and without residual factors; ``best`` is tried only when asked for, since it
fits every layer of a chunk as the base.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..fit.integers import AUTO_SCHEMES
from ..errors import VloraError
from ..fit.factorise import PLAN_ROUNDS, Whitener, fit_family, rebuild_family, synthetic_base
from ..io.fileformat import read_matrix
from ..plan import (SHARED, STORE_DTYPES, ChunkPlan, CompressConfig, Decision, FamilyPlan, Plan, StackPlan, Weighed,
                   dense_if_cheaper, family_bytes, family_matrices, matrix_bytes, split_equal)
from ..io.stacks import Family, Stack

MAX_AUTO_CHUNKS = 3
AUTO_BASES = ("first", "mean", "none")  # "best" costs a fit per layer of every chunk: ask for it by name
SHARED_GROUPS = (2, 3, 4)  # layers a shared basis serves: Basis Sharing finds 2 to 4 alike
DENSE_SCHEMES = ("int8", "int4", "int3", "int2")  # --quantize auto: every layer dense (mid-rise grids alone measure worse)
# --quantize auto: schemes of a quantized base under a low-rank increment (below 4 bits the mid-rise
# grids, measured better there: docs/planning.md)
QLR_BASES = ("int4", "int3-midrise", "int2-midrise")
QLR_FACTORS = "int4"  # and of its factors: twice int8's rank at equal bytes, measured better (docs/planning.md)


@dataclass(frozen=True)
class Candidate:
    base: str  # first | mean | best | none | own (every layer its own base: with base_quant, W ≈ Q + B A)
    topology: str  # chain | star
    chunks: int
    quant: str = "none"  # none (the store dtype) | int8 | int4 | int3 | int2
    dense: bool = False  # every layer its own base, nothing low rank: quantization alone
    base_quant: str | None = None  # the bases' scheme where it is not ``quant``: with base ``own`` every
    # layer W ≈ Q + B A (CALDERA's form), else each chunk's base (VLoRA over a quantized base)
    grouping: str = "adjacent"  # a shared basis's groups: adjacent layers, or ``similar`` (the layers whose
    # pairs lose least by sharing, adjacent or not: similar_groups)
    residual: bool = False  # a shared basis plus each layer's own factors at residual_rank(rank)

    @property
    def label(self) -> str:
        bits = "" if self.quant == "none" else f", {self.quant}"
        if self.base == "own":
            return f"{self.base_quant} + low rank" + bits
        if self.topology in SHARED:
            by = " by similarity" if self.grouping == "similar" else ""
            left = " left" if self.topology == "shared-left" else ""
            plus = " + residual" if self.residual else ""
            return f"shared{left} basis{plus}, {self.chunks} group{'s' if self.chunks > 1 else ''}{by}" + bits
        if self.base == "none":
            return "per-layer SVD" + bits
        if self.dense:
            return "dense" + bits
        return f"{self.base} base, {self.topology}, {self.chunks} chunk{'s' if self.chunks > 1 else ''}" + bits


def plan_measured(
    stacks: list[Stack],
    config: CompressConfig,
    read: Callable[[str], torch.Tensor],
    whitener: Callable[[str], Whitener | None] = lambda key: None,
    meter: Callable[[dict[str, torch.Tensor]], float] | None = None,
    budgets: dict[str, int] | None = None,
    total: int | None = None,
) -> Plan:
    """A plan whose every family took the least-error candidate at its byte budget.

    ``meter(replacements)`` measures the model's output error with some weights replaced.
    ``budgets`` (family name -> bytes) overrides the budget the reference form sets. ``total`` is
    the stacks' byte budget of a size target: measured rank allocation spends up to it (without
    one, up to what the uniform plan stores). Only one family's layers are held in memory at a time.
    """
    stack_plans, family_plans, notes, chosen, decisions = [], [], [], [], []
    for stack in stacks:
        k_ref = config.chunks or 1
        if k_ref > len(stack.layers):
            raise VloraError(f"`chunks` {k_ref} is more than the {len(stack.layers)} layers of stack {stack.prefix!r}")
        stack_plans.append(StackPlan(stack.prefix, stack.layers, split_equal(len(stack.layers), k_ref)))
        for fam in stack.families:
            budget = (budgets[fam.name] if budgets is not None
                      else candidate_bytes(fam, reference(config, len(fam.layers)), config.rank, config))
            measure = (getattr(meter, "name", "model") if meter is not None else
                       "outputs" if whitener(fam.key(fam.layers[0])) is not None else "weights")
            weights = {layer: read(fam.key(layer)).float() for layer in fam.layers}
            best, weighed = _choose(fam, candidates(config, len(fam.layers)), weights, whitener, config, budget, meter)
            if best is None:
                raise VloraError(f"{fam.name}: no candidate fits its budget of {budget:,} bytes")
            cand, fp, index = best
            # more than one candidate: the choice is a decision, recorded with what it weighed
            decisions.append(Decision(fam.name, budget, measure, tuple(weighed), index) if weighed else None)
            family_plans.append(fp)
            chosen.append((fam, cand, budget))
    picked = [cand for _, cand, _ in chosen]
    if meter is not None and config.ranks == "measured" and len(chosen) > 1:
        uniform = family_plans
        family_plans, note, picked = allocate_ranks(chosen, family_plans, config, read, whitener, meter, total)
        notes.append(note)
        decisions = [d if d is None or new == old else replace(d, allocated=_weighed(c, new))
                     for d, old, new, c in zip(decisions, uniform, family_plans, picked)]
    if meter is not None and len(chosen) > 1:
        before = family_plans
        family_plans, picked, note = joint_check(chosen, family_plans, config, read, whitener, meter, picked)
        if note:
            notes.append(note)
            decisions = [d if d is None or new == old else replace(d, allocated=_weighed(c, new))
                         for d, old, new, c in zip(decisions, before, family_plans, picked)]
    return Plan(tuple(stack_plans), tuple(family_plans), tuple(notes),
                decisions=tuple(d for d in decisions if d is not None))


SHORT_LIST = 3  # candidates, best by their estimated error, that are fitted and measured


def _choose(fam: Family, cands: list[Candidate], weights, whitener, config: CompressConfig, budget: int, meter):
    """(best (candidate, plan, its index in the list) or None, [Weighed] of every candidate that
    fits, in the order tried: empty where there was only one)

    Every candidate is planned at the budget and ranked by spectral_error, an estimate from singular
    values that all candidates of the family share (no fit: on SmolLM2 fitting every candidate cost
    70% of the plan). The ``SHORT_LIST`` best, per-layer SVD (the baseline is always fitted), and
    under ``--quantize auto`` the best of each other storage and every dense one (the estimate does
    not see rounding) are then fitted and scored by the family's summed (whitened) output error;
    with a meter, by the model's output error instead. Only the short list's rebuilt weights are
    held, one at a time."""
    spectra: dict = {}  # singular values per (reference, layer): every candidate's estimate reads them
    planned = []  # (estimate, index, candidate, plan)
    for i, cand in enumerate(cands):
        fp = fit_candidate(fam, cand, weights, whitener, config, budget, spectra)
        if fp is None:
            continue
        if len(cands) == 1:  # nothing to choose between: no need to measure
            return (cand, fp, 0), []
        est = float("nan") if _rounded(cand) else spectral_error(fp, weights, whitener, spectra,
                                                                 config.calibration.damping)
        planned.append((est, i, cand, fp))
    del spectra
    short = _short_list(planned, config)
    best, scores = None, {}
    cache: dict = {}  # per-layer decompositions, shared by per-layer SVD in every storage
    # per-layer SVD first, so that it wins ties: where every form comes out dense (a budget past the
    # break-even) the family is then per-layer SVD, whose scaled budgets rank allocation tries next
    # (SmolLM2's k and v at 35% removed were a first-layer chain, whose scaled-down options are worse)
    for _, i, cand, fp in sorted(short, key=lambda t: (form(t[2]) != "per-layer", t[1])):
        if exact(fp):  # every layer stored whole in its own dtype: nothing to fit or measure
            score = 0.0
        else:
            rebuilt = rebuild_in_memory(fp, weights, whitener, config, cache)
            score = meter(rebuilt) if meter is not None else family_error(fam, weights, rebuilt, whitener)
            del rebuilt
        scores[i] = score
        if best is None or score < best[2] * (1 - 1e-9):
            best = (cand, fp, score, i)
    if best is None:
        return None, []
    at = [i for _, i, _, _ in planned]
    weighed = [_weighed(cand, fp, est, scores.get(i)) for est, i, cand, fp in planned]
    return (*best[:2], at.index(best[3])), weighed


def _weighed(cand: Candidate, fp: FamilyPlan, estimate: float | None = None, error: float | None = None) -> Weighed:
    """A candidate and its plan as a decision records them (JSON has no NaN: None for none)."""
    finite = lambda x: x if x is not None and math.isfinite(x) else None  # noqa: E731
    shown = _shown(cand, fp)
    return Weighed(shown.label, form(shown), _top_rank(fp), cand.quant, family_bytes(fp), finite(estimate), finite(error))


def _top_rank(fp: FamilyPlan) -> int:
    return max((r for c in fp.chunks for r in c.ranks), default=0)


def _shown(cand: Candidate, fp: FamilyPlan) -> Candidate:
    """The candidate as what it stores: one that came out every layer dense (its budget past the
    break-even) is named so."""
    return cand if _top_rank(fp) else Candidate("first", "chain", 1, cand.quant, dense=True)


def exact(fp: FamilyPlan) -> bool:
    """Whether the plan stores every layer whole, in its own dtype: it rebuilds the weights exactly,
    so its error is 0 without a forward pass (a budget past the break-even, as SmolLM2's k and v
    projections at 35% removed, where every candidate comes out dense)."""
    return (fp.quant == "none" and fp.store_dtype == fp.dtype
            and all(len(c.layers) == 1 and c.base_layer == c.layers[0] for c in fp.chunks))


def form(cand: Candidate) -> str:
    """The kind of form a candidate is: per-layer, VLoRA (a base and increments), shared (a basis per
    group) or dense."""
    if cand.dense:
        return "dense"
    if cand.base == "own":
        return "quantized + low rank"
    if cand.topology in SHARED:
        return cand.topology + (" + residual" if cand.residual else "")
    return "per-layer" if cand.base == "none" else "vlora"


def _short_list(planned: list, config: CompressConfig) -> list:
    """The candidates worth a fit: the ``SHORT_LIST`` best estimates in the reference storage, the
    best of each form there (per-layer SVD, VLoRA, shared basis: the estimates are not equally
    optimistic across forms, a stacked spectrum the most, so no form may crowd another out of
    the fit), the best in each integer storage ``--quantize auto`` adds, and every dense candidate."""
    ranked = sorted((t for t in planned if not _rounded(t[2])), key=lambda t: t[:2])
    short = [t for t in planned if _rounded(t[2])]
    for quant in dict.fromkeys(t[2].quant for t in ranked):
        mine = [t for t in ranked if t[2].quant == quant]
        short += mine[:SHORT_LIST if quant == config.family_scheme else 1]
    reference = [t for t in ranked if t[2].quant == config.family_scheme]
    for kind in dict.fromkeys(form(t[2]) for t in reference):
        short += [t for t in reference if form(t[2]) == kind][:1]
    return list({t[1]: t for t in short}.values())  # once each, by candidate index


def _rounded(cand: Candidate) -> bool:
    """Whether a candidate's error is mostly its integers' rounding, which singular values do not
    see (dense, and a quantized base under its increments): such candidates are always fitted."""
    return cand.dense or cand.base == "own"


def spectral_error(fp: FamilyPlan, weights, whitener, spectra: dict, damping: float = 1e-2) -> float:
    """The family's relative (whitened) output error that the plan's truncations alone would leave,
    every reference taken as the matrix it stands for (open loop): Σ_l tail_{r_l}((W_l - R_l) S_l)
    over Σ_l ||W_l S_l||², with R_l zero (per-layer), the chunk's base layer, the layer before
    (chain) or the chunk's whitened mean; for a shared basis, the tail of the group's whitened
    weights stacked (the one right factor that serves them all best). The singular values are kept
    in ``spectra`` per (reference, layer), so a family's 13 candidates cost about 8 decompositions a
    layer, not 13 fits. Closed-loop fitting can do a little better (an increment also mends the error before it)
    or worse (errors down a chain); the short list is fitted and measured to settle that."""
    err = total = 0.0
    for chunk in fp.chunks:
        if chunk.topology in SHARED:  # the best one factor for the group: its layers stacked, or side by side
            name = (chunk.topology, chunk.layers)
            if name not in spectra:
                left = chunk.topology == "shared-left"
                common = _common_whitener(fp, chunk.layers, whitener, left, damping)
                spectra[name] = torch.linalg.svdvals(torch.cat([_whiten(weights[x].double(), common(fp.key(x)))
                                                                for x in chunk.layers], dim=1 if left else 0))
            err += float(spectra[name][chunk.ranks[0]:].square().sum())  # a residual's gain is not estimated
            continue
        mean = None
        for layer, ref in chunk.steps():
            ref = chunk.base if ref is None else ref
            if ref == "synthetic":
                name = ("mean", chunk.layers)
                if (name, layer) not in spectra:
                    if mean is None:
                        by_key = {fp.key(x): weights[x] for x in chunk.layers}
                        mean = synthetic_base(fp, chunk, by_key.__getitem__, whitener).to(weights[layer])
                    spectra[name, layer] = _spectrum(fp.key(layer), weights[layer] - mean, whitener)
            else:
                name = ref
                if (name, layer) not in spectra:
                    delta = weights[layer] if ref == "none" else weights[layer] - weights[ref]
                    spectra[name, layer] = _spectrum(fp.key(layer), delta, whitener)
            err += float(spectra[name, layer][chunk.rank_of(layer):].square().sum())
    for layer in fp.layers:
        if ("norm", layer) not in spectra:
            spectra["norm", layer] = float(_whiten(weights[layer].double(), whitener(fp.key(layer))).square().sum())
        total += spectra["norm", layer]
    return err / total if total > 0 else err


def _common_whitener(fam: Family, layers, whitener, left: bool, damping: float):
    """The whitening to compare ``layers`` by when one factor (the left one where ``left``) is
    shared. Where that factor is on the side the whitening does not act on (nn.Linear's outputs,
    Conv1D's), each layer's own whitening leaves its subspace as it is: ``whitener`` itself, exact.
    Where it is on the inputs' side, one whitening for all, by the mean of the layers' Grams, as
    _fit_basis whitens a group's basis by their sum."""
    whs = {fam.key(x): whitener(fam.key(x)) for x in layers}
    if any(wh is None for wh in whs.values()) or (next(iter(whs.values())).side == 0) != left:
        return whitener
    side = next(iter(whs.values())).side
    mean = Whitener.from_gram(sum(wh.gram for wh in whs.values()) / len(whs), side, damping)
    return lambda key: mean if key in whs else whitener(key)


def _spectrum(key: str, delta: torch.Tensor, whitener) -> torch.Tensor:
    """Singular values of ``delta``, whitened by ``key``'s inputs when calibrated."""
    return torch.linalg.svdvals(_whiten(delta.double(), whitener(key)))


def _whiten(m: torch.Tensor, wh: Whitener | None) -> torch.Tensor:
    """Whitener.whiten, or M itself without calibration."""
    return m if wh is None else wh.whiten(m)


RANK_SCALES = (0.5, 0.75, 1.25, 1.5)  # each family's byte budget scaled, to measure its sensitivity


def allocate_ranks(chosen, uniform: list[FamilyPlan], config, read, whitener, meter,
                   target: int | None = None) -> tuple[list[FamilyPlan], str, list[Candidate]]:
    """Move bytes between families to where the model's measured output error falls fastest.

    Each family is refitted alone at a few scaled budgets and the model's held-back output error
    measured (the ASVD-style sensitivity); a Lagrangian picks one option per family within the total
    budget (``target``, else the uniform plan's bytes), and the bytes its pick leaves are spent
    again. The result is kept only if, measured with every family compressed at once, it beats the
    uniform plan: an allocation never ships when it measures worse.

    Under ``--quantize auto`` a family's options also hold other bits (``_bit_options``): every
    layer dense in each scheme, and a quantized base of each scheme under a low-rank increment at
    the family's budget and half as much again, so the Lagrangian moves bits between families, not
    only rank: int4 where the model is sensitive, int2 under a low-rank term where it is not.
    """
    options = []  # per family: [(bytes, error, plan, candidate)]
    total = 0
    for (fam, cand, budget), fp in zip(chosen, uniform):
        weights = {layer: read(fam.key(layer)).float() for layer in fam.layers}
        cache: dict = {}  # per-layer decompositions, truncated at every scale (one family's at a time)
        spectra: dict = {}
        opts = [(family_bytes(fp), 0.0 if exact(fp) else meter(rebuild_in_memory(fp, weights, whitener, config, cache)),
                 fp, cand)]
        tries = [(cand, scale) for scale in RANK_SCALES] + (_bit_options(cand) if config.quantize == "auto" else [])
        for other, scale in tries:
            alt = fit_candidate(fam, other, weights, whitener, config, int(budget * scale), spectra)
            if alt is not None and all(alt != o[2] for o in opts):
                opts.append((family_bytes(alt), meter(rebuild_in_memory(alt, weights, whitener, config, cache)), alt,
                             other))
        del cache, spectra
        options.append(opts)
        total += family_bytes(fp)
    total = max(total, target or 0)  # a target's rounding to whole ranks leaves bytes too
    picked = _lagrangian(options, total)
    allocated = _spend_slack(chosen, options, picked, total, config, read, whitener)
    kept = [cand for _, cand, _ in chosen]
    if allocated == list(uniform):
        return list(uniform), "ranks: uniform (no reallocation measured better per family)", kept
    err_uniform = meter(_rebuild_all(chosen, uniform, config, read, whitener))
    err_alloc = meter(_rebuild_all(chosen, allocated, config, read, whitener))
    if err_alloc < err_uniform:
        moved = [f"{fam.name} {cand.label} -> {opts[i][3].label}" for (fam, cand, _), opts, i in zip(chosen, options, picked)
                 if opts[i][3] != cand]
        return allocated, (f"ranks: allocated by measured sensitivity, output error {err_alloc:.4g} vs {err_uniform:.4g} uniform"
                           + (f"; bits moved: {'; '.join(moved)}" if moved else "")), [opts[i][3] for opts, i in zip(options, picked)]
    return list(uniform), f"ranks: uniform kept, output error {err_uniform:.4g} vs {err_alloc:.4g} allocated", kept


def _spend_slack(chosen, options, picked: list[int], total: int, config, read, whitener) -> list[FamilyPlan]:
    """The picked options with the bytes they leave under ``total`` spent again.

    The options are a few scaled budgets per family, so the Lagrangian's pick can leave a tenth of
    the budget unused (SmolLM2 at 0.8 of the model: 0.726 stored). The families whose measured
    error fell fastest per byte are refitted first, each at its bytes plus all that is left, so the
    plan lands within one rank step of one family under the total."""
    plans = [opts[i][2] for opts, i in zip(options, picked)]
    slack = total - sum(family_bytes(fp) for fp in plans)

    def slope(opts, i):  # the steepest measured fall in error per byte above the picked option
        nbytes, err = opts[i][:2]
        return max(((err - o[1]) / (o[0] - nbytes) for o in opts if o[0] > nbytes), default=0.0)

    for j in sorted(range(len(plans)), key=lambda j: -slope(options[j], picked[j])):
        fam, cand = chosen[j][0], options[j][picked[j]][3]  # the picked option's form and bits
        if cand.dense:  # a fixed size: nothing to grow
            continue
        step = candidate_bytes(fam, cand, 2, config) - candidate_bytes(fam, cand, 1, config)
        if slack < step:  # not one more rank of this family: no refit
            continue
        have = family_bytes(plans[j])
        weights = {layer: read(fam.key(layer)).float() for layer in fam.layers}
        grown = fit_candidate(fam, cand, weights, whitener, config, have + slack)
        if grown is not None and have < family_bytes(grown) <= have + slack:
            slack -= family_bytes(grown) - have
            plans[j] = grown
    return plans


BIT_SCALES = (1.0, 1.5)  # budgets, as shares of a family's, at which --quantize auto's allocation tries other bits


def _bit_options(cand: Candidate) -> list[tuple[Candidate, float]]:
    """(candidate, budget scale) of the other bits a family may take under ``--quantize auto``: every
    layer dense in each scheme (its bytes are its own; the scale only lets it fit), and each quantized
    base under a low-rank increment at ``BIT_SCALES``; the chosen candidate's own are already tried."""
    dense = [(Candidate("first", "chain", 1, q, dense=True), max(RANK_SCALES)) for q in DENSE_SCHEMES]
    based = [(Candidate("own", "star", 1, QLR_FACTORS, base_quant=q), scale) for q in QLR_BASES for scale in BIT_SCALES]
    return [(c, scale) for c, scale in dense + based if c != cand]


def _lagrangian(options, budget: int) -> list[int]:
    """One option per family minimising Σ error with Σ bytes <= budget (errors taken as additive)."""
    def pick(lam):
        return [min(range(len(o)), key=lambda i: o[i][1] + lam * o[i][0]) for o in options]

    lo, hi = 0.0, 1.0
    while sum(o[i][0] for o, i in zip(options, pick(hi))) > budget and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(o[i][0] for o, i in zip(options, pick(mid))) > budget:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    if sum(o[i][0] for o, i in zip(options, choice)) > budget:
        return [0] * len(options)  # the uniform plan is option 0 everywhere and fits by construction
    return choice


def joint_check(chosen, plans: list[FamilyPlan], config, read, whitener, meter,
                picked: list[Candidate] | None = None) -> tuple[list[FamilyPlan], list[Candidate], str]:
    """(plans, their candidates, a note or "") with every family whose form is not per-layer SVD
    measured against per-layer SVD at its bytes, with every family compressed at once: the lower
    ships, one family at a time in order.

    A family's form is chosen with that family alone compressed, and what wins alone need not win
    together: on all-MiniLM-L6-v2 shared bases won five families' choices and lost end to end
    (0.834 against 0.843 at 50% of the bytes), as errors that share a basis add up through the
    layers where per-layer errors partly cancel. Costs a rebuild and a measurement per such family."""
    picked = list(picked) if picked is not None else [cand for _, cand, _ in chosen]
    plans = list(plans)
    checked = [j for j, ((fam, _, _), fp, cand) in enumerate(zip(chosen, plans, picked))
               if form(cand) not in ("per-layer", "dense") and not exact(fp)
               and _per_layer(cand) in candidates(config, len(fam.layers))]
    if not checked:
        return plans, picked, ""
    rebuilt = []  # per family: its rebuilt weights, so that each trial refits only the family it swaps
    for (fam, _, _), fp in zip(chosen, plans):
        weights = {layer: read(fam.key(layer)).float() for layer in fam.layers}
        rebuilt.append(rebuild_in_memory(fp, weights, whitener, config))
    joined = lambda parts: {k: v for part in parts for k, v in part.items()}  # noqa: E731
    current = meter(joined(rebuilt))
    lines = []
    for j in checked:
        fam = chosen[j][0]
        weights = {layer: read(fam.key(layer)).float() for layer in fam.layers}
        alt = fit_candidate(fam, _per_layer(picked[j]), weights, whitener, config, family_bytes(plans[j]))
        if alt is None:
            continue
        swapped = rebuild_in_memory(alt, weights, whitener, config)
        err = meter(joined(rebuilt[:j] + [swapped] + rebuilt[j + 1:]))
        keep = err >= current
        lines.append(f"{fam.name} {picked[j].label} {current:.4g} vs per-layer SVD {err:.4g}"
                     + ("" if keep else ": per-layer SVD ships"))
        if not keep:
            plans[j], picked[j], rebuilt[j], current = alt, _per_layer(picked[j]), swapped, err
    return plans, picked, "checked together (output error, every family compressed): " + "; ".join(lines)


def _per_layer(cand: Candidate) -> Candidate:
    """Per-layer SVD in the candidate's storage."""
    return Candidate("none", "star", 1, cand.quant)


def _rebuild_all(chosen, plans, config, read, whitener) -> dict[str, torch.Tensor]:
    out = {}
    for (fam, _, _), fp in zip(chosen, plans):
        weights = {layer: read(fam.key(layer)).float() for layer in fam.layers}
        out.update(rebuild_in_memory(fp, weights, whitener, config))
    return out





def candidates(config: CompressConfig, n_layers: int) -> list[Candidate]:
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
                out.append(Candidate("own", "star", 1, q, base_quant=bq))
                continue
            elif b == "none":
                if config.topology not in SHARED:
                    out.append(Candidate("none", "star", 1, q))
                shared = [config.topology] if config.topology in SHARED else list(SHARED) if config.shared else []
                if shared and config.topology in SHARED + ("auto",):
                    groups = ([config.chunks] if config.chunks and config.topology in SHARED
                              else sorted({-(-n_layers // size) for size in SHARED_GROUPS}))  # at most size each
                    out += [Candidate("none", t, k, q, grouping=g, residual=res) for t in shared for k in groups
                            if 1 <= k and 2 * k <= n_layers for g in ("adjacent", "similar") for res in (False, True)]
                continue
            out += [Candidate(b, t, k, q, base_quant=bq) for t in topologies if t not in SHARED for k in counts
                    if k <= n_layers]
    if base == "auto" and not config.chunks:
        # quantization alone, the yardstick, as a choice: every layer dense in the scheme, or under
        # auto in each (bits as a choice), with below 8 bits a dense layer under a low-rank increment
        # that mends what its rounding lost (W ≈ Q + B A)
        dense = DENSE_SCHEMES if config.quantize == "auto" else schemes
        out += [Candidate("first", "chain", n_layers, q, dense=True) for q in dense if q != "none"]
        if config.quantize == "auto":
            out += [Candidate("own", "star", 1, QLR_FACTORS, base_quant=q) for q in QLR_BASES]
    return out


def reference(config: CompressConfig, n_layers: int) -> Candidate:
    """The form whose bytes at ``config.rank`` set every candidate's budget: the one asked for,
    with ``auto`` read as first-layer bases in a chain, and no ``--chunks`` as one chunk."""
    base = "none" if config.method == "svd" else config.base
    base = "none" if config.topology in SHARED else "first" if base == "auto" else base
    topology = "chain" if config.topology == "auto" else config.topology
    chunks = 1 if base == "none" and topology not in SHARED else min(config.chunks or 1, n_layers)
    if config.base_quantize is not None:  # bases in integers of their own; with svd, every layer's
        return Candidate("own" if base == "none" else base, "star" if base == "none" else topology, chunks,
                         config.family_scheme, base_quant=config.base_quantize)
    return Candidate(base, topology, chunks, config.family_scheme)


def candidate_bytes(fam: Family, cand: Candidate, rank: int, config: CompressConfig) -> int:
    """Exact stored bytes of ``fam`` as ``cand`` at a uniform ``rank``, quantization scales included:
    at most every layer dense, which is what fit_candidate stores where factors would cost more."""
    m, n = fam.shape
    r = min(rank, m, n)
    size = lambda shape, q=cand.quant: matrix_bytes(shape, _store(fam, config), q, config.group_size)  # noqa: E731
    bases, increments = _counts(fam, cand)
    if cand.topology in SHARED:  # a basis per group, every layer its own coefficients (and residual factors)
        basis, own = ((m, r), (r, n)) if cand.topology == "shared-left" else ((r, n), (m, r))
        s = residual_rank(r) if cand.residual else 0
        residual = size((m, s)) + size((s, n)) if s else 0
        factored = min(cand.chunks, len(fam.layers)) * size(basis) + increments * (size(own) + residual)
    else:
        factored = bases * size((m, n), cand.base_quant or cand.quant) + increments * (size((m, r)) + size((r, n)))
    return factored if _rounded(cand) else min(factored, len(fam.layers) * size((m, n), cand.base_quant or cand.quant))


def _counts(fam: Family, cand: Candidate) -> tuple[int, int]:
    """(dense bases, increments): a mean base is stored once and every layer is an increment; a
    layer base is a layer; a zero base is stored nowhere."""
    if cand.dense:  # every layer whole, whatever the candidate's chunk count
        return len(fam.layers), 0
    if cand.base in ("none", "own"):
        return (len(fam.layers) if cand.base == "own" else 0), len(fam.layers)
    chunks = min(cand.chunks, len(fam.layers))
    if cand.base == "mean":  # a chunk of one layer is that layer, stored as its own base
        alone = sum(1 for a, b in split_equal(len(fam.layers), chunks) if b - a == 1)
        return chunks, len(fam.layers) - alone
    return chunks, len(fam.layers) - (chunks if cand.base in ("first", "best") else 0)


def _fit_rank(cap: int, fits: Callable[[int], bool]) -> int:
    """The largest rank in 0..``cap`` whose exact bytes fit, by bisection: bytes grow with the rank,
    but not affinely (scales step with it), and an affine estimate per value would leave bytes unused
    (int8's one scale per row of 384 is 0.5% more, not the 6% a safe per-value estimate charges)."""
    lo, hi = 0, cap
    if not fits(lo):
        return -1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


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
    stored = lambda r: sum(candidate_bytes(f, reference(config, len(f.layers)), r, config) for f in families)  # noqa: E731
    rank = _fit_rank(max(min(f.shape) for f in families), lambda r: stored(r) <= stack_budget)
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
    return {name: int(stack_budget * size / total) for name, size in sizes.items()}


def fit_candidate(fam: Family, cand: Candidate, weights, whitener, config: CompressConfig,
                  budget: int, spectra: dict | None = None) -> FamilyPlan | None:
    """The candidate's plan at the largest uniform rank within ``budget``; None if none fits.
    ``spectra`` keeps the family's delta spectra between candidates (chain_cost)."""
    n_layers = len(fam.layers)
    if cand.chunks > n_layers:
        return None
    if cand.dense:
        if candidate_bytes(fam, cand, 0, config) > budget:
            return None
        return _family_plan(fam, config, [ChunkPlan((layer,), (0,), layer, "chain") for layer in fam.layers],
                            cand.quant)
    rank = _fit_rank(min(fam.shape), lambda r: candidate_bytes(fam, cand, r, config) <= budget) if _counts(fam, cand)[1] else 0
    if rank < 1:
        return None
    if cand.base == "own":  # every layer W ≈ Q + B A: its own chunk, a quantized base, one increment
        chunks = [ChunkPlan((layer,), (rank,), "synthetic", "star") for layer in fam.layers]
        return _family_plan(fam, config, chunks, cand.quant, cand.base_quant)
    if cand.topology in SHARED:  # groups of equal size, one basis each
        groups = adjacent = [fam.layers[a:b] for a, b in split_equal(n_layers, cand.chunks)]
        if cand.grouping == "similar":
            groups = similar_groups(fam, weights, whitener, rank, adjacent, spectra, cand.topology == "shared-left",
                                    config.calibration.damping)
            if groups == adjacent:  # nothing the adjacent candidate does not already try
                return None
        own = (residual_rank(rank),) if cand.residual else ()
        chunks = [ChunkPlan(g, (rank,) * len(g), "none", cand.topology, own * len(g)) for g in groups]
        return dense_if_cheaper(_family_plan(fam, config, chunks, cand.quant))
    if cand.base == "none":
        return dense_if_cheaper(_family_plan(fam, config, [ChunkPlan(fam.layers, (rank,) * n_layers, "none", "star")],
                                             cand.quant))
    if config.bounds == "equal":
        bounds = split_equal(n_layers, cand.chunks)
    else:
        bounds = partition(n_layers, cand.chunks, chain_cost(fam, weights, whitener, rank, spectra))
    chunks = []
    for start, end in bounds:
        layers = fam.layers[start:end]
        if cand.base == "mean" and len(layers) > 1:
            chunks.append(ChunkPlan(layers, (rank,) * len(layers), "synthetic", cand.topology))
        elif cand.base in ("first", "mean") or len(layers) == 1:
            chunks.append(ChunkPlan(layers, (0,) + (rank,) * (len(layers) - 1), layers[0], cand.topology))
        else:
            chunks.append(_best_base(fam, layers, rank, cand.topology, weights, whitener, config, cand.quant,
                                     cand.base_quant))
    return dense_if_cheaper(_family_plan(fam, config, chunks, cand.quant, cand.base_quant))


def residual_rank(rank: int) -> int:
    """A shared candidate's per-layer residual rank at shared rank ``rank``: a quarter of it (at
    least 1), so that most bytes stay in the shared part and each layer keeps a few directions of
    its own that the group's basis cannot hold."""
    return max(1, rank // 4)


PAIR_SPAN = 4  # similar_groups reads each layer in its top PAIR_SPAN x rank directions (all of them where fewer)


def similar_groups(fam: Family, weights, whitener, rank: int, groups: list[tuple[int, ...]],
                   spectra: dict | None = None, left: bool = False, damping: float = 1e-2) -> list[tuple[int, ...]]:
    """Groups of the same sizes as ``groups`` whose layers share a basis best, adjacent or not
    (Geo-Sharing's point: the layers that share best need not be neighbours).

    What two layers lose by sharing is measured as the energy one rank-``rank`` basis of the pair
    leaves: the tail of their whitened weights stacked (side by side for a shared left factor), as a
    share of their energy, the quantity spectral_error estimates for a whole group. Where the shared
    factor is the one the whitening acts on (the inputs' side), every layer is whitened by the
    family's mean Gram (``_common_whitener``): a basis shared in the inputs' own coordinates is one
    subspace under one whitening, and would look like several under each layer's own. It is computed in
    the span of each layer's top ``PAIR_SPAN``·``rank`` singular vectors (exact where that is all of
    them, as on SmolLM2; a 7B model's 11008-wide projections cost an eigenproblem of at most
    2·``PAIR_SPAN``·``rank`` a pair), once a pair: the stacked spectrum is kept in ``spectra`` and
    serves every later candidate of the family whose rank needs no more than half that span. A
    group's loss is the sum of its pairs'. From ``groups`` and from a greedy start (the cheapest pairs first), the swap of two layers
    between groups that lowers the total most is made until none does; the lower of the two results
    is kept, so ``groups`` comes back where nothing beats it. Each group is ascending and the groups
    are ordered by their first layer, as the format wants. ``spectra`` keeps each layer's singular
    vectors for the family's other candidates."""
    spectra = {} if spectra is None else spectra
    layers, side = list(fam.layers), "left" if left else "right"
    tops = {}
    # the family's mean Gram is made once: later candidates find every layer's vectors in ``spectra``
    common = (_common_whitener(fam, layers, whitener, left, damping) if any((side, x) not in spectra for x in layers)
              else None)
    for x in layers:
        if (side, x) not in spectra:
            m = _whiten(weights[x].double(), common(fam.key(x)))
            _, sv, vh = torch.linalg.svd(m.T if left else m, full_matrices=False)  # a left subspace: the transpose's right
            spectra[side, x] = (sv, vh)
        tops[x] = spectra[side, x]
    # each pair's stacked spectrum, kept for every later rank: one eigenproblem a pair for all of a
    # family's candidates (before, one a pair per candidate: 12 per family under --shared)
    pairs = spectra.setdefault((side, "pairs"), {})
    loss = {}
    for i, x in enumerate(layers):
        for y in layers[i + 1:]:
            if (x, y) not in pairs or pairs[x, y][0] < min(2 * rank, len(tops[x][0])):
                keep = min(PAIR_SPAN * rank, len(tops[x][0]))
                (sa, va), (sb, vb) = tops[x], tops[y]
                ab = torch.cat([sa[:keep, None] * va[:keep], sb[:keep, None] * vb[:keep]])  # S V: what their energy reads
                gram = ab @ ab.T if ab.shape[0] <= ab.shape[1] else ab.T @ ab
                kept = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).cumsum(0)
                pairs[x, y] = (keep, kept, float(sa.square().sum() + sb.square().sum()))
            _, kept, energy = pairs[x, y]
            held = float(kept[min(rank, len(kept)) - 1]) if rank else 0.0
            loss[x, y] = loss[y, x] = max(energy - held, 0.0) / max(energy, 1e-30)

    def total(members):
        return sum(loss[x, y] for g in members for i, x in enumerate(g) for y in g[i + 1:])

    def improve(members):
        members = [list(g) for g in members]
        where = {x: g for g, ms in enumerate(members) for x in ms}

        def cost(x, g, without=None):  # x's summed loss with a group's members
            return sum(loss[x, y] for y in members[g] if y not in (x, without))

        for _ in range(len(layers) ** 2):  # each swap lowers the total: this bounds it generously
            best, swap = 1e-12, None
            for x in layers:
                for y in layers:
                    gx, gy = where[x], where[y]
                    if gx < gy:
                        gain = cost(x, gx) + cost(y, gy) - cost(x, gy, y) - cost(y, gx, x)
                        if gain > best:
                            best, swap = gain, (x, y)
            if swap is None:
                break
            x, y = swap
            gx, gy = where[x], where[y]
            members[gx][members[gx].index(x)], members[gy][members[gy].index(y)] = y, x
            where[x], where[y] = gy, gx
        return sorted((tuple(sorted(g)) for g in members), key=lambda g: g[0])

    greedy, left_over = [], set(layers)  # each group seeded by the cheapest pair left, filled by the cheapest joins
    for size in sorted((len(g) for g in groups), reverse=True):
        pairs = [(loss[x, y], x, y) for x in left_over for y in left_over if x < y]
        group = list(min(pairs)[1:]) if size > 1 and pairs else [min(left_over)]
        while len(group) < size:
            group.append(min(left_over - set(group), key=lambda z: sum(loss[z, y] for y in group)))
        greedy.append(group)
        left_over -= set(group)
    start = improve(groups)
    other = improve(greedy)
    return other if total(other) < total(start) * (1 - 1e-9) else start


def partition(n: int, k: int, cost: Callable[[int, int], float]) -> tuple[tuple[int, int], ...]:
    """Contiguous [start, end) bounds of ``k`` chunks over ``n`` layers minimising Σ cost(start, end)."""
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for end in range(j, n - (k - j) + 1):
            for start in range(j - 1, end):
                c = best[j - 1][start] + cost(start, end)
                if c < best[j][end]:
                    best[j][end], back[j][end] = c, start
    bounds, end = [], n
    for j in range(k, 0, -1):
        start = back[j][end]
        bounds.append((start, end))
        end = start
    return tuple(reversed(bounds))


def chain_cost(fam: Family, weights, whitener, rank: int, spectra: dict | None = None) -> Callable[[int, int], float]:
    """Cost of a chunk as a first-base chain: the delta energy past ``rank`` on every internal link.

    Each consecutive delta's singular values are found once (whitened when calibrated), so the
    dynamic programme costs one decomposition per layer, not one per chunk; ``spectra`` keeps them
    for the family's next candidate, whatever its rank (one family's links at a time).
    """
    spectra = {} if spectra is None else spectra
    tails = [0.0]
    for prev, layer in zip(fam.layers, fam.layers[1:]):
        if (prev, layer) not in spectra:
            spectra[prev, layer] = _spectrum(fam.key(layer), weights[layer] - weights[prev], whitener)
        tails.append(float(spectra[prev, layer][rank:].square().sum()))
    prefix = [0.0]
    for t in tails:
        prefix.append(prefix[-1] + t)
    # the links inside chunk [start, end) are those into positions start+1 .. end-1
    return lambda start, end: prefix[end] - prefix[start + 1]


def rebuild_in_memory(fp: FamilyPlan, weights, whitener, config: CompressConfig,
                      svd_cache: dict | None = None) -> dict[str, torch.Tensor]:
    """Fit ``fp`` and rebuild its layers exactly as compress and expand would, without writing,
    except that a shared basis does not alternate with residual factors (``PLAN_ROUNDS``): the
    written fit's rounds only lower the summed whitened error of what is measured here."""
    by_key = {fp.key(layer): weights[layer] for c in fp.chunks for layer in c.layers}
    walk = fit_family(fp, by_key.__getitem__, config, whitener, svd_cache=svd_cache, measure=False, rounds=PLAN_ROUNDS)
    stored = {item[0]: item[1] for item in walk if isinstance(item, tuple)}
    shapes = dict(family_matrices(fp))
    return dict(rebuild_family(fp, lambda name: read_matrix(fp, shapes[name], name, stored.__getitem__)))


def family_error(fam: Family, weights, rebuilt: dict[str, torch.Tensor], whitener) -> float:
    """Σ_l ||(W_l - Ŵ_l) S_l||² relative to Σ_l ||W_l S_l||², with S = I when uncalibrated."""
    err = total = 0.0
    for layer in fam.layers:
        key = fam.key(layer)
        if key not in rebuilt:
            continue
        w = weights[layer].double()
        d = w - rebuilt[key].double()
        wh = whitener(key)
        w, d = _whiten(w, wh), _whiten(d, wh)
        err += float(d.square().sum())
        total += float(w.square().sum())
    return err / total if total > 0 else err


def _best_base(fam, layers, rank, topology, weights, whitener, config, quant: str, base_quant=None) -> ChunkPlan:
    """The chunk's layer that, as its base, leaves the least residual over the chunk."""
    best = None
    for b in layers:
        chunk = ChunkPlan(layers, tuple(0 if layer == b else rank for layer in layers), b, topology)
        fp = _family_plan(fam, config, [chunk], quant, base_quant)
        err = family_error(fam, weights, rebuild_in_memory(fp, weights, whitener, config), whitener)
        if best is None or err < best[0]:
            best = (err, chunk)
    return best[1]


def _family_plan(fam: Family, config: CompressConfig, chunks, quant: str, base_quant: str | None = None) -> FamilyPlan:
    """``base_quant`` is kept only where some chunk has a base to store in it."""
    base_quant = base_quant if any(c.base != "none" for c in chunks) else None
    return FamilyPlan(fam.stack, fam.suffix, fam.shape, fam.dtype, _store(fam, config), tuple(chunks),
                      quant, config.group_size, base_quant)


def _store(fam: Family, config: CompressConfig) -> str:
    return STORE_DTYPES[config.dtype] if config.dtype else fam.dtype
