"""Block-sequential calibration and fitting: one layer of the stack at a time, in order.

GPTQ, SVD-LLM and llm-compressor's sequential pipeline work this way, and so does this stage:

1. the calibration samples run through the model up to the stack's first layer, and that layer's
   inputs (and whatever else it is called with: masks, rotary embeddings) are kept;
2. for each layer in order, its inputs go through it as the original model computes them (``X``)
   or as the layers compressed so far do (``X̂``), or both, as ``feedback`` needs; each linear gets
   its Gram;
3. each weight is fitted, whitened by that Gram, to a target that ``feedback`` sets:

   - ``inputs`` (the default): the Gram of the inputs the compressed model actually feeds the
     layer (``X̂ᵀX̂``), target ``W``: each layer fitted for the inputs it will see (GPTQ's order).
     Within a layer too: its weights are fitted in stages, one per input they read (q, k and v;
     o; gate and up; down), each stage's Grams taken after the stage before it is compressed
     (GPTQ's "true sequential"; SmolLM2 at 20% removed: perplexity ratio 2.91 -> 2.57);
   - ``none``: the original activations throughout (``X̂ = X``, target ``W``): plain calibration,
     one layer's Grams at a time;
   - ``outputs``: also the cross Gram ``C = X̂ᵀX``, and the target ``T = W Cᵀ G⁻¹``, the matrix
     that best turns the compressed model's inputs into the original's outputs
     (``argmin ‖X̂ Tᵀ − X Wᵀ‖``), so a rank-r fit of T undoes upstream error instead of
     inheriting it. It needs far more calibration tokens than the layer has inputs: with what
     ships (512 sentences) it fits the calibration text better and held-out text worse, on
     MiniLM and far worse on SmolLM2 (docs/calibration.md);
4. the layer, now compressed, carries the compressed stream on to the next one.

The fitting is fit_family's walk, driven a layer at a time, so what is written is what expand
rebuilds. It needs every chunk's base to be its first layer or none (per-layer factors); a family
planned otherwise (a whitened-mean base) is fitted after the pass from the Grams of the original
stream, as without this stage. A shared basis is made at its group's first layer from the original
model's weights and Grams (``bases``), and each layer's coefficients over it as the layer comes.
Memory: the model (or, loaded by layer, all but its stack, and one layer of that), the two
streams' activations at one layer boundary, and one layer's Grams.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..calibrate.grams import sibling_input, token_rows
from ..errors import VloraError
from ..fit.factorise import LayerFit, fit_family
from ..fit.svd import Whitener
from ..io.models import batches, model_device, module_for_key, token_limit
from ..forms.stored import form_of
from ..plan import CompressConfig, FamilyPlan, Plan
from ..progress import Progress


class _Stop(Exception):
    """Raised at the stack's first layer: the inputs are caught, the rest need not run."""


@dataclass
class Stream:
    """One batch at a layer boundary: the hidden states for each stream and how the layer is called."""

    original: torch.Tensor
    compressed: torch.Tensor
    args: tuple
    kwargs: dict
    mask: torch.Tensor | None  # real (not padding) tokens
    next_original: torch.Tensor | None = None  # the original layer's output, until the layer is done


def sequential_family(fp: FamilyPlan, bases: bool = False) -> bool:
    """Whether fit_family can be driven a layer at a time: every chunk's form says it can
    (``Form.sequential``: a base that is the chunk's first layer or none, or made from its one
    layer; a shared basis only where ``bases`` gives the original model's weights and Grams up
    front, so that only the coefficients follow the stream)."""
    return all(form_of(c).sequential(c, bases) for c in fp.chunks)


class SequentialFit:
    """Drive the fit of every sequential family a layer at a time while the activations flow."""

    def __init__(self, model, preprocessor, samples: list, plan: Plan, config: CompressConfig,
                 read: Callable[[str], torch.Tensor] | None = None,
                 onload: tuple[Callable[[str], torch.Tensor], dict[str, torch.nn.Parameter]] | None = None,
                 bases: tuple[Callable[[str], torch.Tensor], Callable] | None = None):
        """``read`` gives checkpoint tensors (to find modules transformers renamed). ``onload`` is
        ``(read, params)`` for a model loaded by layer (models.load_by_layer): each layer's
        parameters in ``params`` get ``read(key)`` before the layer runs and their placeholders back
        once the stream has passed it. ``bases`` is (weights, whitener) of the original model: with
        it, families on shared bases are fitted here too (fit_family's ``bases``)."""
        self.model, self.plan, self.config = model, plan, config
        self.feedback = config.feedback
        self.read = read
        self.bases = bases
        self.onload = onload
        self._onload_keys = {p: key for key, p in onload[1].items()} if onload is not None else {}
        cal = config.calibration
        self.batches = list(batches(preprocessor, samples, cal.batch_size, token_limit(model, cal.max_length)))
        self.samples = len(samples)
        self.tokens = sum(int(m.sum()) if m is not None else n for _, m, n in self.batches)
        self.gram_bytes = 0  # the most Grams held at once, one layer's
        self.fitted: list[str] = []  # keys fitted layer by layer
        self._modules: dict[str, torch.nn.Module] = {}
        self._now: list[_Layer] = []  # the layer being fitted: what the walks read

    def run(self, write: Callable[[str, torch.Tensor], None], progress: bool = False) -> Iterator[LayerFit]:
        """Fit every sequential family, ``write`` each stored tensor as it is made; yield LayerFits."""
        families = [fp for fp in self.plan.families if sequential_family(fp, self.bases is not None)]
        for stack in self.plan.stacks:
            mine = [fp for fp in families if fp.stack == stack.prefix]
            if not mine:
                continue
            modules = stack_layers(self.model, mine, self.read)
            streams = self._capture(modules[stack.layers[0]], self.batches)
            walks = self._walks(mine)
            with Progress(f"sequential {stack.prefix}", len(stack.layers), enabled=progress) as bar:
                for layer in stack.layers:
                    block = _block_of(modules, layer, stack.prefix)
                    placeholders = self._load(block)
                    yield from self._fit_layer(layer, block, mine, walks, streams, write)
                    _unload(placeholders)  # the stream has passed: the layer's memory goes
                    bar.advance()

    def _walks(self, families: list[FamilyPlan]) -> dict[str, Iterator]:
        """Each family's fit_family walk, reading targets and whitenings from the layer being fitted."""
        return {fp.name: fit_family(fp, lambda key: self._now[0].target(key), self.config,
                                    lambda key: self._now[0].whitener(key), rebuilt=self._set, bases=self.bases)
                for fp in families}

    def _fit_layer(self, layer: int, block, families: list[FamilyPlan], walks: dict, streams: list[Stream],
                   write: Callable[[str, torch.Tensor], None]) -> Iterator[LayerFit]:
        """Fit one layer's keys of ``families``, stage by stage, then carry the streams past it."""
        keys = [fp.key(layer) for fp in families if layer in fp.layers]
        for stage in self._stages(block, keys, streams) if keys else []:
            self._now[:] = [self._layer(block, stage, streams)]
            for fp in families:
                if fp.key(layer) in stage:
                    for fit in _advance(walks[fp.name], write):
                        self.fitted.append(fit.key)
                        yield fit
            self._now.clear()  # fitted: its Grams and whitenings go
        self._advance_streams(block, streams)

    def _load(self, block: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """Put the real weights into a layer loaded by layer; (parameter, placeholder) pairs to undo it."""
        undo = []
        for p in block.parameters():
            key = self._onload_keys.get(p)
            if key is not None:
                undo.append((p, p.data))
                p.data = self.onload[0](key).to(device=p.device, dtype=p.dtype)
        return undo

    def _module(self, key: str) -> torch.nn.Module:
        """The linear layer (nn.Linear or GPT-2's Conv1D) whose weight is checkpoint tensor ``key``."""
        if key not in self._modules:
            found = module_for_key(self.model, key, self.read)
            if found is None or not (isinstance(found[1], torch.nn.Linear) or type(found[1]).__name__ == "Conv1D"):
                raise VloraError(f"{key}: the sequential fit needs it to be a linear layer's weight")
            self._modules[key] = found[1]
        return self._modules[key]

    def _set(self, key: str, w_hat: torch.Tensor) -> None:
        """Put a fitted layer into the model, so the compressed stream runs through it."""
        w = self._module(key).weight
        w.data = w_hat.to(device=w.device, dtype=w.dtype).reshape(w.shape)

    def _capture(self, first, work: list) -> list[Stream]:
        return capture(self.model, first, work)

    def _stages(self, block, keys: list[str], streams: list[Stream]) -> list[list[str]]:
        """The layer's keys in the order the layer reads them, one stage per input it reads (q, k and
        v; o; gate and up; down). Under ``inputs`` each stage is fitted before the next one's Grams
        are taken, so that o is whitened by what the compressed q, k and v give it, and down by what
        the compressed gate and up give it (GPTQ's "true sequential"); otherwise one stage: the
        Grams come from the original weights anyway (``none``), or with the original's outputs in
        the same pass (``outputs``)."""
        if self.feedback != "inputs" or len(keys) < 2:
            return [keys]
        modules = {key: (self._module(key), 0) for key in keys}
        rows, _ = _inputs(block, modules, streams[0], streams[0].compressed, output=False)
        stages: dict[str, list[str]] = {}
        for key, (_, first) in rows.items():  # in the order the hooks fired
            stages.setdefault(first, []).append(key)
        missing = [key for key in keys if key not in rows]
        if missing:
            raise VloraError(f"{missing[0]}: the layer never reads this weight's module during calibration")
        return list(stages.values())

    def _layer(self, block, keys: list[str], streams: list[Stream]) -> "_Layer":
        """The Grams of one layer's keys from both streams' inputs (and for ``outputs`` the targets)."""
        modules = {key: (self._module(key), 1 if isinstance(self._module(key), torch.nn.Linear) else 0) for key in keys}
        grams: dict[str, torch.Tensor] = {}
        cross: dict[str, torch.Tensor] = {}
        alias: dict[str, str] = {}
        for s in streams:
            # the original stream runs only where it is used: the Grams of `none`, the cross Grams of `outputs`
            if self.feedback != "inputs":
                x_orig, s.next_original = _inputs(block, modules, s, s.original)
            x_comp = x_orig if self.feedback == "none" else _inputs(block, modules, s, s.compressed, output=False)[0]
            for key, (xh, first) in x_comp.items():
                if first != key:
                    alias[key] = first
                    continue
                xh = xh.float()
                g = (xh.T @ xh).double()
                grams[key] = grams[key] + g if key in grams else g
                if self.feedback == "outputs":
                    c = (xh.T @ x_orig[key][0].float()).double()
                    cross[key] = cross[key] + c if key in cross else c
        self.gram_bytes = max(self.gram_bytes, sum(g.numel() * g.element_size() for g in [*grams.values(), *cross.values()]))
        layer = _Layer(modules, grams, alias, self.config.calibration.damping)
        if self.feedback == "outputs":
            for key in keys:
                group = alias.get(key, key)
                module, side = modules[key]
                wh = layer.whitener(key, keep=True)
                if wh is not None:
                    # T = W (Cᵀ + δ)(G + δ)⁻¹ for a Linear (W is out x in); (G + δ)⁻¹ (C + δ) W for Conv1D.
                    # The damping δ of S pulls T towards W, not towards zero: with X̂ = X, T = W exactly.
                    w = module.weight.detach().double()
                    g_inv_c = wh.gram_inv @ _plus_diagonal(cross[group], wh.damping)
                    layer.targets[key] = (w @ g_inv_c.T if side == 1 else g_inv_c @ w).float()
        return layer

    def _advance_streams(self, block, streams: list[Stream]) -> None:
        """Both streams to the next layer: the original's output was kept when its inputs were taken;
        the compressed stream runs through the layer as now fitted."""
        with torch.no_grad():
            for s in streams:
                if s.next_original is None and self.feedback != "inputs":  # no stage ran: the layer is as it was
                    s.next_original = _output(block(s.original, *s.args, **s.kwargs))
                s.compressed = s.next_original if self.feedback == "none" \
                    else _output(block(s.compressed, *s.args, **s.kwargs))
                s.original, s.next_original = s.next_original, None  # None under `inputs`: not kept


class _Layer:
    """What the fit of one layer reads: each key's target (its weight, unless ``outputs`` set one)
    and its whitening, made from its Gram when first asked for. The Gram goes then, and the
    whitening once every key that shares it has had it, so that a layer's Grams and whitenings are
    not all held at once (a 7B MLP's whitening alone is two 11008² float64 matrices, 1.9 GB)."""

    def __init__(self, modules: dict, grams: dict[str, torch.Tensor], alias: dict[str, str], damping: float):
        self.modules, self.grams, self.alias, self.damping = modules, grams, alias, damping
        self.targets: dict[str, torch.Tensor] = {}
        self.waiting = Counter(alias.get(key, key) for key in modules)  # keys yet to ask, per Gram
        self.made: dict[str, Whitener | None] = {}

    def target(self, key: str) -> torch.Tensor:
        return self.targets.pop(key) if key in self.targets else self.modules[key][0].weight.detach().float()

    def whitener(self, key: str, keep: bool = False) -> Whitener | None:
        group = self.alias.get(key, key)
        if group not in self.made:
            self.made[group] = Whitener.from_gram(self.grams.pop(group), self.modules[key][1], self.damping)
        wh = self.made[group]
        if not keep:
            self.waiting[group] -= 1
            if self.waiting[group] == 0:
                del self.made[group]
        return wh


def capture(model, first, work: list) -> list[Stream]:
    """Each batch's inputs to a stack's first layer ``first`` (and how it is called: masks, rotary
    embeddings), caught by a pre-hook that stops the model there; both streams start as those."""
    caught: list = []

    def hook(module, args, kwargs):
        caught.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = model_device(model)
    # decoders would fill a KV cache nobody reads; encoders and vision models take no such flag
    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    streams = []
    try:
        with torch.no_grad():
            for inputs, mask, _ in work:
                try:
                    model(**{k: v.to(device) for k, v in inputs.items()}, **extra)
                except _Stop:
                    pass
                if len(caught) != 1:
                    raise VloraError("the model never reached its first stacked layer")
                args, kwargs = caught.pop()
                hidden = args[0] if args else kwargs.pop("hidden_states")
                streams.append(Stream(hidden, hidden, tuple(args[1:]), dict(kwargs),
                                      mask.to(device) if mask is not None else None))
    finally:
        handle.remove()
    return streams


def _inputs(block, modules: dict, s: Stream, hidden: torch.Tensor,
            output: bool = True) -> tuple[dict, torch.Tensor | None]:
    """(key -> (the rows its module saw, the first key that saw that very tensor), the layer's
    output) for one batch through ``block`` as it is now. Without ``output`` the layer stops once
    every module has had its input, and the output is None."""
    seen: dict = {}
    rows: dict = {}
    handles = []
    for key, (module, _) in modules.items():
        def hook(mod, args, key=key):
            first = sibling_input(seen, args[0], key)
            rows[key] = (rows[first][0], first) if first is not None else (token_rows(args[0], s.mask), key)
            if not output and len(rows) == len(modules):
                raise _Stop
        handles.append(module.register_forward_pre_hook(hook))
    out = None
    try:
        with torch.no_grad():
            out = _output(block(hidden, *s.args, **s.kwargs))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return rows, out


def _plus_diagonal(m: torch.Tensor, value: float) -> torch.Tensor:
    return m + value * torch.eye(len(m), dtype=m.dtype, device=m.device)


def _advance(walk: Iterator, write: Callable[[str, torch.Tensor], None]) -> Iterator[LayerFit]:
    """Run a family's walk to the end of its next layer: write what it stores, yield its LayerFit."""
    for item in walk:
        if isinstance(item, LayerFit):
            yield item
            return
        write(*item)


def _block_of(modules: dict[int, torch.nn.Module], layer: int, prefix: str) -> torch.nn.Module:
    if layer not in modules:
        raise VloraError(f"cannot find layer {layer} of stack {prefix!r} in the model")
    return modules[layer]


def _unload(placeholders: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Give the parameters of a layer loaded by layer their placeholders back (SequentialFit._load)."""
    for p, data in placeholders:
        p.data = data


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def stack_layers(model, families: list[FamilyPlan], read=None) -> dict[int, torch.nn.Module]:
    """A stack's layer modules by checkpoint layer number, found through the weight of its family
    with the most layers: transformers may rename modules (ViT's ``encoder.layer`` is ``layers`` in
    version 5), so the ModuleList is the one that holds the module of that weight."""
    fp = max(families, key=lambda f: len(f.layers))
    first = fp.layers[0]
    found = module_for_key(model, fp.key(first), read)
    if found is not None:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.ModuleList) and found[0].startswith(name + "."):
                index = found[0][len(name) + 1:].split(".")[0]
                if index.isdigit():
                    offset = int(index) - first
                    return {layer: module[layer + offset] for layer in fp.layers if 0 <= layer + offset < len(module)}
    raise VloraError(f"cannot find the layers of stack {fp.stack!r} in the model")
