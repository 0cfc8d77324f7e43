"""How the planner scores a plan without writing it: rebuilt in memory, its (whitened) error."""

from __future__ import annotations

import torch

from ..config import CompressConfig
from ..fit.factorise import PLAN_ROUNDS, fit_family, rebuild_family
from ..io.fileformat import read_matrix
from ..io.stacks import Family
from ..forms.stored import family_matrices
from ..plan import FamilyPlan
from .spectra import whiten


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
        w, d = whiten(w, wh), whiten(d, wh)
        err += float(d.square().sum())
        total += float(w.square().sum())
    return err / total if total > 0 else err


def exact(fp: FamilyPlan) -> bool:
    """Whether the plan stores every layer whole, in its own dtype: it rebuilds the weights exactly,
    so its error is 0 without a forward pass (a budget past the break-even, as SmolLM2's k and v
    projections at 35% removed, where every candidate comes out dense)."""
    return (fp.quant == "none" and fp.store_dtype == fp.dtype
            and all(len(c.layers) == 1 and c.base_layer == c.layers[0] for c in fp.chunks))


def measure_plan(plan, config: CompressConfig, read, whitener, meter) -> float:
    """The meter's error with every family of ``plan`` compressed at once, rebuilt as compress would
    fit them on the original model's Grams (the planner's measure of a whole plan)."""
    return meter(rebuild_plans(plan.families, config, read, whitener))


def rebuild_plans(plans, config: CompressConfig, read, whitener) -> dict[str, torch.Tensor]:
    """Every family plan of ``plans`` fitted and rebuilt in memory, each from the original weights:
    what the model holds with all of them compressed at once."""
    rebuilt: dict[str, torch.Tensor] = {}
    for fp in plans:
        weights = {layer: read(fp.key(layer)).float() for layer in fp.layers}
        rebuilt.update(rebuild_in_memory(fp, weights, whitener, config))
    return rebuilt
