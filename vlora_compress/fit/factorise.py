"""Factorise one tensor family: a dense base per chunk and rank-r increments ``W_l = W_ref + B_l A_l``.

The fit is closed-loop: each increment is the truncated SVD of ``W_l - Ŵ_ref``, where ``Ŵ_ref`` is the
reference exactly as ``expand`` will rebuild it (stored dtype included), so truncation and rounding
errors never compound down a chain. ``rebuild`` is the one function both sides use to apply an
increment, which is what makes expand the exact inverse of compress.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..io.checkpoint import DTYPES
from ..fit.integers import SCALE_SUFFIX, dequantize, quantize
from ..forms.stored import walk
from ..plan import CompressConfig, FamilyPlan
from .svd import Whitener, apply_increment, choose_svd, truncated_svd, whitened_svd


@dataclass(frozen=True)
class LayerFit:
    key: str
    layer: int
    role: str  # "base" or "increment"
    rank: int
    rel_error: float  # ||W - Ŵ|| / ||W|| with Ŵ as expand returns it
    out_error: float | None = None  # ||(W - Ŵ)S|| / ||WS|| on calibration inputs, when calibrated


def fit_family(
    plan: FamilyPlan,
    read: Callable[[str], torch.Tensor],
    config: CompressConfig,
    whitener: Callable[[str], Whitener | None] = lambda key: None,
    rebuilt: Callable[[str, torch.Tensor], None] | None = None,
    svd_cache: dict | None = None,
    measure: bool = True,
    bases: tuple[Callable[[str], torch.Tensor], Callable[[str], Whitener | None]] | None = None,
    rounds: int | None = None,
) -> Iterator[tuple[str, torch.Tensor] | LayerFit]:
    """Yield stored tensors ``(name, tensor)`` in layout order, and a LayerFit after each layer.

    ``whitener(key)`` gives the layer's whitening from calibration, or None for data-free SVD.
    ``rebuilt(key, Ŵ)`` is told each layer as expand will rebuild it. The walk reads a layer when it
    reaches it, so a caller may drive it a layer at a time (pipelines/sequential.py) for chunks whose base is
    their first layer or none. Only the base and the last rebuilt layer are held, so memory stays at
    a few copies of one tensor; everything is made on the device of the weights read.
    ``svd_cache`` keeps the decomposition of every layer fitted on a zero base (per-layer factors,
    which do not depend on the rank) or on a base rounded from the layer alone (a quantized base
    under low rank: the same for the same scheme), for a later fit of the same weights at another
    rank (``_memo_name``).
    Without ``measure`` the LayerFits carry no errors (NaN, None): the planner's trial fits, which
    score the family as a whole, spend nothing on them.
    ``bases`` is the (read, whitener) a shared chunk's basis is fitted from where those are not the
    layers' own: the sequential fit makes the basis at the group's first layer from the original
    model's weights and Grams (every layer of the group at once), then fits each layer's
    coefficients over it as the layer comes, whitened by the inputs the compressed model feeds it.
    ``rounds`` caps the alternations of a shared basis with its layers' residual factors
    (``RESIDUAL_ROUNDS`` by default; the planner's trial fits take ``PLAN_ROUNDS``).
    """
    rounds = RESIDUAL_ROUNDS if rounds is None else rounds
    held = {}  # chunk -> (weight, whitening) a one-layer chunk's base read, for its increment
    state = {}  # chunk -> [base as rebuilt (None: zeros), the chunk's layer rebuilt last, its basis]
    for t in walk(plan):
        if not t.over:  # the chunk's base, and a shared chunk's basis
            yield from _fit_base(plan, t, read, whitener, config, rebuilt, measure, bases, rounds, held, state)
        else:
            yield from _fit_layer(plan, t, read, whitener, config, rebuilt, measure, svd_cache, held, state)


def _fit_base(plan: FamilyPlan, t, read, whitener, config: CompressConfig, rebuilt, measure: bool, bases, rounds: int,
              held: dict, state: dict) -> Iterator[tuple[str, torch.Tensor] | LayerFit]:
    """A chunk's base term: its basis where it shares one, and its base (a layer, a synthetic base
    or zeros), kept in ``state`` for the chunk's layers."""
    orig = DTYPES[plan.dtype]
    chunk = plan.chunks[t.chunk]
    basis_hat = None
    if t.basis is not None:
        entries, basis_hat = _fit_basis(plan, chunk, t, *(bases or (read, whitener)), config, rounds)
        yield from entries
    if chunk.base == "synthetic":  # a one-layer chunk's weight and whitening are read here once
        entries, base_hat, one = _fit_synthetic(plan, chunk, t.base, read, whitener, config)
        if one is not None:
            held[t.chunk] = one
        yield from entries
    elif t.layer is not None:
        w = read(t.key)
        wh = whitener(t.key)
        entries, base_hat = encode(plan, t.key, w, _hessian(plan, t.key, config, wh))
        yield from entries
        if rebuilt is not None:
            rebuilt(t.key, base_hat.to(orig))
        yield LayerFit(t.key, t.layer, "base", 0, _rel_error(w, base_hat.to(orig)) if measure else math.nan,
                       wh.output_error(w, base_hat.to(orig)) if wh and measure else None)
        del w, wh
    else:  # a zero base: every layer is its own low-rank factors
        base_hat = None  # zeros, made on the first layer's device
    if not t.last:
        state[t.chunk] = [base_hat, base_hat, basis_hat]


def _fit_layer(plan: FamilyPlan, t, read, whitener, config: CompressConfig, rebuilt, measure: bool, svd_cache,
               held: dict, state: dict) -> Iterator[tuple[str, torch.Tensor] | LayerFit]:
    """A layer's term: its own factors over the chunk's base or the layer before it (or its
    coefficients over the chunk's basis), and its residual factors."""
    orig = DTYPES[plan.dtype]
    key, rank = t.key, t.rank
    w, wh = held.pop(t.chunk) if t.chunk in held else (read(key), whitener(key))
    base_hat, last_hat, basis_hat = state.pop(t.chunk) if t.last else state[t.chunk]
    if base_hat is None:
        base_hat = last_hat = torch.zeros(plan.shape, dtype=torch.float32, device=w.device)
    ref_hat = base_hat if t.over == "base" else last_hat
    delta = w.float() - ref_hat
    name = _memo_name(plan, t) if svd_cache is not None else None
    memo = (svd_cache, name) if name is not None else None
    hessian = _hessian(plan, t.factors[0], config, wh) if rank else None  # for the factor reading the inputs
    if t.shares_left:  # the chunk's basis is B: only the layer's A is its own
        b = basis_hat
        entries_a, a = encode(plan, t.factors[1], refit_right(b, delta, wh),
                              hessian if wh is not None and wh.side == 1 else None)
        yield from entries_a
    elif t.basis is not None:  # the chunk's basis is A: only the layer's coefficients are its own
        a = basis_hat
        entries_b, b = encode(plan, t.factors[0], coefficients(delta, a, wh),
                              hessian if wh is not None and wh.side == 0 else None)
        yield from entries_b
    elif rank:
        entries, b, a = _fit_pair(plan, t.factors, delta, rank, wh, config, memo)
        yield from entries
    else:
        b, a = truncated_svd(delta, 0)
    last_hat = apply_increment(ref_hat, b, a)
    if t.residual:  # a shared chunk's layer's own factors: what the shared part left, fitted to it
        entries, b, a = _fit_pair(plan, t.residual, w.float() - last_hat, t.residual_rank, wh, config, memo=None)
        yield from entries
        last_hat = apply_increment(last_hat, b, a)
    if not t.last:
        state[t.chunk] = [base_hat, last_hat, basis_hat]
    w_hat = last_hat.to(orig)
    if rebuilt is not None:
        rebuilt(key, w_hat)
    fit = LayerFit(key, t.layer, "increment", rank, _rel_error(w, w_hat) if measure else math.nan,
                   wh.output_error(w, w_hat) if wh and measure else None)
    # a caller driving the walk a layer at a time waits here: hold nothing it has not asked for
    del w, w_hat, delta, wh, b, a, base_hat, last_hat, ref_hat, basis_hat
    yield fit


def _memo_name(plan: FamilyPlan, t) -> tuple | None:
    """The name ``svd_cache`` keeps a layer's decomposition under where another fit of the same
    weights meets the same matrix at another rank: over a zero base (per-layer factors), or over a
    base rounded from the layer alone (a quantized base under low rank), the same for the same
    scheme; None where the matrix depends on the rest of the plan."""
    if t.base is None:
        return (t.key,)
    chunk = plan.chunks[t.chunk]
    if chunk.base == "synthetic" and len(chunk.layers) == 1 and t.over == "base":
        return (t.key, plan.quant_of(t.base), plan.store_dtype, plan.group_size)
    return None


def _fit_pair(plan: FamilyPlan, names: tuple[str, str], delta: torch.Tensor, rank: int, wh: Whitener | None,
              config: CompressConfig, memo=None) -> tuple[list, torch.Tensor, torch.Tensor]:
    """(stored entries, B and A as stored in float32) of the rank-``rank`` fit of ``delta``,
    whitened when calibrated; where B is stored rounded, A is refitted to B as stored."""
    method = choose_svd(plan.shape, rank, config.svd)
    if wh is not None:
        b, a = whitened_svd(delta, rank, wh, method, config.seed, config.niter, memo)
    else:
        b, a = truncated_svd(delta, rank, method, config.seed, config.niter, memo)
    kb, ka = names
    hessian = _hessian(plan, kb, config, wh)
    entries_b, b = encode(plan, kb, b, hessian if wh is not None and wh.side == 0 else None)
    if plan.quant_of(kb) != "none":  # B as stored is not the B the SVD gave: refit A to it
        a = refit_right(b, delta, wh)
    entries_a, a = encode(plan, ka, a, hessian if wh is not None and wh.side == 1 else None)
    return entries_b + entries_a, b, a


def _hessian(plan: FamilyPlan, name: str, config: CompressConfig, wh: Whitener | None) -> tuple | None:
    """What GPTQ rounding of the matrix ``name`` reads, where it is stored as integers, calibrated,
    and asked to."""
    if plan.quant_of(name) == "none" or wh is None or config.rounding != "gptq":
        return None
    return wh.hessian()


def _fit_synthetic(plan: FamilyPlan, chunk, name: str, read, whitener, config: CompressConfig):
    """(stored entries, the base as stored in float32, (W, whitening) of a one-layer chunk or None) of
    a chunk's synthetic base: a reader such as pipelines/sequential.py gives a layer's weight and whitening
    once, so the increment step takes them from here.

    Over several layers the base is their whitened mean (synthetic_base), rounded against their
    summed inputs. Over one layer it is the layer itself, rounded by GPTQ against its own inputs:
    the quantized part of W ≈ Q + B A, whose increment the walk then fits to the whitened error
    W - Q (the first step of CALDERA, Saha et al. 2024). CALDERA goes on alternating, rounding Q
    again from W - B A; on MiniLM that measured no better (docs/planning.md), since GPTQ has
    already spread each column's error over the rest, so it is not done."""
    if len(chunk.layers) > 1:
        wh = None
        if plan.quant_of(name) != "none" and config.rounding == "gptq":
            whs = [whitener(plan.key(layer)) for layer in chunk.layers]
            if all(w is not None for w in whs):
                wh = Whitener.from_gram(sum(w.gram for w in whs), whs[0].side, config.calibration.damping)
        return (*encode(plan, name, synthetic_base(plan, chunk, read, whitener), _hessian(plan, name, config, wh)),
                None)
    key = plan.key(chunk.layers[0])
    w, wh = read(key), whitener(key)
    return (*encode(plan, name, w.float(), _hessian(plan, name, config, wh)), (w, wh))


def _fit_basis(plan: FamilyPlan, chunk, t, read, whitener, config: CompressConfig, rounds: int = 0):
    """(stored entries, the basis as stored in float32) of a shared chunk's basis.

    ``shared``: the top-``rank`` right factor A of the chunk's weights stacked, whitened by their
    summed Grams (each layer's own rows for Conv1D), so that one A serves every layer as well as one
    can (Basis Sharing's basis). ``shared-left``: the top-``rank`` left factor B of the weights side
    by side, the same fit on their transposes. For nn.Linear that one is exact under each layer's
    own whitening (Σ_l ||(W_l - B A_l) S_l||² is the rank-``rank`` fit of [W_1 S_1 | W_2 S_2 | ...],
    since A_l S_l is free); for Conv1D it takes the summed Grams, as A does for nn.Linear. Where the
    chunk's layers have residual factors, the basis alternates with them, at most ``rounds`` times."""
    keys = [plan.key(layer) for layer in chunk.layers]
    shape = plan.shape
    if t.shares_left:
        read_t, whitener_t = read, whitener
        read, whitener, shape = (lambda key: read_t(key).T), (lambda key: _flip(whitener_t(key))), shape[::-1]
    whs = [whitener(key) for key in keys]
    method = choose_svd((shape[0] * len(keys), shape[1]), t.rank, config.svd)
    common = None
    if all(wh is not None for wh in whs) and whs[0].side == 1:  # the inputs' summed Gram whitens A
        common = Whitener.from_gram(sum(wh.gram for wh in whs), 1, config.calibration.damping)

    def basis(mats):  # the top-rank right factor of the matrices stacked
        if common is not None:
            return whitened_svd(torch.cat([m.double() for m in mats]), t.rank, common, method, config.seed,
                                config.niter)[1]
        # Conv1D's whitening acts on the rows, each layer's own; data-free: the weights as they are
        stacked = torch.cat([m.double() if wh is None or wh.side == 1 else wh.whiten(m.double())
                             for m, wh in zip(mats, whs)])
        return truncated_svd(stacked, t.rank, method, config.seed, config.niter)[1]

    weights = [read(key).float() for key in keys]
    a = basis(weights)
    own = chunk.residual_of(chunk.layers[0])
    small = choose_svd(shape, own, config.svd) if own else "exact"
    best = (math.inf, a)  # (whitened error, basis): the lowest measured is kept
    for i in range(rounds + 1 if own and rounds else 0):
        # with residual factors, the basis should hold what the layers share, not each one's own
        # strongest directions: take each layer's rank-``own`` part of what the basis leaves off it,
        # and fit the basis again to what remains (alternating least squares; stopped after
        # ``rounds`` new bases, or when one gains less than RESIDUAL_TOL of the whitened error)
        rest, err = [], 0.0
        for w, wh in zip(weights, whs):
            d = w - coefficients(w, a, wh) @ a
            b_r, a_r = (whitened_svd(d, own, wh, small, config.seed, config.niter) if wh is not None
                        else truncated_svd(d, own, small, config.seed, config.niter))
            part = b_r @ a_r
            left = (d - part).double()  # what the basis and the layer's residual leave
            err += float((left if wh is None else wh.whiten(left)).square().sum())
            rest.append(w - part)
        gained = err < best[0] * (1 - RESIDUAL_TOL)
        if err < best[0]:
            best = (err, a)
        if i == rounds or not gained:
            break
        a = basis(rest)
    a = best[1]
    del weights
    if t.shares_left:  # back to the family's own orientation: B, and the Gram its rows read
        a, common = a.T.contiguous(), _flip(common)
    return encode(plan, t.basis, a, _hessian(plan, t.basis, config, common))


RESIDUAL_ROUNDS = 10  # at most this many alternations of a shared basis with its layers' residual factors
RESIDUAL_TOL = 0.01  # ... stopped when a round lowers the whitened error by less than this share
# The planner's trial fits do not alternate: a residual candidate is scored on its first fit (the
# basis of the weights as they are, each layer's residual of what it leaves), which the rounds of
# the fit that is written only lower (in summed whitened error). On real weights they gain 1 to 2% of the whitened error
# (MiniLM: 0.378 before, 0.370 after), and on SmolLM2 they were most of --shared's planning time:
# every trial of a 30-layer family (short list, rank allocation's scaled budgets) alternated
# whitened SVDs of all 30 layers several times.
PLAN_ROUNDS = 0


def _flip(wh: Whitener | None) -> Whitener | None:
    """The same whitening for the transposed matrix (its inputs on the other side)."""
    return None if wh is None else Whitener(wh.vectors, wh.values, 1 - wh.side, wh.damping)


def coefficients(delta: torch.Tensor, a: torch.Tensor, wh: Whitener | None) -> torch.Tensor:
    """The B that best completes a fixed A: argmin ||(Δ - B A) S|| (for Conv1D, whose whitening is
    on the rows, argmin ||Sᵀ(Δ - B A)||, which S does not change), by least squares in float64."""
    a64, d64 = a.double(), delta.double()
    if wh is not None and wh.side == 1:
        a64, d64 = wh.whiten(a64), wh.whiten(d64)
    return torch.linalg.lstsq(a64.T, d64.T).solution.T.float()


def refit_right(b: torch.Tensor, delta: torch.Tensor, wh: Whitener | None) -> torch.Tensor:
    """The A that best completes a fixed B: argmin ||(Δ - B A) S|| (rows whitened, ||Sᵀ(Δ - B A)||,
    for Conv1D), by least squares in float64. After B is rounded to integers, the SVD's A is no
    longer the best partner for it; this one is (SVD-LLM's closed-form parameter update)."""
    b64, d64 = b.double(), delta.double()
    if wh is not None and wh.side == 0:
        b64, d64 = wh.whiten(b64), wh.whiten(d64)
    return torch.linalg.lstsq(b64, d64).solution.float()


def encode(plan: FamilyPlan, name: str, t: torch.Tensor, hessian: tuple | None = None,
           scale: torch.Tensor | None = None) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
    """(stored entries, what they read back as in float32): the closed loop fits from the latter,
    so rounding to the store dtype or to integers never compounds down a chain. ``hessian`` (for
    the matrix that reads the layer's inputs) has the integers chosen by GPTQ; ``scale`` keeps given
    scales (healing writes trained values back at the file's own)."""
    store, scheme = DTYPES[plan.store_dtype], plan.quant_of(name)
    if scheme == "none":
        stored = t.to(store)
        return [(name, stored)], stored.float()
    q, s = quantize(t, scheme, plan.group_size, hessian, scale)
    back = dequantize(q, s, tuple(t.shape), scheme, plan.group_size).to(store)
    return [(name, q), (name + SCALE_SUFFIX, s)], back.float()


def synthetic_base(plan: FamilyPlan, chunk, read, whitener) -> torch.Tensor:
    """The chunk's mean weight, or with calibration its whitened mean (Σ W_l G_l)(Σ G_l)⁻¹.

    The whitened mean is the single matrix closest to every layer of the chunk in output error:
    it minimises Σ_l ||(W_l - B) S_l||² with S_l S_lᵀ = G_l (rows instead of columns for Conv1D).
    """
    whs = [whitener(plan.key(layer)) for layer in chunk.layers]
    if any(wh is None for wh in whs):
        return sum(read(plan.key(layer)).double() for layer in chunk.layers).div(len(chunk.layers)).float()
    side = whs[0].side
    num, den = 0, 0
    for layer, wh in zip(chunk.layers, whs):
        g = wh.gram
        w = read(plan.key(layer)).double()
        num = num + (w @ g if side == 1 else g @ w)
        den = den + g
    return (torch.linalg.solve(den, num, left=False) if side == 1 else torch.linalg.solve(den, num)).float()


def rebuild_family(plan: FamilyPlan, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, Ŵ)`` for every layer of the family, in the original dtype."""
    orig = DTYPES[plan.dtype]
    state = {}  # chunk -> [base as rebuilt (None: zeros), the chunk's layer rebuilt last]
    for t in walk(plan):
        if not t.over:  # a chunk's base: None is zeros, made on the first factors' device below
            base_hat = get(t.base).float() if t.base is not None else None
            if t.layer is not None:
                yield t.key, base_hat.to(orig)
            if not t.last:
                state[t.chunk] = [base_hat, base_hat]
            continue
        base_hat, last_hat = state.pop(t.chunk) if t.last else state[t.chunk]
        factors = tuple(map(get, t.factors)) if t.factors else None
        if base_hat is None:  # (a zero base has a rank at every layer)
            base_hat = last_hat = torch.zeros(plan.shape, device=factors[0].device if factors else None)
        ref_hat = base_hat if t.over == "base" else last_hat
        last_hat = apply_increment(ref_hat, *factors) if factors is not None else ref_hat.clone()
        if t.residual:
            last_hat = apply_increment(last_hat, *map(get, t.residual))
        if not t.last:
            state[t.chunk] = [base_hat, last_hat]
        yield t.key, last_hat.to(orig)


def _rel_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """In float32: a float64 copy of a large matrix would be the biggest allocation of the fit."""
    w32 = w.float()
    norm = torch.linalg.norm(w32)
    err = torch.linalg.norm(w32 - w_hat.float())
    return float(err / norm) if norm > 0 else float(err)
