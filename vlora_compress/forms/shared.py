"""A basis shared by a group of layers, every layer its own coefficients over it: the right factor
(``shared``, W_l = B_l A: Basis Sharing's form, nn.Linear's inputs) or the left one
(``shared-left``, W_l = B A_l: the outputs), over adjacent layers or the layers that share best
(similar_groups); with residual factors, each layer also its own b_l a_l on top."""

from __future__ import annotations

import torch

from ..io.stacks import Family
from ..io.versions import LEFT_VERSION, SHARED_VERSION
from ..plan import RESIDUAL, SHARED, ChunkPlan, Term, increment_keys
from ..planning.spectra import common_whitener, whiten
from .base import Candidate, Form, equal_groups, register

SHARED_GROUPS = (2, 3, 4)  # layers a shared basis serves: Basis Sharing finds 2 to 4 alike


@register
class Shared(Form):
    name = "shared"
    chunked = True

    def label(self, cand: Candidate) -> str:
        by = " by similarity" if cand.grouping == "similar" else ""
        left = " left" if cand.topology == "shared-left" else ""
        plus = " + residual" if cand.residual else ""
        return f"shared{left} basis{plus}, {cand.chunks} group{'s' if cand.chunks > 1 else ''}{by}"

    def kind(self, cand: Candidate) -> str:
        return cand.topology + (" + residual" if cand.residual else "")

    def chunks(self, fam, cand, rank, groups=None):
        groups = groups if groups is not None else equal_groups(fam.layers, cand.chunks)
        own = (residual_rank(rank),) if cand.residual else ()
        return [ChunkPlan(g, (rank,) * len(g), "none", cand.topology, own * len(g)) for g in groups if g]

    def choose(self, fam, cand, rank, weights, whitener, config, spectra, score):
        adjacent = equal_groups(fam.layers, cand.chunks)
        if cand.grouping != "similar":
            return self.layout(fam, cand, rank, config)
        groups = similar_groups(fam, weights, whitener, rank, adjacent, spectra, cand.topology == "shared-left",
                                config.calibration.damping)
        if groups == adjacent:  # nothing the adjacent candidate does not already try
            return None
        return self.layout(fam, cand, rank, config, groups)

    def asked(self, config, n_layers, quant, base):
        """Where no base is asked for: the side asked for (``--topology shared|shared-left``), or with
        ``--shared`` both, each in groups of at most 2, 3 or 4 layers (or ``--chunks`` groups),
        adjacent or by similarity, with or without residual factors."""
        if base != "none" or (config.base_quantize is not None and config.method == "svd"):
            return []
        sides = [config.topology] if config.topology in SHARED else list(SHARED) if config.shared else []
        if not sides or config.topology not in SHARED + ("auto",):
            return []
        groups = ([config.chunks] if config.chunks and config.topology in SHARED
                  else sorted({-(-n_layers // size) for size in SHARED_GROUPS}))  # at most size each
        return [candidate(t, k, quant, g, res) for t in sides for k in groups if 1 <= k and 2 * k <= n_layers
                for g in ("adjacent", "similar") for res in (False, True)]

    def stores(self, chunk):
        return chunk.topology in SHARED

    def basis_side(self, chunk):
        return "left" if chunk.topology == "shared-left" else "right"

    def terms(self, fp, ci, chunk):
        """The basis, stored once with the chunk's (zero) base, then each layer's own factor over it
        (B_l under ``shared``, A_l under ``shared-left``) and its residual factors where it has them."""
        basis, left = fp.basis_key(ci), self.basis_side(chunk) == "left"
        yield Term(ci, None, None, None, "", chunk.ranks[0], None, basis, shares_left=left)
        for layer, _ in self.steps(chunk):
            key, rank, own = fp.key(layer), chunk.rank_of(layer), chunk.residual_of(layer)
            kb, ka = increment_keys(key)
            yield Term(ci, layer, key, None, "base", rank, ((basis, ka) if left else (kb, basis)) if rank else None,
                       basis, shares_left=left, residual=increment_keys(key + RESIDUAL) if own else None,
                       residual_rank=own)

    def version(self, chunk):
        return LEFT_VERSION if self.basis_side(chunk) == "left" or any(chunk.residual) else SHARED_VERSION

    def sequential(self, chunk, bases):
        """The basis is fitted from all the group's weights and Grams at once: a layer at a time
        only where ``bases`` gives those up front (the original model's), and then only the
        coefficients follow the stream."""
        return bases

    def renames(self, fp, ci, to):
        return {fp.basis_key(ci): fp.basis_key(to)}


def candidate(side: str, groups: int, quant: str = "none", grouping: str = "adjacent",
              residual: bool = False) -> Candidate:
    """``side``: shared (the right factor) or shared-left."""
    return Candidate("shared", quant, None, groups, "first", side, grouping, residual)


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
    family's mean Gram (``common_whitener``): a basis shared in the inputs' own coordinates is one
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
    loss = _pair_losses(fam, weights, whitener, rank, {} if spectra is None else spectra, left, damping)
    start = _improve(groups, loss, fam.layers)
    other = _improve(_greedy(groups, loss, fam.layers), loss, fam.layers)
    return other if _total(other, loss) < _total(start, loss) * (1 - 1e-9) else start


def _pair_losses(fam: Family, weights, whitener, rank: int, spectra: dict, left: bool, damping: float) -> dict:
    """(x, y) -> the share of the pair's whitened energy one rank-``rank`` basis of both leaves."""
    layers, side = list(fam.layers), "left" if left else "right"
    tops = {}
    # the family's mean Gram is made once: later candidates find every layer's vectors in ``spectra``
    common = (common_whitener(fam, layers, whitener, left, damping) if any((side, x) not in spectra for x in layers)
              else None)
    for x in layers:
        if (side, x) not in spectra:
            m = whiten(weights[x].double(), common(fam.key(x)))
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
    return loss


def _total(members, loss: dict) -> float:
    return sum(loss[x, y] for g in members for i, x in enumerate(g) for y in g[i + 1:])


def _improve(members, loss: dict, layers) -> list[tuple[int, ...]]:
    """``members`` after every swap of two layers between groups that lowers the total loss, the
    best first, until none does; each group ascending, the groups by their first layer."""
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


def _greedy(groups, loss: dict, layers) -> list[list[int]]:
    """Groups of the sizes of ``groups``, each seeded by the cheapest pair left and filled by the
    cheapest joins."""
    greedy, left_over = [], set(layers)
    for size in sorted((len(g) for g in groups), reverse=True):
        pairs = [(loss[x, y], x, y) for x in left_over for y in left_over if x < y]
        group = list(min(pairs)[1:]) if size > 1 and pairs else [min(left_over)]
        while len(group) < size:
            group.append(min(left_over - set(group), key=lambda z: sum(loss[z, y] for y in group)))
        greedy.append(group)
        left_over -= set(group)
    return greedy
