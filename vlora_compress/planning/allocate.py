"""Measured allocation: bytes (and, under ``--quantize auto``, bits) moved between families to
where the model's measured output error falls fastest, and the check of every family's form with
every family compressed at once."""

from __future__ import annotations

from ..forms import Candidate, candidate_bytes, dense, per_layer, quantized_base
from ..forms.dense import DENSE_SCHEMES
from ..forms.quantized_base import QLR_BASES, QLR_FACTORS
from ..forms.stored import family_bytes
from ..plan import Allocation, FamilyPlan, Together, finite
from .budget import fit_candidate
from .measure import exact, family_error, rebuild_in_memory, rebuild_plans
from .passthrough import replacements
from . import space


RANK_SCALES = (0.5, 0.75, 1.25, 1.5)  # each family's byte budget scaled, to measure its sensitivity


def allocate_ranks(chosen, uniform: list[FamilyPlan], config, read, whitener, meter, target: int | None = None,
                   known: dict | None = None, fitted: dict | None = None, passthrough: list[list[tuple]] = ()
                   ) -> tuple[list[FamilyPlan], Allocation, list[Candidate], list[int]]:
    """Move bytes between families to where the model's measured output error falls fastest.

    Each family is refitted alone at a few scaled budgets (the ASVD-style sensitivity); a Lagrangian
    picks one option per family within the total budget (``target``, else the uniform plan's bytes),
    and the bytes its pick leaves are spent again. An option's error on the model is estimated from
    its fit (``_options``: the family's own output error, scaled by what the model measured for the
    family's choice), and only the options the Lagrangian picks are measured, until it picks none
    unmeasured (``ROUNDS`` at most): a measurement is a forward pass of the model on the held-back
    samples (10 s on SmolLM2, two cores). The result is kept only if, measured with every family compressed at
    once, it beats the uniform plan: an allocation never ships when it measures worse. What it did
    is returned as data (plan.Allocation), which the plan records and its note is rendered from.

    Under ``--quantize auto`` a family's options also hold other bits (``_bit_options``): every
    layer dense in each scheme, and a quantized base of each scheme under a low-rank increment at
    the family's budget and half as much again, so the Lagrangian moves bits between families, not
    only rank: int4 where the model is sensitive, int2 under a low-rank term where it is not.
    ``known`` holds the errors of plans measured alone already (the choice's), not measured again;
    ``fitted`` the family errors of plans fitted already, not fitted again.

    ``passthrough`` holds, per large pass-through matrix the plan weighs (planning/passthrough.py),
    its storages as options measured already, the first (int8) the one the budget was set with:
    the Lagrangian picks among them beside the families', within the same total. Their picks are
    returned last (indices into each matrix's options; all 0 where the allocation is not kept).
    """
    known = {} if known is None else known
    fitted = {} if fitted is None else fitted
    options = [_options(fam, cand, budget, fp, config, read, whitener, meter, known, fitted)
               for (fam, cand, budget), fp in zip(chosen, uniform)]
    n = len(options)
    # a target's rounding to whole ranks leaves bytes too; the pass-through matrices start in int8
    total = max(sum(family_bytes(fp) for fp in uniform), target or 0) + sum(o[0][0] for o in passthrough)
    for _ in range(ROUNDS):
        picked = _lagrangian(options + list(passthrough), total)
        unmeasured = [(j, i) for j, i in enumerate(picked[:n]) if options[j][i][2] not in known]
        if not unmeasured:
            break
        for j, i in unmeasured:
            nbytes, _, fp, cand = options[j][i]
            options[j][i] = (nbytes, _alone(fp, config, read, whitener, meter, known), fp, cand)
    else:
        picked = _lagrangian(options + list(passthrough), total)  # on the last round's measurements
    picked, stored = picked[:n], picked[n:]
    rest = sum(o[i][0] for o, i in zip(passthrough, stored))
    allocated = _spend_slack(chosen, options, picked, total - rest, config, read, whitener)
    kept, start = [cand for _, cand, _ in chosen], [0] * len(passthrough)
    if allocated == list(uniform) and stored == start:
        return list(uniform), Allocation("uniform"), kept, start
    rounded = lambda picks: replacements([o[i] for o, i in zip(passthrough, picks)], read)  # noqa: E731
    err_uniform = meter({**rebuild_plans(uniform, config, read, whitener), **rounded(start)})
    err_alloc = meter({**rebuild_plans(allocated, config, read, whitener), **rounded(stored)})
    if err_alloc < err_uniform:
        moved = tuple((fam.name, cand.label, opts[i][3].label) for (fam, cand, _), opts, i in zip(chosen, options, picked)
                      if opts[i][3] != cand)
        moved += tuple((o[0][2].key, o[0][3], o[i][3]) for o, i in zip(passthrough, stored) if i != 0)
        return (allocated, Allocation("allocated", finite(err_alloc), finite(err_uniform), moved),
                [opts[i][3] for opts, i in zip(options, picked)], stored)
    return list(uniform), Allocation("kept", finite(err_alloc), finite(err_uniform)), kept, start


ROUNDS = 4  # times the Lagrangian's picks are measured and it picks again


def _alone(fp: FamilyPlan, config, read, whitener, meter, known: dict, cache: dict | None = None) -> float:
    """The model's error with the one family ``fp`` plans compressed (0 where it stores every layer whole)."""
    if fp not in known:
        weights = {layer: read(fp.key(layer)).float() for layer in fp.layers}
        known[fp] = 0.0 if exact(fp) else meter(rebuild_in_memory(fp, weights, whitener, config, cache))
    return known[fp]


def _options(fam, cand, budget: int, fp: FamilyPlan, config, read, whitener, meter, known: dict,
             fitted: dict) -> list[tuple]:
    """One family's options, [(bytes, error on the model, plan, candidate)], the uniform plan first:
    measured where ``known``, else estimated as the family's own fitted error times the ratio of the
    model's error to it measured for the family's choice (or, where that was not measured or stores
    every layer whole, for the option of least fitted error, measured for it)."""
    weights = {layer: read(fam.key(layer)).float() for layer in fam.layers}
    cache: dict = {}  # per-layer decompositions, truncated at every scale (one family's at a time)
    spectra: dict = {}
    plans = [(fp, cand)]
    tries = [(cand, scale) for scale in RANK_SCALES]
    tries += _bit_options(cand, config.group_size) if config.quantize == "auto" else []
    for other, scale in tries:
        if not space.worth_fitting(fam, other, int(budget * scale), config):
            continue
        alt = fit_candidate(fam, other, weights, whitener, config, int(budget * scale), spectra)
        if alt is not None and all(alt != p for p, _ in plans):
            plans.append((alt, other))
    for p, _ in plans:
        if p not in fitted:
            fitted[p] = 0.0 if exact(p) else family_error(
                fam, weights, rebuild_in_memory(p, weights, whitener, config, cache), whitener)
    errors = [fitted[p] for p, _ in plans]
    anchor = next((j for j in range(len(plans)) if errors[j] > 0 and plans[j][0] in known), None)
    if anchor is None and any(e > 0 for e in errors):
        anchor = min((j for j in range(len(plans)) if errors[j] > 0), key=errors.__getitem__)
        _alone(plans[anchor][0], config, read, whitener, meter, known, cache)
    ratio = known[plans[anchor][0]] / errors[anchor] if anchor is not None else 0.0
    return [(family_bytes(p), known[p] if p in known else (0.0 if exact(p) else ratio * e), p, c)
            for (p, c), e in zip(plans, errors)]


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
        if not cand.spec.ranked:  # a fixed size: nothing to grow
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
WIDE = ("int4", "int3")  # also tried dense with scales WIDER times further apart than --group-size's
WIDER = 4


def _bit_options(cand: Candidate, group_size: int) -> list[tuple[Candidate, float]]:
    """(candidate, budget scale) of the other bits a family may take under ``--quantize auto``: every
    layer dense in each scheme (its bytes are its own; the scale only lets it fit), int4 and int3
    also with a scale every ``WIDER`` groups, and each quantized base under a low-rank increment at
    ``BIT_SCALES``; the chosen candidate's own are already tried.

    The wider groups are for sizes a little under a scheme's: at 4 bits a weight with groups of 64,
    int4 (4.25 bits) fits no family and the families' mix took int3 (3.25) for some, where int4
    with groups of 256 is 4.06 bits."""
    dense_ = [(dense.candidate(q), max(RANK_SCALES)) for q in DENSE_SCHEMES]
    dense_ += [(dense.candidate(q, WIDER * group_size), max(RANK_SCALES)) for q in WIDE]
    based = [(quantized_base.candidate(QLR_FACTORS, q), scale) for q in QLR_BASES for scale in BIT_SCALES]
    return [(c, scale) for c, scale in dense_ + based if c != cand]


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
                picked: list[Candidate] | None = None) -> tuple[list[FamilyPlan], list[Candidate], list[Together | None]]:
    """(plans, their candidates, per family its check or None) with every family whose form is not
    per-layer SVD and couples layers (``_coupled``) measured against per-layer SVD at its bytes,
    with every family compressed at once: the lower ships, one family at a time in order.

    A family's form is chosen with that family alone compressed, and what wins alone need not win
    together: on all-MiniLM-L6-v2 shared bases won five families' choices and lost end to end
    (0.834 against 0.843 at 50% of the bytes), as errors that share a basis add up through the
    layers where per-layer errors partly cancel. Costs a rebuild and a measurement per such family."""
    picked = list(picked) if picked is not None else [cand for _, cand, _ in chosen]
    plans = list(plans)
    checked = [j for j, ((fam, _, _), fp, cand) in enumerate(zip(chosen, plans, picked))
               if cand.kind not in ("per-layer", "dense") and not exact(fp) and _low_rank(fp) and _coupled(fp)
               and _per_layer(cand) in space.candidates(config, len(fam.layers))]
    checks: list[Together | None] = [None] * len(plans)
    if not checked:
        return plans, picked, checks
    rebuilt = []  # per family: its rebuilt weights, so that each trial refits only the family it swaps
    for (fam, _, _), fp in zip(chosen, plans):
        weights = {layer: read(fam.key(layer)).float() for layer in fam.layers}
        rebuilt.append(rebuild_in_memory(fp, weights, whitener, config))
    joined = lambda parts: {k: v for part in parts for k, v in part.items()}  # noqa: E731
    current = meter(joined(rebuilt))
    for j in checked:
        fam = chosen[j][0]
        weights = {layer: read(fam.key(layer)).float() for layer in fam.layers}
        alt = fit_candidate(fam, _per_layer(picked[j]), weights, whitener, config, family_bytes(plans[j]))
        if alt is None:
            continue
        swapped = rebuild_in_memory(alt, weights, whitener, config)
        err = meter(joined(rebuilt[:j] + [swapped] + rebuilt[j + 1:]))
        checks[j] = Together(picked[j].label, finite(current), finite(err))
        if err < current:  # per-layer SVD ships
            plans[j], picked[j], rebuilt[j], current = alt, _per_layer(picked[j]), swapped, err
    return plans, picked, checks


def _coupled(fp: FamilyPlan) -> bool:
    """Whether any chunk holds more than one layer: a base, a chain or a basis shared, whose errors
    can add up through the model where independent layers' partly cancel. A quantized base under
    low rank is every layer on its own, as per-layer SVD is, so the cause the check guards against
    (errors of a shared base or basis adding up) is absent (on SmolLM2 at 2.5 bits, five refits and
    forward passes a plan, none of which changed it)."""
    return any(len(c.layers) > 1 for c in fp.chunks)


def _low_rank(fp: FamilyPlan) -> bool:
    """Whether the plan stores any low-rank factor (one past the break-even is every layer dense)."""
    return any(r for c in fp.chunks for r in c.ranks)


def _per_layer(cand: Candidate) -> Candidate:
    """Per-layer SVD in the candidate's storage."""
    return per_layer.candidate(cand.quant)
