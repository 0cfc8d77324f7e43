"""The ways a compression is calibrated, planned and fitted, registered by name, and ``choose``, the
one function that picks one from the config and the machine:

- ``data-free``: no calibration; each family fitted alone from the original's weights;
- ``whole-model``: calibrated with every layer's Gram from the original model at once
  (``--no-sequential``), each family fitted alone, whitened by them;
- ``sequential``: calibrated a layer at a time (sequential.py), each layer fitted for the inputs
  the compressed layers before it feed it; a plan chosen by measurement is chosen first on the
  whole model and its Grams;
- ``blocks``: planned and fitted a block of layers at a time (blocks.py), where the model and its
  Grams would take more than half the device's memory (or ``--planning blocks``).

A pipeline gives what calibration it needs (``calibrate``) and the plan with whatever fits the
layers as the writer goes (``plan``); compress.py writes the rest the same way for all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..calibrate.grams import OutputMeter, calibrate, packing
from ..calibrate.original import load_original, measure_of
from ..config import CompressConfig
from ..io.models import device_memory, head_of
from ..io.write import Spool
from ..plan import Plan
from ..planning.search import plan_measured
from .blocks import BlockPlanner
from .sequential import SequentialFit, sequential_family


@dataclass(frozen=True)
class Job:
    """One compression, prepared: what every pipeline is given (compress.prepare makes it)."""

    source: Any  # a path, or a model in memory
    ckpt: Any  # the open checkpoint
    stacks: list
    config: CompressConfig  # as resolved: a size target's rank, shared bases on or off
    out: Path
    device: torch.device
    read: Callable[[str], torch.Tensor]  # a weight as planned and fitted (aligned, on the device)
    aligned: dict
    calib: Any  # calibration data, or None
    tokenizer: Any
    config_dir: Any
    progress: bool
    planned: bool  # the plan is chosen by measurement
    fixed: Plan | None  # the plan that needs none, where nothing is measured
    target: dict | None  # the byte budget a size target sets (compress._target)
    budgets: dict | None  # per family, under --quantize auto
    passthrough: tuple = ()  # (key, dtype, shape) of the pass-through matrices the plan weighs (planning/passthrough.py)

    @property
    def stack_budget(self) -> int | None:
        return self.target["stack_budget_bytes"] if self.target else None


@dataclass
class Calibrated:
    """What calibration gave a pipeline: the original model and its samples, the Grams of the
    original's layer inputs where they were collected at once, and the output meter plans are
    measured by."""

    model: Any = None
    preprocessor: Any = None
    samples: list = field(default_factory=list)
    held: list = field(default_factory=list)
    by_layer: dict | None = None  # weights left to load a layer at a time (models.load_by_layer)
    packed: str | None = None
    grams: Any = None
    meter: OutputMeter | None = None

    def whitener(self) -> Callable:
        return self.grams.whitener if self.grams is not None else (lambda key: None)


class Pipeline:
    """A way to calibrate, plan and fit. ``plan`` returns the plan and, where the pipeline fits some
    layers as the writer goes, the fit (SequentialFit or BlockPlanner, run by compress._write)."""

    name: ClassVar[str]

    def calibrate(self, job: Job) -> Calibrated:
        return Calibrated()

    def plan(self, job: Job, cal: Calibrated, spooling: ExitStack) -> tuple[Plan, Any, tuple | None]:
        """(plan, the fit the writer drives or None, (spool, fits) of tensors fitted already or None)."""
        plan = job.fixed or plan_measured(job.stacks, job.config, job.read, cal.whitener(), cal.meter, job.budgets,
                                          job.stack_budget, job.passthrough)
        return plan, None, None


PIPELINES: dict[str, Pipeline] = {}


def register(cls: type[Pipeline]) -> type[Pipeline]:
    PIPELINES[cls.name] = cls()
    return cls


def choose(job: Job) -> tuple[Pipeline, str | None]:
    """The pipeline for this job, and a note that says why where the machine decided."""
    config = job.config
    if job.calib is None:
        return PIPELINES["data-free"], None
    if not config.sequential:
        return PIPELINES["whole-model"], None
    if job.planned and config.quantize != "auto":  # --quantize auto always plans on the model
        by_blocks, note = _by_blocks(job)
        return PIPELINES["blocks" if by_blocks else "sequential"], note
    return PIPELINES["sequential"], None


def _by_blocks(job: Job) -> tuple[bool, str]:
    """Whether to plan by blocks, and a note that says why. ``auto`` plans on the model where the
    model and every Gram (each family's own, at ``gram_dtype``: an upper bound, as q, k and v share
    one; none when ``gram_dir`` keeps them on disk) take at most half the device's memory."""
    config = job.config
    if config.planning != "auto":
        return config.planning == "blocks", f"planned {'by blocks of layers' if config.planning == 'blocks' else 'on the model'}"
    itemsize = 0 if config.calibration.gram_dir else 8 if config.calibration.gram_dtype == "fp64" else 4
    grams = sum(len(f.layers) * f.shape[1] ** 2 * itemsize for s in job.stacks for f in s.families)
    need, have = job.ckpt.nbytes + grams, device_memory(job.device)
    gib = lambda n: f"{n / 2**30:.3g} GiB"  # noqa: E731
    if 2 * need <= have:
        return False, f"planned on the model: it and its Grams ({gib(need)}) take at most half of {job.device}'s {gib(have)}"
    return True, f"planned by blocks of layers: the model and its Grams ({gib(need)}) are more than half of {job.device}'s {gib(have)}"


def calibrated(job: Job, one_at_a_time: bool, on_model: bool, grams: bool) -> Calibrated:
    """The original model and samples; with ``grams`` every layer's Gram of the original at once;
    ``on_model``: plans measured on the whole model's outputs (a causal LM's with its head) on
    the held-back samples. ``one_at_a_time``: the stack's weights are loaded a layer at a time by
    the sequential fit, not with the model."""
    config = job.config
    keys = {f.key(layer) for f in job.stacks[0].families for layer in f.layers} if one_at_a_time else set()
    # samples are held back only to measure a plan: a fixed one (GPTQ alone, a rank given) uses them all
    calib = config.calibration if job.planned else replace(config.calibration, holdout=0, holdout_data=None)
    model, preprocessor, samples, held, by_layer, lm = load_original(
        job.source, job.config_dir, job.calib, job.tokenizer, calib, job.ckpt, job.aligned, job.device,
        keys, with_head=on_model and config.calibration.measure in ("auto", "logits"))
    cal = Calibrated(model, preprocessor, samples, held, by_layer,
                     packing(preprocessor, config.calibration, head_of(model.config) == "causal-lm"))
    if grams:
        keys = [f.key(layer) for s in job.stacks for f in s.families for layer in f.layers]
        cal.grams = calibrate(model, preprocessor, samples, keys, config.calibration, job.progress, job.ckpt.read)
        if on_model and held:
            measure = measure_of(config.calibration.measure, model, lm)
            cal.meter = OutputMeter(lm if measure == "logits" else model, preprocessor, held,
                                    config.calibration.max_length, job.ckpt.read, measure=measure)
    return cal


class Reuse:
    """Calibration made once for several compressions of one source with one calibration (a sweep, a
    search for the smallest file within a drop): the original model, its samples, the Grams of its
    layers and the meter's reference outputs. A pipeline's calibration is kept by what it depends
    on (the pipeline, whether a plan is measured, whether the fixed plan needs Grams at once); the
    model's weights are put back before each reuse, since the sequential fit runs the compressed
    layers through it. ``calibrations`` counts the ones made."""

    def __init__(self):
        self.made: dict = {}
        self.calibrations = 0

    def calibrate(self, pipeline: Pipeline, job: Job) -> Calibrated:
        at_once = job.fixed is not None and not all(sequential_family(fp) for fp in job.fixed.families)
        key = (pipeline.name, job.planned, at_once)
        if key not in self.made:
            cal = pipeline.calibrate(job)
            models = [m for m in (cal.model, getattr(cal.meter, "model", None)) if m is not None]
            self.made[key] = cal, [(p, p.data) for m in models for p in m.parameters()]
            self.calibrations += 1
        cal, weights = self.made[key]
        for p, data in weights:
            p.data = data
        return cal


def _onload(job: Job, cal: Calibrated):
    return (job.read, cal.by_layer) if cal.by_layer is not None else None


@register
class DataFree(Pipeline):
    name = "data-free"


@register
class WholeModel(Pipeline):
    name = "whole-model"

    def calibrate(self, job: Job) -> Calibrated:
        return calibrated(job, one_at_a_time=False, on_model=job.planned, grams=True)


@register
class Sequential(Pipeline):
    name = "sequential"

    def calibrate(self, job: Job) -> Calibrated:
        # families that need the original model's Grams (a shared basis, a whitened mean) are fitted
        # at once from them; a plan chosen by measurement is chosen on the whole model and its Grams
        at_once = job.fixed is not None and not all(sequential_family(fp) for fp in job.fixed.families)
        one_at_a_time = not job.planned and not at_once and len(job.stacks) == 1
        return calibrated(job, one_at_a_time, on_model=job.planned, grams=job.planned or at_once)

    def plan(self, job: Job, cal: Calibrated, spooling: ExitStack):
        plan, _, _ = super().plan(job, cal, spooling)
        fit = SequentialFit(cal.model, cal.preprocessor, cal.samples, plan, job.config, job.ckpt.read,
                            onload=_onload(job, cal), bases=(job.read, cal.grams.whitener) if cal.grams else None)
        return plan, fit, None


@register
class Blocks(Pipeline):
    name = "blocks"

    def calibrate(self, job: Job) -> Calibrated:
        return calibrated(job, one_at_a_time=len(job.stacks) == 1, on_model=False, grams=False)

    def plan(self, job: Job, cal: Calibrated, spooling: ExitStack):
        # the plan is whole only after the last block: the fitted tensors wait on disk
        fit = BlockPlanner(cal.model, cal.preprocessor, cal.samples, cal.held, job.stacks, job.config, job.ckpt.read,
                           job.read, _onload(job, cal), job.stack_budget)
        spool = spooling.enter_context(Spool(job.out))
        spooled = spool, list(fit.run(spool.write, job.progress))
        return fit.plan, fit, spooled
