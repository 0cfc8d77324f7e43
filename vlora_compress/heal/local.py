"""Block-local healing: each layer of the stack trained, in order, to give the teacher's output.

End-to-end distillation of a language model needs millions of tokens; a few CPU-minutes buy
thousands, and spent that way they made SmolLM2 worse (docs/healing.md). Training one layer at a
time is far more sample-efficient (BRECQ's block reconstruction, block-wise distillation): a layer
has few parameters, its target is dense (every hidden unit of every token, not one next-token
distribution), and no backward pass crosses the whole model. So, like the sequential compressor:

1. the training windows run through the model to the stack's first layer (``capture``);
2. for each layer in order, the teacher's layer maps the teacher's stream to its output ``Y``; the
   student's layer is trained to map the *student's* stream (what the healed layers before it
   give) to ``Y``, minimising ‖f_s(X̂) − Y‖² / ‖Y‖² over real tokens, so each layer also undoes
   what is left of the error upstream of it;
3. the student's stream passes the healed layer and goes on.

What trains in a layer is what the file stores for it: its bases and increment factors (each
stored tensor trains in the first layer that reads it and stays fixed after, so a layer healed
earlier is never changed under it) and the layer's 1-D parameters (norms, biases), as
``HealConfig.train`` allows. A layer's training is kept only if it lowers the layer's error on
held-back windows; otherwise the layer goes back to what it was.

Memory: the model pair, the two streams' hidden states at one layer boundary for the training
and held-back windows, and one layer's activations for a batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..runtime.factored import VloraLinear
from ..forms.stored import plan_roles
from ..plan import Plan
from ..progress import Progress
from .student import trained_as
from ..pipelines.sequential import Stream, _output, capture, stack_layers


@dataclass(frozen=True)
class LocalReport:
    """What block-local healing did, layer by layer (held-back relative error of the layer's output)."""

    layers: int = 0
    steps: int = 0  # optimiser steps, all layers
    tokens: int = 0  # real tokens trained on, all layers
    seconds: float = 0.0
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    kept: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def heal_locally(student, teacher, plan: Plan, train: list, held: list, config, seconds: float | None,
                 autocast=None, progress: bool = False, reduce=None) -> LocalReport:
    """Train ``student`` (a factored model) layer by layer towards ``teacher``, in place.

    ``train`` and ``held`` are ``models.batches`` lists; ``config`` a HealConfig (``local_steps``
    steps a layer at ``local_lr``, ``train`` saying what may train); ``seconds`` the wall time the
    whole pass may take (None: no bound), shared out evenly over the layers still to do;
    ``autocast`` the end-to-end loop's (None: float32).
    ``reduce(tensor)`` sums a tensor over processes in place (data parallel: each process holds
    its share of every batch); None: one process.
    """
    started = time.perf_counter()
    store = student.vlora_store
    frozen = {p: p.requires_grad for p in student.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    trained: set[str] = set()
    steps = tokens = 0
    before, after, kept = [], [], []
    autocast = autocast or contextlib.nullcontext()
    try:
        for stack in plan.stacks:
            families = [fp for fp in plan.families if fp.stack == stack.prefix]
            if not families:
                continue
            s_layers, t_layers = stack_layers(student, families), stack_layers(teacher, families)
            layers = [layer for layer in stack.layers if layer in s_layers and layer in t_layers]
            first_t = t_layers[layers[0]]
            streams, held_streams = capture(teacher, first_t, train), capture(teacher, first_t, held)
            with Progress(f"healing {stack.prefix} layer by layer", len(layers), enabled=progress) as bar:
                for i, layer in enumerate(layers):
                    s_block, t_block = s_layers[layer], t_layers[layer]
                    for s in streams + held_streams:  # the teacher's output: the layer's target
                        with torch.no_grad(), autocast:
                            s.next_original = _output(t_block(s.original, *s.args, **s.kwargs)).float()
                    params = _layer_parameters(s_block, store, trained, config.train, plan)
                    if seconds is None:
                        slice_ = None
                    else:  # the same on every process, or they would stop at different steps
                        slice_ = max(0.0, (seconds - _agreed(time.perf_counter() - started, reduce, streams)) / (len(layers) - i))
                    e0 = _error(s_block, held_streams, autocast, reduce)
                    n, t = _train_layer(s_block, params, streams, config, slice_, autocast, reduce)
                    e1 = _error(s_block, held_streams, autocast, reduce) if n else e0
                    if n and held_streams and not e1 < e0:  # it did not help on held-back windows: undo
                        with torch.no_grad():
                            for p, start in params.values():
                                p.copy_(start)
                    trained.update(params)
                    steps, tokens = steps + n, tokens + t
                    before.append(e0), after.append(min(e0, e1)), kept.append(bool(n) and (not held_streams or e1 < e0))
                    with torch.no_grad(), autocast:  # both streams past the layer
                        for s in streams + held_streams:
                            s.compressed = _output(s_block(s.compressed, *s.args, **s.kwargs)).float()
                            s.original, s.next_original = s.next_original, None
                    bar.describe(f"healing layer {layer} · error {e0:.4f} -> {min(e0, e1):.4f}")
                    bar.advance()
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return LocalReport(len(before), steps, tokens, time.perf_counter() - started, before, after, kept)


def _layer_parameters(block, store, trained: set[str], train: tuple[str, ...], plan: Plan) -> dict[str, tuple]:
    """name -> (parameter, its value now) for what this layer trains: the stored tensors it reads
    first (``trained`` holds those an earlier layer had), and its 1-D parameters."""
    out, roles = {}, plan_roles(plan)
    for module in block.modules():
        if isinstance(module, VloraLinear):
            for name in ([module.base] if module.base else []) + [n for pair in module.terms for n in pair]:
                kind = trained_as(roles, name)
                if kind in train and name not in trained and name not in out:
                    out[name] = store[name]
    if "dense" in train:
        for name, p in block.named_parameters():
            if p.dim() == 1:
                out[f"layer.{name}"] = p
    return {name: (p, p.detach().clone()) for name, p in out.items()}


def _train_layer(block, params: dict, streams: list[Stream], config, seconds: float | None, autocast,
                 reduce) -> tuple[int, int]:
    """Adam on the layer's parameters, ``config.local_steps`` steps (or until ``seconds``), a cosine
    decay from ``config.local_lr``; one batch of windows a step, in a fixed shuffled order.
    Returns (steps, real tokens)."""
    if not params or not streams or config.local_steps < 1:
        return 0, 0
    tensors = [p for p, _ in params.values()]
    for p in tensors:
        p.requires_grad_(True)
    opt = torch.optim.Adam(tensors, lr=config.local_lr)
    order = torch.randperm(len(streams), generator=torch.Generator().manual_seed(config.seed)).tolist()
    started, steps, tokens = time.perf_counter(), 0, 0
    try:
        while steps < config.local_steps:
            elapsed = _agreed(time.perf_counter() - started, reduce, streams) if seconds is not None else 0.0
            if seconds is not None and steps and elapsed >= seconds:
                break
            used = steps / config.local_steps
            if seconds:
                used = max(used, elapsed / seconds)
            for g in opt.param_groups:
                g["lr"] = config.local_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, used)))
            s = streams[order[steps % len(streams)]]
            with autocast:
                out = _output(block(s.compressed, *s.args, **s.kwargs))
            per_token, m = _per_token(out.float(), s)
            count = m.sum()
            if reduce is not None:
                reduce(count)  # every process's tokens: the summed gradients are the global mean's
            loss = (per_token * m).sum() / count.clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if reduce is not None:
                for p in tensors:
                    reduce(p.grad)
            torch.nn.utils.clip_grad_norm_(tensors, config.clip)
            opt.step()
            steps += 1
            tokens += int(count)
    finally:
        for p in tensors:
            p.requires_grad_(False)
            p.grad = None
    return steps, tokens


def _agreed(seconds: float, reduce, streams: list[Stream]) -> float:
    """The mean of ``seconds`` over processes (each has its own clock); itself for one process."""
    if reduce is None or not streams:
        return seconds
    t = torch.tensor([seconds, 1.0], dtype=torch.float64, device=streams[0].compressed.device)
    reduce(t)
    return float(t[0] / t[1])


def _error(block, streams: list[Stream], autocast, reduce) -> float:
    """The layer's error over ``streams``: the mean over real tokens of ‖f(x̂) − y‖² / ‖y‖²."""
    if not streams:
        return float("nan")
    total = torch.zeros(2, dtype=torch.float64, device=streams[0].compressed.device)
    with torch.no_grad(), autocast:
        for s in streams:
            out = _output(block(s.compressed, *s.args, **s.kwargs)).float()
            per_token, m = _per_token(out, s)
            total[0] += (per_token * m).sum().double()
            total[1] += m.sum().double()
    if reduce is not None:
        reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def _per_token(out: torch.Tensor, s: Stream) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖out − y‖² / ‖y‖² per token, the real-token mask), y the teacher's output. Per token, not
    over the whole window: a few tokens of a decoder's residual stream (the first, the attention
    sink) are hundreds of times larger than the rest, and would otherwise be all the loss sees."""
    y = s.next_original
    per_token = ((out - y) ** 2).sum(-1) / (y ** 2).sum(-1).clamp(min=1e-12)
    m = s.mask.float() if s.mask is not None else torch.ones_like(per_token)
    return per_token, m

