"""The planner's estimate: a candidate's error from singular values alone, no fit."""

from __future__ import annotations

import torch

from ..fit.factorise import synthetic_base
from ..forms.stored import form_of
from ..plan import FamilyPlan
from .spectra import common_whitener, spectrum, whiten

PRUNE = 2.0  # a candidate whose estimate is above this many times an error fitted already is not fitted
# (planning/search._scored): the estimate is its truncations' error alone, which rounding only adds
# to and a closed-loop fit mends by far less


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
        form = form_of(chunk)
        if form.basis_side(chunk):  # the best one factor for the group: its layers stacked, or side by side
            name = (chunk.topology, chunk.layers)
            if name not in spectra:
                left = form.basis_side(chunk) == "left"
                common = common_whitener(fp, chunk.layers, whitener, left, damping)
                spectra[name] = torch.linalg.svdvals(torch.cat([whiten(weights[x].double(), common(fp.key(x)))
                                                                for x in chunk.layers], dim=1 if left else 0))
            err += float(spectra[name][chunk.ranks[0]:].square().sum())  # a residual's gain is not estimated
            continue
        mean = None
        for layer, ref in form.steps(chunk):
            ref = chunk.base if ref is None else ref
            if ref == "synthetic":
                name = ("mean", chunk.layers)
                if (name, layer) not in spectra:
                    if mean is None:
                        by_key = {fp.key(x): weights[x] for x in chunk.layers}
                        mean = synthetic_base(fp, chunk, by_key.__getitem__, whitener).to(weights[layer])
                    spectra[name, layer] = spectrum(fp.key(layer), weights[layer] - mean, whitener)
            else:
                name = ref
                if (name, layer) not in spectra:
                    delta = weights[layer] if ref == "none" else weights[layer] - weights[ref]
                    spectra[name, layer] = spectrum(fp.key(layer), delta, whitener)
            err += float(spectra[name, layer][chunk.rank_of(layer):].square().sum())
    for layer in fp.layers:
        if ("norm", layer) not in spectra:
            spectra["norm", layer] = float(whiten(weights[layer].double(), whitener(fp.key(layer))).square().sum())
        total += spectra["norm", layer]
    return err / total if total > 0 else err
