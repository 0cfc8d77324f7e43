"""VLoRA: each chunk keeps a base, every other layer an increment over the base (star) or over the
layer before it (chain), W_l = W_ref + B_l A_l. The base is the chunk's first layer, its whitened
mean (stored once) or the layer that leaves the least; chunk bounds by dynamic programming over the
consecutive deltas' spectra, or equal."""

from __future__ import annotations

from collections.abc import Callable

from ..io.stacks import Family
from ..plan import SHARED, ChunkPlan, split_equal
from ..planning.spectra import spectrum
from .base import Candidate, Form, dense_if_cheaper, equal_groups, family_plan, register

MAX_AUTO_CHUNKS = 3  # chunk counts the planner tries by itself: 1 to 3 (and blocks planning by blocks)


@register
class Vlora(Form):
    name = "vlora"
    chunked = True

    def label(self, cand: Candidate) -> str:
        return f"{cand.base} base, {cand.topology}, {cand.chunks} chunk{'s' if cand.chunks > 1 else ''}"

    def asked(self, config, n_layers, quant, base):
        """Every topology asked for (auto: chain and star) and chunk count (``--chunks``, or 1 to
        ``MAX_AUTO_CHUNKS``) over a base that is a layer or a mean."""
        if base == "none":
            return []
        topologies = ["chain", "star"] if config.topology == "auto" else [config.topology]
        counts = [config.chunks] if config.chunks else list(range(1, min(MAX_AUTO_CHUNKS, n_layers) + 1))
        return [candidate(base, t, k, quant, config.base_quantize) for t in topologies if t not in SHARED
                for k in counts if k <= n_layers]

    def stores_increments(self, fam: Family, cand: Candidate) -> bool:
        return cand.base == "mean" or min(cand.chunks, len(fam.layers)) < len(fam.layers)

    def stores(self, chunk):
        """Increments over a reference, chain or star: every chunk of more than one layer that is
        no shared basis and no per-layer star over a zero base."""
        return (chunk.topology in ("chain", "star") and len(chunk.layers) > 1
                and not (chunk.base == "none" and chunk.topology == "star"))

    def steps(self, chunk):
        """Star: every layer over the base. Chain: each layer over its neighbour nearer the base, so
        every reference was rebuilt just before (over no base layer: each over the one before it)."""
        if chunk.topology == "star":
            return super().steps(chunk)
        layers = chunk.layers
        if chunk.base_layer is None:
            return [(layer, prev) for prev, layer in zip((None,) + layers[:-1], layers)]
        p = layers.index(chunk.base)
        return ([(layers[i], layers[i - 1]) for i in range(p + 1, len(layers))]
                + [(layers[i], layers[i + 1]) for i in range(p - 1, -1, -1)])

    def chunks(self, fam, cand, rank, groups=None):
        groups = groups if groups is not None else equal_groups(fam.layers, cand.chunks)
        return [_chunk(layers, cand.base, cand.topology, rank) for layers in groups if layers]

    def choose(self, fam, cand, rank, weights, whitener, config, spectra, score):
        """Chunk bounds by dynamic programming over the consecutive deltas (or equal), and with base
        ``best`` each chunk's base the layer that leaves the least."""
        if config.bounds == "equal":
            bounds = split_equal(len(fam.layers), cand.chunks)
        else:
            bounds = partition(len(fam.layers), cand.chunks, chain_cost(fam, weights, whitener, rank, spectra))
        groups = [fam.layers[start:end] for start, end in bounds]
        if cand.base != "best":
            return self.layout(fam, cand, rank, config, groups)
        chunks = [_best_base(fam, layers, rank, cand, config, score) if len(layers) > 1
                  else _chunk(layers, cand.base, cand.topology, rank) for layers in groups]
        return dense_if_cheaper(family_plan(fam, config, chunks, cand.quant, cand.base_quant, cand.group_size))


def _chunk(layers: tuple[int, ...], base: str, topology: str, rank: int) -> ChunkPlan:
    """A chunk over its whitened mean (stored once; one layer is its own base), else over its first
    layer; ``best`` is chosen from the weights (_best_base) and counts as its first layer's bytes."""
    if base == "mean" and len(layers) > 1:
        return ChunkPlan(layers, (rank,) * len(layers), "synthetic", topology)
    return ChunkPlan(layers, (0,) + (rank,) * (len(layers) - 1), layers[0], topology)


def candidate(base: str, topology: str, chunks: int, quant: str = "none", base_quant: str | None = None) -> Candidate:
    return Candidate("vlora", quant, base_quant, chunks, base, topology)


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
            spectra[prev, layer] = spectrum(fam.key(layer), weights[layer] - weights[prev], whitener)
        tails.append(float(spectra[prev, layer][rank:].square().sum()))
    prefix = [0.0]
    for t in tails:
        prefix.append(prefix[-1] + t)
    # the links inside chunk [start, end) are those into positions start+1 .. end-1
    return lambda start, end: prefix[end] - prefix[start + 1]


def _best_base(fam, layers, rank, cand: Candidate, config, score) -> ChunkPlan:
    """The chunk's layer that, as its base, leaves the least residual over the chunk (``score``: a
    plan's error once fitted)."""
    best = None
    for b in layers:
        chunk = ChunkPlan(layers, tuple(0 if layer == b else rank for layer in layers), b, cand.topology)
        err = score(family_plan(fam, config, [chunk], cand.quant, cand.base_quant, cand.group_size))
        if best is None or err < best[0]:
            best = (err, chunk)
    return best[1]
