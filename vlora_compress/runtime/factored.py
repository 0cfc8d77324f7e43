"""VLoRA files as factored transformers models: shared bases held once, no dense weight kept.

Each factorised Linear (or GPT-2 Conv1D) becomes a ``VloraLinear`` whose weight is its chunk's
base plus the increments on the path from the base to it, ``W_l = base + Σ B_k A_k`` (one term for
star, the chain so far for chain), which is exactly what ``expand`` rebuilds. The bases and factors
live once, as parameters of a ``FactoredStore`` on the model, so healing trains precisely what the
file stores and gradients reach a shared base from every layer that uses it.

A forward pass builds nothing it does not need: when the summed rank is small it runs
``x·baseᵀ + (x·Aᵀ)·Bᵀ`` without forming the weight, and otherwise forms that one layer's weight
for the duration of the call, so memory holds the compressed tensors, not a dense copy.

A chain layer that forms its weight starts from the partial sum the layer before it formed in the
same pass, ``W_l = W_{l-1} + B_l A_l``, instead of multiplying out every upstream factor again: a
chunk of c layers costs c products, not c²/2. The store keeps one partial sum per chain, drops it
after the model's forward, when a tensor it was built from changes, when backward consumes it, and
on a change of grad mode. Under gradient checkpointing it keeps none (``partial_sums`` off): holding
every layer's dense weight until backward is what checkpointing exists to avoid.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import VloraError
from ..io.fileformat import VloraFile, factorised_keys
from ..forms.stored import family_matrices, walk
from ..plan import FamilyPlan, Plan
from ..fit.integers import SCALE_SUFFIX, straight_through
from .packed import PackedEmbedding, PackedLinear, PackedMatrix


class FactoredStore(torch.nn.Module):
    """Every stored base and factor of a VLoRA file, once, under its file name.

    ``quant`` maps a name to its (scheme, group size, the file's float16 scales) where the file stores
    integers; training keeps the scales and moves the integers. With
    ``quantization_aware`` set, modules read such a tensor through a straight-through quantizer,
    so training sees exactly the values the file will hold; loaded from a file the values are
    already on the grid and the flag is left off.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], quant: dict[str, tuple] | None = None,
                 packed: dict[str, PackedMatrix] | None = None):
        super().__init__()
        self.names = list(tensors)
        self._index = {name: i for i, name in enumerate(self.names)}
        # ParameterDict keys cannot hold dots; the file names stay in ``names``
        self.tensors = torch.nn.ParameterList([torch.nn.Parameter(t) for t in tensors.values()])
        packed = dict(packed or {})  # integers held as stored (runtime/packed.py): read, never trained
        self._packed_index = {name: i for i, name in enumerate(packed)}
        self.packed = torch.nn.ModuleList(packed.values())
        self.kernels = False  # use_kernels(): integer matmuls where torch has them
        self.bases: set[str] = set()  # names of chunks' base tensors (attach fills it)
        self.quant = dict(quant or {})
        self.quantization_aware = False
        self.partial_sums = True
        self._partial: dict[tuple, tuple] = {}  # (base, terms) -> (float32 weight, stamp)

    def __getitem__(self, name: str) -> torch.nn.Parameter | PackedMatrix:
        i = self._packed_index.get(name)
        return self.tensors[self._index[name]] if i is None else self.packed[i]

    def value(self, name: str) -> torch.Tensor:
        """The tensor as a forward pass uses it (a packed one dequantized for the call)."""
        p = self[name]
        if isinstance(p, PackedMatrix):
            return p.dequantize()
        if self.quantization_aware and name in self.quant:
            return straight_through(p, *self.quant[name])
        return p

    def linear(self, name: str, x: torch.Tensor, conv1d: bool) -> torch.Tensor:
        """``x`` through the stored matrix as a layer's weight: a packed one by its integer kernel where
        it has one, else formed for the call."""
        p = self[name]
        if isinstance(p, PackedMatrix) and not conv1d:
            return p.linear(x)
        w = self.value(name).to(x.dtype)
        return x @ w if conv1d else F.linear(x, w)

    def use_kernels(self) -> int:
        """Move every packed matrix that torch has a weight-only integer matmul for to its layout,
        and low-rank factors that have none to bfloat16 values (runtime/packed.py); returns how many
        moved. A factor is any matrix but a chunk's base: increments, shared bases, residuals."""
        self.kernels = True
        return sum(m.use_kernels(thin=name not in self.bases) for name, m in zip(self._packed_index, self.packed))

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self[name].shape)

    def dtype_of(self, name: str) -> torch.dtype:
        return self[name].dtype

    @property
    def device(self) -> torch.device:
        held = list(self.tensors) + [m.q for m in self.packed]
        return held[0].device if held else torch.device("cpu")

    def items(self):
        return ((name, self.tensors[i]) for i, name in enumerate(self.names))

    def _stamp(self, base: str | None, terms: tuple) -> tuple:
        """What a partial sum depends on: each tensor's identity, storage and version (an optimizer
        step or a copy under no_grad moves the version, a ``.data`` swap the storage), the
        quantizer and grad mode."""
        names = ([base] if base else []) + [n for term in terms for n in term]
        held = [p.q if isinstance(p, PackedMatrix) else p for p in map(self.__getitem__, names)]
        return (torch.is_grad_enabled(), self.quantization_aware,
                tuple((id(p), p.data_ptr(), p._version) for p in held))

    def partial(self, base: str | None, terms: tuple) -> torch.Tensor | None:
        """The float32 sum of ``base`` and ``terms`` kept by the layer that formed it, if still exact."""
        entry = self._partial.get((base, terms)) if self.partial_sums else None
        if entry is None or entry[1] != self._stamp(base, terms):
            return None
        return entry[0]

    def keep(self, base: str | None, terms: tuple, w: torch.Tensor) -> None:
        """Keep ``w`` for the next layer of the chain, in place of the sum it was built from."""
        if not self.partial_sums or not terms:
            return
        key = (base, terms)
        self._partial.pop((base, terms[:-1]), None)
        self._partial[key] = (w, self._stamp(base, terms))
        if w.requires_grad:  # once backward has run through it, its graph is spent
            w.register_hook(lambda grad: self._drop(key, w))

    def _drop(self, key: tuple, w: torch.Tensor) -> None:
        if key in self._partial and self._partial[key][0] is w:
            del self._partial[key]

    def forget(self) -> None:
        self._partial.clear()


class VloraLinear(torch.nn.Module):
    """A Linear (weight ``(out, in)``) or Conv1D (weight ``(in, out)``) over shared factors."""

    def __init__(self, store: FactoredStore, shape: tuple[int, int], base: str | None,
                 terms: list[tuple[str, str]], bias: torch.nn.Parameter | None, conv1d: bool,
                 feeds: bool = False):
        super().__init__()
        self.__dict__["store"] = store  # not a submodule: the model holds the store once
        self.shape = tuple(shape)
        self.base = base
        self.terms = list(terms)
        self.bias = bias
        self.conv1d = conv1d
        self.rank = sum(store.shape_of(a)[0] for _, a in self.terms)
        self.feeds = feeds  # the next layer of a chain builds on this one's weight

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.conv1d else self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[1] if self.conv1d else self.shape[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) with the terms' ranks side by side: the weight is base + B A."""
        if not self.terms:
            return None
        s = self.store
        return torch.cat([s.value(b) for b, _ in self.terms], 1), torch.cat([s.value(a) for _, a in self.terms], 0)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, formed on demand (float32 sums, as expand does), in the stored dtype."""
        s = self.store
        dtype = s.dtype_of(self.base if self.base else self.terms[0][0])
        terms = tuple(self.terms)
        upstream = s.partial(self.base, terms[:-1]) if len(terms) > 1 else None
        if upstream is not None:  # the chain so far, as the layer before this one formed it
            b, a = terms[-1]
            w = upstream + s.value(b).float() @ s.value(a).float()
        else:
            w = s.value(self.base).float() if self.base else None
            bf = self.factors()
            if bf is not None:
                delta = bf[0].float() @ bf[1].float()
                w = delta if w is None else w + delta
            if w is None:
                w = torch.zeros(self.shape, device=s.device)
        if self.feeds:
            s.keep(self.base, terms, w)
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, n = self.shape
        if self.rank * (m + n) >= m * n:  # low rank would cost more than the weight itself
            w = self.weight.to(x.dtype)
            y = x @ w if self.conv1d else F.linear(x, w)
        else:
            y = None
            if self.base:
                y = self.store.linear(self.base, x, self.conv1d)
            low = self._low_rank(x)
            if low is not None:
                y = low if y is None else y + low
            if y is None:
                y = x.new_zeros(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _low_rank(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x`` through the increments alone: all terms at once, or term by term through the
        store's integer kernels where it uses them."""
        s, conv1d = self.store, self.conv1d
        if s.kernels and self.terms:
            out = [s.linear(a, s.linear(b, x, True), True) if conv1d else s.linear(b, s.linear(a, x, False), False)
                   for b, a in self.terms]
            return sum(out[1:], out[0])
        bf = self.factors()
        if bf is None:
            return None
        b, a = bf[0].to(x.dtype), bf[1].to(x.dtype)
        return (x @ b) @ a if conv1d else F.linear(F.linear(x, a), b)

    def extra_repr(self) -> str:
        kind = "conv1d" if self.conv1d else "linear"
        return f"{kind} {self.in_features}->{self.out_features}, base={self.base or 'none'}, rank={self.rank}"


def layer_terms(fp: FamilyPlan) -> dict[int, tuple[str | None, list[tuple[str, str]]]]:
    """layer -> (base tensor name or None, increments from the base to it), as expand rebuilds."""
    out = {}
    paths: dict[int, list[tuple[str, str]]] = {}  # chunk -> the increments to its layer rebuilt last
    for t in walk(fp):
        path = paths.pop(t.chunk, []) if t.over == "previous" else []
        path = path + ([t.factors] if t.factors else []) + ([t.residual] if t.residual else [])
        if not t.last:
            paths[t.chunk] = path
        if t.layer is not None:
            out[t.layer] = (t.base, path)
    return out


def attach(model: torch.nn.Module, plan: Plan, store: FactoredStore, read=None) -> dict[str, VloraLinear]:
    """Swap every factorised module of ``model`` for a ``VloraLinear`` over ``store``; in place.

    ``read(key)`` lets modules be found by value when transformers renamed them (see
    ``models.module_for_key``). Returns checkpoint key -> new module.
    """
    from ..io.models import module_for_key

    found = {}
    for fp in plan.families:
        for layer in fp.layers:
            key = fp.key(layer)
            hit = module_for_key(model, key, read)
            if hit is None:
                raise VloraError(f"{key} has no module in the model")
            found[key] = (fp, layer, *hit)
    model.add_module("vlora_store", store)
    store.bases = {t.base for fp in plan.families for t in walk(fp) if t.base is not None}
    model.register_forward_hook(lambda *_: store.forget())  # partial sums live for one pass
    out = {}
    terms = {fp.name: layer_terms(fp) for fp in plan.families}
    upstream = {(fp.name, base, tuple(path[:i])) for fp in plan.families
                for base, path in terms[fp.name].values() for i in range(1, len(path))}
    for key, (fp, layer, name, module) in found.items():
        conv1d = type(module).__name__ == "Conv1D"
        if not (isinstance(module, torch.nn.Linear) or conv1d):
            raise VloraError(f"{key}: a {type(module).__name__} cannot run factored (only Linear and Conv1D)")
        base, path = terms[fp.name][layer]
        new = VloraLinear(store, fp.shape, base, path, module.bias, conv1d,
                          feeds=(fp.name, base, tuple(path)) in upstream)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        out[key] = new
    return out


def load_factored(vlora_path: str | Path, config_dir: str | Path | None = None, head: str | None = None,
                  dtype: torch.dtype | None = None, packed: bool | Collection[str] | None = None,
                  kernels: bool = False):
    """A transformers model that runs the VLoRA file factored, in eval mode.

    Its memory is the file's tensors: the pass-through ones as transformers loads them, the bases
    and factors once in the store. ``packed`` (the default unless ``dtype`` is given) keeps every
    integer-stored tensor as its integers and scales (runtime/packed.py), quantized pass-through
    embeddings and heads included, so the model holds about the file's bytes; without it they are
    dequantized to float parameters, as healing trains them; a collection of stored names keeps
    just those packed (and quantized pass-through tables, which never train): healing holds what
    it freezes as stored. ``dtype`` overrides the float
    tensors' stored dtype (e.g. float32 to train). ``kernels`` (packed only) runs the integers
    through torch's weight-only int8 and int4 matmuls where they take them, with bfloat16
    activations: faster at small batches on CPU, at bfloat16's rounding, and grids narrower than
    4 bits held as int4 (PackedMatrix.use_kernels).
    """
    from ..io.models import load_state_dict_model

    vfile = VloraFile(vlora_path)
    packed = dtype is None if packed is None else packed
    only = None if packed is True else frozenset(packed or ())  # None: every integer-stored tensor
    factorised = factorised_keys(vfile.plan)
    held_packed = {q.key for q in vfile.plan.passthrough} if packed is not False else set()
    placeholders = _placeholders(vfile, factorised | held_packed)
    state = {key: placeholders[key] if key in placeholders else vfile.get(key) for key, _, _ in vfile.source.tensors}
    model = load_state_dict_model(vfile.path, config_dir, head, state)
    names = [name for fp in vfile.plan.families for name, _ in family_matrices(fp)]
    ints = {name: packed_matrix(vfile, name) for name in names
            if name in vfile.quantized and (only is None or name in only)}
    stored = {name: vfile.get(name) for name in names if name not in ints}
    if dtype is not None:
        stored = {k: v.to(dtype) for k, v in stored.items()}
    quant = {name: (q.scheme, q.group_size, vfile.checkpoint.read(name + SCALE_SUFFIX))  # the file's scales, kept
             for name, q in vfile.quantized.items() if name in stored}
    attach(model, vfile.plan, FactoredStore(stored, quant, ints), read=placeholders.__getitem__)
    for key in sorted(held_packed):
        _pack_passthrough(model, key, packed_matrix(vfile, key), placeholders.__getitem__)
    if kernels and packed is True:
        model.vlora_store.use_kernels()
        tables = {id(m.matrix) for m in model.modules() if isinstance(m, PackedEmbedding)}
        for m in model.modules():  # a table read by rows keeps its rows, unless int8 (rows as they are)
            if isinstance(m, PackedLinear) and (id(m.matrix) not in tables or m.matrix.scheme == "int8"):
                m.matrix.use_kernels()
    return model.eval()


def packed_matrix(vfile: VloraFile, name: str) -> PackedMatrix:
    """A quantized tensor of the file as its integers and scales."""
    from ..io.checkpoint import DTYPES

    spec = vfile.quantized[name]
    read = vfile.checkpoint.read
    return PackedMatrix(read(name), read(name + SCALE_SUFFIX), spec.shape, spec.scheme, spec.group_size,
                        DTYPES[spec.dtype], name=f"{vfile.path}: {name}")


def _pack_passthrough(model: torch.nn.Module, key: str, matrix: PackedMatrix, read) -> None:
    """Swap the Embedding or Linear that holds pass-through ``key`` for its packed twin, and every
    Linear tied to it (a head that shares the embedding table) for one over the same integers."""
    from ..io.models import module_for_key

    hit = module_for_key(model, key, read)
    if hit is None:
        raise VloraError(f"{key} has no module in the model")
    weight = hit[1].weight
    swaps = []
    for name, module in model.named_modules():
        if getattr(module, "weight", None) is not weight:
            continue
        if isinstance(module, torch.nn.Embedding):
            swaps.append((name, PackedEmbedding(matrix, module.padding_idx)))
        elif isinstance(module, torch.nn.Linear):
            swaps.append((name, PackedLinear(matrix, module.bias)))
        else:
            raise VloraError(f"{key}: a {type(module).__name__} cannot run packed (only Embedding and Linear)")
    for name, new in swaps:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)


def _placeholders(vfile: VloraFile, keys: set[str]) -> dict[str, torch.Tensor]:
    """One broadcast scalar per factorised weight: no memory, and a distinct value to be found by."""
    from ..io.checkpoint import DTYPES

    out = {}
    for i, (key, dt, shape) in enumerate(k for k in vfile.source.tensors if k[0] in keys):
        out[key] = torch.full((), float(i + 1), dtype=DTYPES[dt]).expand(shape)
    return out


def factored_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds, each storage counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total
