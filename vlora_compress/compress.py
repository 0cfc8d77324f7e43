"""The pipeline: read checkpoint -> find layer stacks -> plan -> factorise -> write -> report."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .align import align_stack, detect_layout, read_config
from .calibrate import CalibConfig, Grams, OutputMeter, calibrate, read_calibration
from .checkpoint import ITEMSIZE, VLORA_SUFFIX, Checkpoint, open_checkpoint
from .errors import Interrupted, VloraError
from .evaluate import EvalConfig, default_task, evaluate
from .factorise import LayerFit, fit_family
from .fileformat import SourceInfo, factorised_keys, header_metadata, layout
from .models import config_folder, load_model, load_preprocessor, resolve_device, set_tensors
from .config import CompressConfig, parse_size
from .plan import Plan, plan_equal, quantized_passthrough
from .planner import plan_measured, rank_for_budget, share_budget
from .quantize import SCALE_SUFFIX
from .quantize import nbytes as quantized_nbytes
from .quantize import quantize as to_integers
from .progress import Progress
from .report import CompressReport
from .sequential import SequentialFit
from .stacks import find_stacks
from .write import SafetensorsWriter, check_output

if TYPE_CHECKING:
    from .heal import HealConfig


def compress(
    source: str | Path,
    out: str | Path | None = None,
    config: CompressConfig | None = None,
    *,
    calib: str | Path | None = None,
    config_dir: str | Path | None = None,
    eval_data: str | Path | None = None,
    eval_config: EvalConfig | None = None,
    distill: str | Path | None = None,
    heal_config: HealConfig | None = None,
    force: bool = False,
    progress: bool = False,
    **options,
) -> CompressReport:
    """Compress a checkpoint into one VLoRA file and report its size and reconstruction error.

    ``source`` is a .safetensors file, a sharded ``*.safetensors.index.json`` or a model folder;
    ``out`` defaults to ``<source stem>.vlora.safetensors`` beside it. ``config`` holds every option
    (config.CompressConfig; ``options`` are its fields as keywords, applied over it): the method,
    plan, target size, storage and how calibration is read. ``calib`` (a text or image file)
    whitens every factorisation with input Grams from the original model, found through
    ``config_dir`` (default: the source's folder). ``distill`` (a text file) heals the written file
    by distillation from the original (``heal_config``). ``eval_data`` scores the final file against
    the original.
    """
    config = asked = replace(config or CompressConfig(), **options)  # the file records what was asked
    started = time.perf_counter()
    with open_checkpoint(source) as ckpt:
        if ckpt.is_vlora:
            raise VloraError(f"{ckpt.source}: is already a VLoRA file; expand it first")
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
        target = budgets = None
        if config.target_size is not None:
            target = _target(ckpt, stacks, config)
            if config.quantize == "auto":
                budgets = share_budget(stacks, target["stack_budget_bytes"])
            else:
                config = replace(config, rank=target["rank"])
        device = resolve_device(config.device)
        read = ckpt.read if device.type == "cpu" else (lambda key: ckpt.read(key).to(device))
        aligned, align_notes = {}, []
        if config.align:
            aligned, align_notes = _align(stacks, read, config_dir or source)
            unaligned = read
            read = lambda key: aligned[key] if key in aligned else unaligned(key)  # noqa: E731
        grams = meter = model = None
        planned = _needs_search(config) or (calib is not None and config.ranks == "measured")
        if calib is not None:
            model, preprocessor, samples, held = _calibration_model(source, config_dir, calib, config.calibration,
                                                                    ckpt.read, aligned, device)
            if planned or not config.sequential:  # the original model's Grams: to plan by, or to fit by
                keys = [f.key(layer) for s in stacks for f in s.families for layer in f.layers]
                grams = calibrate(model, preprocessor, samples, keys, config.calibration, progress, ckpt.read)
                meter = OutputMeter(model, preprocessor, held, config.calibration.max_length, ckpt.read) if held else None
        whitener = grams.whitener if grams is not None else (lambda key: None)
        plan = plan_measured(stacks, config, read, whitener, meter, budgets) if planned else plan_equal(stacks, config)
        record = source_info(ckpt)
        plan = replace(plan, aligned=bool(aligned), notes=tuple(align_notes) + plan.notes,
                       passthrough=quantized_passthrough(record.tensors, factorised_keys(plan), config))
        entries = layout(plan, record)
        sequential = None
        if calib is not None and config.sequential:
            sequential = SequentialFit(model, preprocessor, samples, plan, config, ckpt.read)
        fits = _write(read, plan, config, record, entries, out, grams, progress, asked, sequential)
        report = CompressReport.build(
            output=out, source_path=ckpt.source, source=record, entries=entries, plan=plan, config=config,
            fits=fits, file_bytes=out.stat().st_size, seconds=time.perf_counter() - started,
            target=target, calibration=_calibration_summary(grams, sequential, calib, config.calibration, plan),
        )
    if distill is not None:
        report = replace(report, healing=_heal_in_place(out, config_folder(config_dir or source), distill,
                                                        heal_config, progress, eval_data, eval_config))
    if eval_data is not None:
        cfg = eval_config or EvalConfig(task=default_task(config_dir or source), device=config.device)
        result = evaluate(out, eval_data, cfg, reference=config_folder(config_dir or source),
                          config_dir=config_dir or config_folder(source), progress=progress)
        report = replace(report, evaluation=result.to_dict())
    return report


def _heal_in_place(out: Path, teacher: Path, data, heal_config, progress: bool, eval_data, eval_config) -> dict:
    """Distil the teacher into the file just written, then put the healed file in its place.

    With eval data, healing scores before and after on it (``healing.before``/``after``)."""
    from .heal import HealConfig, heal, state_path  # torch.distributed and friends only when healing

    heal_config = heal_config or HealConfig()
    if eval_data is not None and eval_config is not None and eval_config.samples:
        heal_config = replace(heal_config, eval_samples=eval_config.samples)
    healed = out.with_name(out.name + ".healing")
    try:
        result = heal(out, teacher, data, healed, heal_config, force=True, progress=progress, eval_data=eval_data)
    except BaseException as e:
        healed.unlink(missing_ok=True)
        state_path(healed).unlink(missing_ok=True)
        if isinstance(e, Interrupted):
            raise Interrupted(f"interrupted while healing: {out} is compressed but not healed; "
                              "heal it with vlora-compress heal") from None
        raise
    os.replace(healed, out)
    return {"data": str(data), **result.to_dict(), "output": str(out)}


def _target(ckpt, stacks, config: CompressConfig) -> dict:
    target_size, target_of = config.target_size, config.target_of
    kind, value = parse_size(target_size)
    stack_bytes = sum(f.nbytes for s in stacks for f in s.families)
    whole = ckpt.nbytes if target_of == "model" else stack_bytes
    budget = int(value * whole) if kind == "fraction" else int(value)
    stack_budget = budget - _rest_bytes(ckpt, stacks, config) if target_of == "model" else budget
    if config.quantize == "auto":  # the planner shares the budget out; no one rank is chosen here
        if stack_budget < 1:
            raise VloraError(f"the target leaves {max(stack_budget, 0):,} bytes for the layer stacks")
        rank = None
    else:
        rank = rank_for_budget(stacks, config, stack_budget)
    return {"size": str(target_size), "of": target_of, "budget_bytes": budget, "stack_budget_bytes": stack_budget,
            "rank": rank}


def _rest_bytes(ckpt, stacks, config: CompressConfig) -> int:
    """Stored bytes of everything outside the stacks' families: pass-through tensors, some quantized."""
    tensors = [(i.key, i.dtype, i.shape) for i in ckpt.infos.values()]
    factorised = {f.key(layer) for s in stacks for f in s.families for layer in f.layers}
    quantized = {q.key: q for q in quantized_passthrough(tensors, factorised, config)}
    total = 0
    for key, dt, shape in tensors:
        if key in quantized:
            total += quantized_nbytes(shape, quantized[key].quant, quantized[key].group_size)
        elif key not in factorised:
            total += ITEMSIZE[dt] * math.prod(shape)
    return total


def _needs_search(config: CompressConfig) -> bool:
    """Whether the plan needs the weights: a form to choose, chunk bounds to place or a base to pick."""
    base = "none" if config.method == "svd" else config.base
    if config.quantize == "auto":
        return True
    if base == "none":
        return False
    if "auto" in (base, config.topology) or config.chunks is None or base in ("mean", "best"):
        return True
    return config.bounds == "dp" and config.chunks > 1


def _align(stacks, read, config_source) -> tuple[dict, list[str]]:
    """Aligned weights of every stack whose architecture is known, and a note for each stack."""
    try:
        config = read_config(config_folder(config_source))
    except VloraError:
        config = None
    aligned, notes = {}, []
    for stack in stacks:
        layout, note = detect_layout(stack, config)
        if layout is not None:
            aligned.update(align_stack(stack, layout, read))
        notes.append(("" if layout is not None else "not aligned: ") + note)
    return aligned, notes


def _calibration_model(source, config_dir, calib, calib_config: CalibConfig, read, aligned, device):
    """(model, preprocessor, samples for the Grams, held-back samples) of the original model.

    With aligned weights the model runs aligned too: the same function, but the inputs of the
    output projections arrive permuted and rotated as the aligned weights expect them.
    """
    folder = config_folder(config_dir or source)
    model = load_model(Path(source) if config_dir is None else source, folder if config_dir else None, "base")
    model.to(device)
    if aligned:
        set_tensors(model, aligned, read)
    preprocessor = load_preprocessor(folder)
    samples, held = read_calibration(preprocessor, calib, calib_config)
    return model, preprocessor, samples, held


def _calibration_summary(grams: Grams | None, sequential: SequentialFit | None, calib, calib_config: CalibConfig,
                         plan: Plan) -> dict | None:
    if grams is None and sequential is None:
        return None
    keys = [fp.key(layer) for fp in plan.families for layer in fp.layers]
    fitted = set(sequential.fitted) if sequential is not None else set()
    whitened = {k for k in keys if k in fitted or (grams is not None and k in grams)}
    return {
        "data": str(calib),
        "samples": sequential.samples if sequential is not None else grams.samples,
        "tokens": sequential.tokens if sequential is not None else grams.tokens,
        "damping": calib_config.damping,
        "gram_bytes": max(grams.nbytes if grams is not None else 0, sequential.gram_bytes if sequential else 0),
        "holdout_samples": calib_config.holdout,
        "sequential_layers": len(fitted),
        "feedback": sequential.feedback if sequential is not None else None,
        "whitened_layers": len(whitened),
        "data_free_layers": [k for k in keys if k not in whitened],
    }


def default_output(source: Path) -> Path:
    if source.is_dir():
        return source.parent / (source.name + VLORA_SUFFIX)
    stem = source.name.split(".safetensors")[0]
    return source.parent / (stem + VLORA_SUFFIX)


def source_info(ckpt: Checkpoint) -> SourceInfo:
    return SourceInfo(
        files=tuple(f.name for f in ckpt.files),
        sha256=ckpt.sha256(),
        nbytes=ckpt.nbytes,
        metadata=ckpt.metadata,
        tensors=tuple((i.key, i.dtype, i.shape) for i in ckpt.infos.values()),
    )


def _write(read, plan: Plan, config: CompressConfig, source: SourceInfo, entries, out: Path, grams, progress: bool,
           asked: CompressConfig, sequential: SequentialFit | None = None):
    fits: list[LayerFit] = []
    with SafetensorsWriter(out, entries, header_metadata(plan, source, asked.to_dict())) as writer:
        if sequential is not None:  # layer by layer, writing each tensor at its place as it is made
            fits += sequential.run(writer.write, progress)
        _write_rest(read, plan, config, source, writer, grams, progress, fits)
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
