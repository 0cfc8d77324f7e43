"""Compress: read the checkpoint, find its layer stacks, calibrate, plan, fit, write, report.

``compress`` does that one thing: it prepares the job (the target's budget, the device, aligned
weights), runs the pipeline ``pipelines.registry.choose`` picks, writes the file, and reports.
Healing, evaluation and the alternatives beside it are their own steps (run.py chains them).
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from .calibrate.grams import OutputMeter
from .config import CompressConfig, parse_size
from .errors import VloraError
from .fit.align import align_stack, detect_layout, read_config
from .fit.factorise import LayerFit, fit_family
from .fit.integers import SCALE_SUFFIX, rounding_memo
from .fit.integers import quantize as to_integers
from .io.checkpoint import ITEMSIZE, VLORA_SUFFIX, Checkpoint, ModelCheckpoint, open_source
from .io.fileformat import SourceInfo, factorised_keys, header_metadata, layout
from .io.models import config_folder, model_device, resolve_device
from .io.stacks import find_stacks
from .io.write import SafetensorsWriter, check_output
from .plan import Plan, large_passthrough, matrix_bytes, quantized_passthrough
from .planning import passthrough as weighed_passthrough
from .planning.fixed import plan_equal
from .planning.measure import measure_plan
from .planning.search import plan_measured, rank_for_budget, share_budget
from .planning.space import default_storage, needs_measurement
from .pipelines.registry import Calibrated, Job, Reuse, choose
from .progress import Progress
from .report.compress_report import CompressReport


def compress(
    source: str | Path | torch.nn.Module,
    out: str | Path | None = None,
    config: CompressConfig | None = None,
    *,
    calib: str | Path | list | None = None,
    tokenizer=None,
    config_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = False,
    reuse: Reuse | None = None,
    **options,
) -> CompressReport:
    """Compress a checkpoint into one VLoRA file and report its size and reconstruction error.

    ``source`` is a .safetensors file, a sharded ``*.safetensors.index.json``, a model folder, or a
    model in memory (a ``transformers`` model: the file is the one its saved folder would give, and
    the model is left as it was). ``out`` defaults to ``<source stem>.vlora.safetensors`` beside a
    path. ``config`` holds every option (config.CompressConfig; ``options`` are its fields as
    keywords, applied over it): the method, plan, target size, storage, device and how calibration
    is read. ``calib`` (a text or image file, or a list of samples) whitens every factorisation with
    input Grams from the original model, found through ``config_dir`` (default: the source's
    folder) or, for a model in memory, run with ``tokenizer``. ``reuse`` (pipelines.registry.Reuse)
    keeps the calibration for the next compress of the same source and data (sweep.py). To heal or
    evaluate the file as well, see ``run``.
    """
    config = asked = replace(config or CompressConfig(), **options)  # the file records what was asked
    started = time.perf_counter()
    in_memory = isinstance(source, torch.nn.Module)
    if in_memory and out is None:
        raise VloraError("compressing a model in memory needs `out`, the file to write")
    with open_source(source) as ckpt, _left_as_found(source if in_memory else None):
        if config.max_drop is not None:  # the smallest plan within the drop, planned already
            job, notes, pipeline, cal = smallest_within(source, ckpt, out, config, calib, tokenizer, config_dir,
                                                        force, progress, reuse or Reuse())
        else:
            job, notes = prepare(source, ckpt, out, config, calib, tokenizer, config_dir, force, progress)
            pipeline, note = choose(job)
            cal = reuse.calibrate(pipeline, job) if reuse is not None else pipeline.calibrate(job)
            job, shared_note = _resolve_shared(job, cal)
            notes += tuple(n for n in (note, shared_note) if n)
        asked = replace(asked, quantize=asked.quantize or job.config.quantize)  # the storage that ran
        with ExitStack() as spooling:
            plan, fit, spooled = pipeline.plan(job, cal, spooling)
            record = source_info(ckpt)
            notes += plan.notes
            passthrough = (plan.passthrough if weighed_passthrough.decided(plan, job.passthrough)
                           else quantized_passthrough(record.tensors, factorised_keys(plan), job.config))
            plan = replace(plan, aligned=bool(job.aligned), notes=notes, passthrough=passthrough)
            entries = layout(plan, record)
            fits = _write(job, plan, record, entries, cal, asked, fit, spooled)
        return CompressReport.build(
            output=job.out, source_path=ckpt.source, source=record, entries=entries, plan=plan, config=job.config,
            fits=fits, file_bytes=job.out.stat().st_size, seconds=time.perf_counter() - started, target=job.target,
            calibration=_calibration_summary(job, cal, fit, plan, pipeline.name))


def prepare(source, ckpt, out, config: CompressConfig, calib, tokenizer, config_dir, force: bool,
            progress: bool) -> tuple[Job, tuple[str, ...]]:
    """The job every pipeline is given, and the notes preparing it made (alignment): the output
    checked, the stacks found, a size target's budget (and rank), the device, aligned weights, and
    the plan that needs no measurement where none is asked for."""
    if ckpt.is_vlora:
        raise VloraError(f"{ckpt.source}: is already a VLoRA file; expand it first")
    in_memory = isinstance(source, torch.nn.Module)
    out = Path(out) if out is not None else default_output(Path(source))
    if out.resolve() in {f.resolve() for f in ckpt.files}:
        raise VloraError(f"{out}: is the source checkpoint; choose another output")
    check_output(out, force)
    stacks = find_stacks(ckpt.infos)
    if not stacks:
        raise VloraError(
            f"{ckpt.source}: no repeated layer stack found (need 2-D tensors named like "
            "'layers.N.<name>' in two or more layers)"
        )
    config, note = default_storage(config, calib is not None, stacks)
    weighed = ()
    if weighed_passthrough.weighs(config, calib is not None):  # the budget starts with them in int8
        weighed = tuple(large_passthrough(_tensors(ckpt), _stack_keys(stacks)))
        config = replace(config, quantize_passthrough=bool(weighed))
    target = budgets = None
    if config.target_size is not None or config.target_bits is not None:
        target = _target(ckpt, stacks, config)
        if config.quantize == "auto":
            budgets = share_budget(stacks, target["stack_budget_bytes"])
        else:
            config = replace(config, rank=target["rank"])
    device = _device(config.device, source if in_memory else None)
    read = ckpt.read if device.type == "cpu" else (lambda key: ckpt.read(key).to(device))
    aligned, notes = {}, [note] if note else []
    if config.align:
        aligned, notes = _align(stacks, read, _model_config(source, config_dir))
        unaligned = read
        read = lambda key: aligned[key] if key in aligned else unaligned(key)  # noqa: E731
    planned = needs_measurement(config) or (calib is not None and config.ranks == "measured" and config.method != "dense")
    fixed = None if planned else plan_equal(stacks, config)
    job = Job(source, ckpt, stacks, config, out, device, read, aligned, calib, tokenizer, config_dir, progress,
              planned, fixed, target, budgets, weighed)
    return job, tuple(notes)


MAX_BITS, MIN_BITS, BITS_STEP = 16.0, 2.0, 0.25  # where max_drop's bisection on bits a weight looks, and how finely


def smallest_within(source, ckpt, out, config: CompressConfig, calib, tokenizer, config_dir, force: bool,
                    progress: bool, reuse: Reuse):
    """(job, notes, pipeline, calibration) of the smallest plan whose error, measured with every family
    compressed on the held-back samples (the planner's own measure), is within ``config.max_drop``:
    bisection on bits a weight over the stacks between ``MIN_BITS`` and ``MAX_BITS`` to
    ``BITS_STEP``, every try on one calibration. The job carries the plan (``fixed``) and, in its
    target, every try: the size chosen passes, and the next size tried below it does not (or it is
    ``MIN_BITS``)."""
    if calib is None:
        raise VloraError("`max_drop` is measured on held-back calibration samples: it needs calibration data (--calib)")
    tried: dict[float, tuple] = {}

    def error(bits: float) -> float:
        job, notes = prepare(source, ckpt, out, replace(config, target_bits=bits, max_drop=None), calib, tokenizer,
                             config_dir, force, progress)
        pipeline, note = choose(job)
        cal = reuse.calibrate(pipeline, job) if job.planned and pipeline.name != "blocks" else None
        if cal is None or cal.meter is None:
            raise VloraError("`max_drop` needs a plan measured on the model's held-back samples: the form left to the "
                             "planner, `calibration.holdout` above 0, and `planning` not blocks")
        job, shared_note = _resolve_shared(job, cal)
        plan = plan_measured(job.stacks, job.config, job.read, cal.whitener(), cal.meter, job.budgets, job.stack_budget,
                             job.passthrough)
        err = measure_plan(plan, job.config, job.read, cal.whitener(), cal.meter)
        tried[bits] = (err, replace(job, fixed=plan), notes + tuple(n for n in (note, shared_note) if n), pipeline, cal)
        return err

    bound = config.max_drop
    with rounding_memo():  # GPTQ's integers for a layer made once across the tries
        lo, hi = _bisect(error, bound, tried)
    err, job, notes, pipeline, cal = tried[hi]
    search = {"bound": bound, "measure": cal.meter.name, "bits": hi, "error": err,
              "tried": [{"bits": b, "error": tried[b][0], "within": tried[b][0] <= bound} for b in sorted(tried)]}
    note = (f"max drop {bound:g} ({cal.meter.name}): {hi:g} bits a weight measures {err:.4g}"
            + (f"; {lo:g} bits measured {tried[lo][0]:.4g}" if lo in tried and lo != hi else "")
            + f" ({len(tried)} plans tried on one calibration)")
    return replace(job, target={**job.target, "max_drop": search}), notes + (note,), pipeline, cal


def _bisect(error, bound: float, tried: dict) -> tuple[float, float]:
    """(lo, hi): hi the fewest bits a weight tried that measure within ``bound``, lo the next below it
    tried (which does not, unless it is ``MIN_BITS``)."""
    if error(MAX_BITS) > bound:
        raise VloraError(f"`max_drop` {bound:g}: even {MAX_BITS:g} bits a weight measures {tried[MAX_BITS][0]:.4g} "
                         f"({tried[MAX_BITS][4].meter.name}) on the held-back samples")
    lo, hi = MIN_BITS, MAX_BITS
    if error(lo) <= bound:
        hi = lo
    while hi - lo > BITS_STEP:
        mid = round((lo + hi) / 2 / BITS_STEP) * BITS_STEP
        lo, hi = (lo, mid) if error(mid) <= bound else (mid, hi)
    return lo, hi


SHARING_NOTE = "shared bases tried beside every other form (--shared auto: the plan is measured by next-token KL)"


def _resolve_shared(job: Job, cal: Calibrated) -> tuple[Job, str | None]:
    """The job with ``shared`` auto resolved (shared_auto), and the note that says so where it is on."""
    auto = job.config.shared is None and shared_auto(job.config, cal.meter)
    config = replace(job.config, shared=bool(job.config.shared) or auto)
    return replace(job, config=config), SHARING_NOTE if auto else None


def shared_auto(config: CompressConfig, meter: OutputMeter | None) -> bool:
    """What ``shared`` auto resolves to: on where the plan is measured on the whole model by a causal
    LM's next-token KL, and `quantize` is not auto (its search with shared bases beside it was never
    measured), with `method` vlora and `topology` auto. There, on SmolLM2-135M, shared bases measured
    15%, 5% and 6% below per-layer SVD at 20%, 35% and 50% removed; measured by pooled embeddings on
    all-MiniLM-L6-v2 they lost end to end (docs/planning.md)."""
    return (meter is not None and meter.measure == "logits" and config.quantize != "auto"
            and config.topology == "auto" and config.method == "vlora")


def _target(ckpt, stacks, config: CompressConfig) -> dict:
    """The byte budget a size target sets: ``target_size`` of the model or of the stacks, or
    ``target_bits`` a weight over the stacks' factorised weights; and the rank it allows."""
    stack_bytes = sum(f.nbytes for s in stacks for f in s.families)
    if config.target_bits is not None:
        weights = sum(len(f.layers) * f.shape[0] * f.shape[1] for s in stacks for f in s.families)
        size, target_of = f"{config.target_bits:g} bits a weight", "stack"
        budget = int(config.target_bits * weights / 8)
    else:
        size, target_of = str(config.target_size), config.target_of
        kind, value = parse_size(config.target_size)
        whole = ckpt.nbytes if target_of == "model" else stack_bytes
        budget = int(value * whole) if kind == "fraction" else int(value)
    stack_budget = budget - _rest_bytes(ckpt, stacks, config) if target_of == "model" else budget
    if config.quantize == "auto":  # the planner shares the budget out; no one rank is chosen here
        if stack_budget < 1:
            raise VloraError(f"the target leaves {max(stack_budget, 0):,} bytes for the layer stacks")
        rank = None
    else:
        rank = rank_for_budget(stacks, config, stack_budget)
    return {"size": size, "of": target_of, "budget_bytes": budget, "stack_budget_bytes": stack_budget, "rank": rank}


def _rest_bytes(ckpt, stacks, config: CompressConfig) -> int:
    """Stored bytes of everything outside the stacks' families: pass-through tensors, some quantized."""
    tensors, factorised = _tensors(ckpt), _stack_keys(stacks)
    quantized = {q.key: q for q in quantized_passthrough(tensors, factorised, config)}
    total = 0
    for key, dt, shape in tensors:
        if key in quantized:
            total += matrix_bytes(shape, dt, quantized[key].quant, quantized[key].group_size)
        elif key not in factorised:
            total += ITEMSIZE[dt] * math.prod(shape)
    return total


def _tensors(ckpt) -> list[tuple]:
    """(key, dtype, shape) of every tensor of the checkpoint, in its order."""
    return [(i.key, i.dtype, i.shape) for i in ckpt.infos.values()]


def _stack_keys(stacks) -> set[str]:
    """The checkpoint keys of every layer of the stacks' families."""
    return {f.key(layer) for s in stacks for f in s.families for layer in f.layers}


def _model_config(source, config_dir) -> dict | None:
    """The model's config.json as a dict: a model in memory's own, else the one beside the source."""
    if isinstance(source, torch.nn.Module) and config_dir is None:
        config = getattr(source, "config", None)
        return config.to_dict() if hasattr(config, "to_dict") else None
    try:
        return read_config(config_folder(config_dir or source))
    except VloraError:
        return None


def _device(name: str, model: torch.nn.Module | None) -> torch.device:
    """Where the work runs: ``name`` resolved; a model in memory runs where it is (``auto``), and is
    not moved (another device is an error)."""
    if model is None:
        return resolve_device(name)
    here = model_device(model)
    if name != "auto" and resolve_device(name) != here:
        raise VloraError(f"`device` {name!r}: the model in memory is on {here}; move it there first, or use auto")
    return here


@contextmanager
def _left_as_found(model: torch.nn.Module | None):
    """Whatever the pipeline puts into a model in memory (aligned weights, fitted layers) is undone
    on the way out: each parameter gets its own tensor back (references, not copies)."""
    saved = [(p, p.data) for p in model.parameters()] if model is not None else []
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


def _align(stacks, read, config: dict | None) -> tuple[dict, list[str]]:
    """Aligned weights of every stack whose architecture is known, and a note for each stack."""
    aligned, notes = {}, []
    for stack in stacks:
        layout, note = detect_layout(stack, config)
        if layout is not None:
            aligned.update(align_stack(stack, layout, read))
        notes.append(("" if layout is not None else "not aligned: ") + note)
    return aligned, notes


def default_output(source: Path) -> Path:
    if source.is_dir():
        return source.parent / (source.name + VLORA_SUFFIX)
    stem = source.name.split(".safetensors")[0]
    return source.parent / (stem + VLORA_SUFFIX)


def source_info(ckpt: Checkpoint | ModelCheckpoint) -> SourceInfo:
    return SourceInfo(
        sha256=ckpt.sha256(),
        nbytes=ckpt.nbytes,
        metadata=ckpt.metadata,
        tensors=tuple(_tensors(ckpt)),
    )


def _write(job: Job, plan: Plan, source: SourceInfo, entries, cal: Calibrated, asked: CompressConfig, fit,
           spooled: tuple | None) -> list[LayerFit]:
    """Write the file: tensors fitted already (``spooled``: the spool and its LayerFits), then what
    the sequential fit makes layer by layer, then everything else; the LayerFits of all."""
    fits: list[LayerFit] = []
    with SafetensorsWriter(job.out, entries, header_metadata(plan, source, asked.to_dict())) as writer:
        if spooled is not None:
            spool, made = spooled
            for name in spool.index:
                writer.write(name, spool.read(name))
            fits += made
        elif fit is not None:  # layer by layer, writing each tensor at its place as it is made
            fits += fit.run(writer.write, job.progress)
        _write_rest(job.read, plan, job.config, source, writer, cal.grams, job.progress, fits)
    return fits


def _write_rest(read, plan: Plan, config, source: SourceInfo, writer, grams, progress: bool, fits: list) -> None:
    """Pass-through tensors, and every family the sequential fit did not take, fitted family by family."""
    factorised = factorised_keys(plan)
    done = {fit.key for fit in fits}
    with Progress("factorising", len(factorised) - len(done), enabled=progress) as bar:
        passthrough = {q.key: q for q in plan.passthrough}
        for key, _, _ in source.tensors:
            if key in passthrough:
                q, scale = to_integers(read(key), passthrough[key].quant, passthrough[key].group_size)
                writer.write(key, q)
                writer.write(key + SCALE_SUFFIX, scale)
            elif key not in factorised:
                writer.write(key, read(key))
        for fp in plan.families:
            if fp.key(fp.layers[0]) in done:
                continue
            bar.describe(fp.name)
            whitener = grams.whitener if grams is not None else (lambda key: None)
            for item in fit_family(fp, read, config, whitener):
                if isinstance(item, LayerFit):
                    fits.append(item)
                    bar.advance()
                else:
                    writer.write(*item)


def _calibration_summary(job: Job, cal: Calibrated, fit, plan: Plan, pipeline: str) -> dict | None:
    grams, sequential, calib_config = cal.grams, fit, job.config.calibration
    if grams is None and sequential is None:
        return None
    keys = [fp.key(layer) for fp in plan.families for layer in fp.layers]
    fitted = set(sequential.fitted) if sequential is not None else set()
    whitened = {k for k in keys if k in fitted or (grams is not None and k in grams)}
    return {
        "data": str(job.calib) if not isinstance(job.calib, (list, tuple)) else f"{len(job.calib)} samples given in memory",
        "model_loaded": "by layer" if cal.by_layer is not None else "whole",
        "packing": f"windows of {calib_config.max_length} tokens" if cal.packed == "windows" else cal.packed,
        "samples": sequential.samples if sequential is not None else grams.samples,
        "tokens": sequential.tokens if sequential is not None else grams.tokens,
        "damping": calib_config.damping,
        "gram_bytes": max(grams.nbytes if grams is not None else 0, sequential.gram_bytes if sequential else 0),
        "holdout_samples": len(cal.held or ()),  # none where no plan is measured
        "holdout_data": calib_config.holdout_data if cal.held else None,  # None: the calibration data's tail
        "sequential_layers": len(fitted),
        "feedback": sequential.feedback if sequential is not None else None,
        "planning": ("blocks" if pipeline == "blocks" else "model") if job.planned else None,
        "whitened_layers": len(whitened),
        "data_free_layers": [k for k in keys if k not in whitened],
    }
