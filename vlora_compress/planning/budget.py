"""A candidate at a byte budget: the largest uniform rank whose exact bytes fit, then the choices
the form makes from the weights, scored by fitting (planning/measure.py).

Here rather than in forms/ because it fits: the forms sit below the fit (fit/factorise.py asks a
chunk's form for its walk), so a form's ``choose`` is handed ``score`` instead of importing it."""

from __future__ import annotations

from ..config import CompressConfig
from ..forms import Candidate, candidate_bytes, fit_rank
from ..io.stacks import Family
from ..plan import FamilyPlan
from .measure import family_error, rebuild_in_memory


def fit_candidate(fam: Family, cand: Candidate, weights, whitener, config: CompressConfig,
                  budget: int, spectra: dict | None = None) -> FamilyPlan | None:
    """The candidate's plan at the largest uniform rank within ``budget``; None if none fits.
    ``spectra`` keeps the family's decompositions between candidates (chain costs, similar groups)."""
    if cand.chunks > len(fam.layers):
        return None
    form = cand.spec
    ranked = form.stores_increments(fam, cand)
    if form.ranked and not ranked:  # chunks of one layer each: nothing low rank to fit
        return None
    rank = fit_rank(min(fam.shape) if ranked else 0, lambda r: candidate_bytes(fam, cand, r, config) <= budget)
    if rank < (1 if ranked else 0):
        return None
    score = lambda fp: family_error(fam, weights, rebuild_in_memory(fp, weights, whitener, config), whitener)  # noqa: E731
    return form.choose(fam, cand, rank, weights, whitener, config, spectra, score)
