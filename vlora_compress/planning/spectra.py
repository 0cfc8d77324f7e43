"""Singular values and whitening the planner reads the weights by, without fitting anything: the
estimate (planning/estimate.py) and the forms' choices (VLoRA's chunk bounds, shared bases' groups),
which sit below the fit, read them here."""

from __future__ import annotations

import torch

from ..fit.svd import Whitener
from ..io.stacks import Family


def common_whitener(fam: Family, layers, whitener, left: bool, damping: float):
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


def spectrum(key: str, delta: torch.Tensor, whitener) -> torch.Tensor:
    """Singular values of ``delta``, whitened by ``key``'s inputs when calibrated."""
    return torch.linalg.svdvals(whiten(delta.double(), whitener(key)))


def whiten(m: torch.Tensor, wh: Whitener | None) -> torch.Tensor:
    """Whitener.whiten, or M itself without calibration."""
    return m if wh is None else wh.whiten(m)
