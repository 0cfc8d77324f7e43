"""Block-sequential planning: plan, fit and pass on one block of layers at a time.

The default plan chooses each family's form and ranks by measurement (planning/search.py). Planned on the
whole model (``planning="model"``), that takes every layer's Gram and the whole model in memory, and
each measurement is a forward pass of the model over the held-back samples. Planned by blocks
(``planning="blocks"``, and under ``auto`` where the model and its Grams would take more than half
the device's memory), the stack is cut into blocks, which are the chunks (``chunks`` of them, else
``BLOCKS``), and block by block, in order, as the sequential fit goes layer by layer (pipelines/sequential.py):

1. the block's layers are loaded (from the checkpoint, when the model was loaded by layer);
2. the calibration stream, as the blocks compressed so far give it, runs through the block's
   original layers, and every linear's input Gram is taken: the block's Grams, never all of them;
3. planner.plan_measured plans the block's families, each chunk the block itself and each family's
   budget its share (by layers) of what the whole stack's plan gives it; a measurement is the
   block's output error on the held-back samples' stream at the block (BlockMeter: a pass of the
   block, not of the model), and measured rank allocation moves bytes between the block's families;
4. the block is fitted layer by layer as pipelines/sequential.py fits (error feedback, a stage per input),
   families that need all their layers at once (a whitened-mean base, a shared basis) from the
   block's Grams, and both streams move on.

What planning by blocks gives up against planning on the model: a chunk never crosses a block's
bounds (no dynamic programme over the whole stack), bytes move between the families of a block,
not between blocks, and a candidate is judged by its block's output, not the model's. What it wins:
memory is one block's weights and Grams and the streams' activations at one block boundary (the
issue's "one chunk plus its Grams"), a measurement costs a block's pass, and each block is planned
on the inputs the compressed blocks before it feed it. docs/planning.md has the measured trade.

The file's header holds the plan, which is whole only after the last block; the fitted tensors wait
in a spool on disk (write.Spool) until then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch

from ..calibrate.grams import Grams, OutputMeter, gram_hook
from ..errors import VloraError
from ..fit.factorise import LayerFit, fit_family
from ..io.models import batches, token_limit
from ..forms.stored import form_of
from ..plan import CompressConfig, FamilyPlan, Plan, StackPlan, split_equal
from ..forms import candidate_bytes
from ..forms.vlora import MAX_AUTO_CHUNKS
from ..planning.search import plan_measured
from ..planning.space import reference
from ..progress import Progress
from ..pipelines.sequential import SequentialFit, Stream, _block_of, _output, _unload, sequential_family, stack_layers
from ..io.stacks import Stack, split_key

BLOCKS = MAX_AUTO_CHUNKS  # blocks per stack without `chunks`: as many as the chunk counts planning on the model tries


class BlockPlanner(SequentialFit):
    """Plan and fit every stack a block at a time while the activations flow; ``plan`` once done."""

    def __init__(self, model, preprocessor, samples: list, held: list, stacks: list[Stack], config: CompressConfig,
                 read: Callable[[str], torch.Tensor], weights: Callable[[str], torch.Tensor],
                 onload: tuple[Callable[[str], torch.Tensor], dict[str, torch.nn.Parameter]] | None = None,
                 stack_budget: int | None = None):
        """``held``: held-back samples to measure on. ``read`` finds modules (SequentialFit);
        ``weights(key)`` gives the weights to plan and fit, on the device. ``stack_budget``: the
        stacks' bytes under a size target, shared out to the blocks by their original bytes."""
        super().__init__(model, preprocessor, samples, None, config, read, onload)
        cal = config.calibration
        self.held = list(batches(preprocessor, held, cal.batch_size, token_limit(model, cal.max_length)))
        self.stacks, self.weights, self.stack_budget = stacks, weights, stack_budget
        self._whole = {fam.name: fam for stack in stacks for fam in stack.families}
        self.plan: Plan | None = None

    def run(self, write: Callable[[str, torch.Tensor], None], progress: bool = False) -> Iterator[LayerFit]:
        """Plan and fit block by block, ``write`` each stored tensor as it is made, yield LayerFits;
        ``self.plan`` holds the whole plan once the walk is done."""
        # parts: family name -> its blocks' plans
        stack_plans, parts, notes, decisions, allocations = [], {}, [], [], []
        for stack in self.stacks:
            modules = stack_layers(self.model, stack.families, self.read)
            first = _block_of(modules, stack.layers[0], stack.prefix)
            streams, held = self._capture(first, self.batches), self._capture(first, self.held)
            bounds = split_equal(len(stack.layers), min(self.config.chunks or BLOCKS, len(stack.layers)))
            stack_plans.append(StackPlan(stack.prefix, stack.layers, bounds))
            with Progress(f"planning {stack.prefix} by blocks", len(stack.layers), enabled=progress) as bar:
                for start, end in bounds:
                    block = _sub_stack(stack, stack.layers[start:end])
                    mods = [_block_of(modules, layer, stack.prefix) for layer in block.layers]
                    plan = yield from self._block(block, mods, streams, held, write, parts, bar)
                    span = f"layers {block.layers[0]}-{block.layers[-1]}"
                    notes += [f"{span}: {note}" for note in plan.notes]
                    decisions += [replace(d, scope=span) for d in plan.decisions]
                    allocations += [replace(a, scope=span) for a in plan.allocations]
                    for fp in plan.families:
                        parts.setdefault(fp.name, []).append(fp)
        self.plan = Plan(tuple(stack_plans), tuple(_joined(fps) for fps in parts.values()), tuple(notes),
                         decisions=tuple(decisions), allocations=tuple(allocations))

    def _block(self, block: Stack, mods: list[torch.nn.Module], streams: list[Stream], held: list[Stream],
               write, parts: dict[str, list[FamilyPlan]], bar) -> Iterator[LayerFit]:
        """Plan one block, fit it, move both streams past it; return its plan."""
        placeholders = [p for m in mods for p in self._load(m)]
        try:
            grams = self._grams(block, mods, streams)
            meter = BlockMeter(self, mods, held) if held else None
            plan = plan_measured([block], replace(self.config, chunks=1), self.weights, grams.whitener, meter,
                                 self._budgets(block), self._total(block))
            # a whitened-mean base or a shared basis is stored once per chunk, named by the chunk's
            # place in the family: the block's chunk i is the family's chunk i + the chunks before
            rename = {}
            for fp in plan.families:
                offset = sum(len(p.chunks) for p in parts.get(fp.name, []))
                for i, c in enumerate(fp.chunks):
                    rename.update(form_of(c).renames(fp, i, offset + i))
            placed = lambda name, tensor: write(rename.get(name, name), tensor)  # noqa: E731
            # families on a whitened-mean base are fitted at once from the block's Grams: before the
            # layers under `inputs`, so the compressed stream passes them; else after, so the original
            # stream that `none` and `outputs` carry runs through the original weights. A shared basis
            # is made from the block's Grams too, and its coefficients fitted layer by layer
            self.bases = (self.weights, grams.whitener)
            at_once = [fp for fp in plan.families if not sequential_family(fp, True)]
            early = self.feedback == "inputs"
            if early:
                yield from self._fit_at_once(at_once, grams, placed)
            mine = [fp for fp in plan.families if sequential_family(fp, True)]
            walks = self._walks(mine)
            for layer, module in zip(block.layers, mods):
                yield from self._fit_layer(layer, module, mine, walks, streams, placed)
                bar.advance()
            if not early:
                yield from self._fit_at_once(at_once, grams, placed)
            del grams
            self.bases = None
            if meter is not None:  # the held-back stream moves on as the calibration stream did
                for s, original in zip(held, meter.originals or [None] * len(held)):
                    s.compressed = original if original is not None else _through(mods, s)
        finally:
            _unload(placeholders)
        return plan

    def _fit_at_once(self, families: list[FamilyPlan], grams: Grams, write) -> Iterator[LayerFit]:
        for fp in families:
            for item in fit_family(fp, self.weights, self.config, grams.whitener, rebuilt=self._set):
                if isinstance(item, LayerFit):
                    self.fitted.append(item.key)
                    yield item
                else:
                    write(*item)

    def _grams(self, block: Stack, mods: list[torch.nn.Module], streams: list[Stream]) -> Grams:
        """The input Gram of every factorised weight of the block, from the calibration stream as
        the compressed blocks before give it, through the block's original layers."""
        cal = self.config.calibration
        grams = Grams(cal.damping, cal.gram_dtype, cal.gram_dir)
        state: dict = {}
        handles = []
        try:
            for fam in block.families:
                for layer in fam.layers:
                    key = fam.key(layer)
                    module = self._module(key)
                    grams.side[key] = 1 if isinstance(module, torch.nn.Linear) else 0  # else GPT-2's Conv1D
                    handles.append(module.register_forward_pre_hook(gram_hook(key, grams, state)))
            for s in streams:
                state.clear()
                state["mask"] = s.mask
                _through(mods, s)
        finally:
            for h in handles:
                h.remove()
        grams.samples, grams.tokens = self.samples, self.tokens
        self.gram_bytes = max(self.gram_bytes, grams.nbytes)
        return grams

    def _budgets(self, block: Stack) -> dict[str, int]:
        """Each family's bytes in the block: its share, by layers, of the reference form's bytes
        for the whole family at ``rank`` (compress sets the rank a size target allows)."""
        out = {}
        for fam in block.families:
            whole = self._whole[fam.name]
            nbytes = candidate_bytes(whole, reference(self.config, len(whole.layers)), self.config.rank, self.config)
            out[fam.name] = nbytes * len(fam.layers) // len(whole.layers)
        return out

    def _total(self, block: Stack) -> int | None:
        """The block's share of a size target's stack budget, by original bytes (None: no target)."""
        if self.stack_budget is None:
            return None
        whole = sum(fam.nbytes for fam in self._whole.values())
        return self.stack_budget * sum(fam.nbytes for fam in block.families) // whole


class BlockMeter(OutputMeter):
    """The output error of one block of layers with some weights replaced, on the held-back
    samples' stream at the block's input: what planning by blocks measures by."""

    name = "block"

    def __init__(self, fit: SequentialFit, mods: list[torch.nn.Module], held: list[Stream]):
        self.model, self.read, self._modules = fit.model, fit.read, {}
        self.mods, self.held = mods, held
        outputs = [_through(mods, s) for s in held]
        self.reference = [_real(h, s.mask) for h, s in zip(outputs, held)]
        # the original block's outputs carry the held-back stream on where feedback is off
        self.originals = outputs if fit.feedback == "none" else None

    def _outputs(self) -> Iterator[torch.Tensor]:
        for s in self.held:
            yield _real(_through(self.mods, s), s.mask)


def _through(mods: list[torch.nn.Module], s: Stream) -> torch.Tensor:
    """The stream's compressed hidden states through ``mods`` as they now are."""
    h = s.compressed
    with torch.no_grad():
        for module in mods:
            h = _output(module(h, *s.args, **s.kwargs))
    return h


def _real(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of real (not padding) tokens, in float64."""
    return (h[mask] if mask is not None else h).double()


def _sub_stack(stack: Stack, layers: tuple[int, ...]) -> Stack:
    """The stack cut down to ``layers``: each family's layers among them."""
    inside = set(layers)
    families = tuple(f for f in (replace(f, layers=tuple(x for x in f.layers if x in inside)) for f in stack.families)
                     if f.layers)
    return Stack(stack.prefix, layers, families, tuple(k for k in stack.keys if split_key(k)[1] in inside))


def _joined(parts: list[FamilyPlan]) -> FamilyPlan:
    """One family's plan from its blocks' plans: their chunks in order."""
    first = parts[0]
    for fp in parts[1:]:
        if (fp.quant, fp.base_quant, fp.store_dtype, fp.group_size) != \
                (first.quant, first.base_quant, first.store_dtype, first.group_size):
            raise VloraError(f"{first.name}: its blocks were planned in different storages")  # one scheme per family
    return replace(first, chunks=tuple(c for fp in parts for c in fp.chunks))
