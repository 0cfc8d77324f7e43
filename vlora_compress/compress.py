"""The pipeline: read checkpoint -> find layer stacks -> plan -> factorise -> write -> report."""

from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .fit.align import align_stack, detect_layout, read_config
from .evaluate.alternatives import alternatives, yardstick
from .pipelines.blocks import BlockPlanner
from .calibrate.grams import CalibConfig, Grams, OutputMeter, calibrate, packing, read_calibration, resolve_measure
from .io.checkpoint import ITEMSIZE, VLORA_SUFFIX, Checkpoint, ModelCheckpoint, open_source
from .errors import Interrupted, VloraError
from .evaluate.scoring import EvalConfig, default_task, evaluate
from .fit.factorise import LayerFit, fit_family
from .io.fileformat import SourceInfo, factorised_keys, header_metadata, layout
from .io.models import (config_folder, device_memory, head_of, load_by_layer, load_model, load_preprocessor, model_device,
                     resolve_device, set_tensors)
from .config import CompressConfig, parse_size
from .plan import Plan, quantized_passthrough
from .planning.fixed import plan_equal
from .planning.search import plan_measured, rank_for_budget, share_budget
from .fit.integers import SCALE_SUFFIX
from .fit.integers import nbytes as quantized_nbytes
from .fit.integers import quantize as to_integers
from .progress import Progress
from .report.compress_report import CompressReport
from .pipelines.sequential import SequentialFit, sequential_family
from .io.stacks import find_stacks
from .io.write import SafetensorsWriter, Spool, check_output

if TYPE_CHECKING:
    from .heal.distill import HealConfig


def compress(
    source: str | Path | torch.nn.Module,
    out: str | Path | None = None,
    config: CompressConfig | None = None,
    *,
    calib: str | Path | list | None = None,
    tokenizer=None,
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

    ``source`` is a .safetensors file, a sharded ``*.safetensors.index.json``, a model folder, or a
    model in memory (a ``transformers`` model: the file is the one its saved folder would give, and
    the model is left as it was). ``out`` defaults to ``<source stem>.vlora.safetensors`` beside a
    path. ``config`` holds every option (config.CompressConfig; ``options`` are its fields as
    keywords, applied over it): the method, plan, target size, storage, device and how calibration
    is read. ``calib`` (a text or image file, or a list of samples) whitens every factorisation with
    input Grams from the original model, found through ``config_dir`` (default: the source's
    folder) or, for a model in memory, run with ``tokenizer``. ``distill`` (a text file) heals the
    written file by distillation from the original (``heal_config``). ``eval_data`` scores the final
    file against the original; both need the original's folder.
    """
    config = asked = replace(config or CompressConfig(), **options)  # the file records what was asked
    started = time.perf_counter()
    in_memory = isinstance(source, torch.nn.Module)
    if in_memory and out is None:
        raise VloraError("compressing a model in memory needs `out`, the file to write")
    if in_memory and (distill is not None or eval_data is not None) and config_dir is None:
        raise VloraError("healing or evaluating a model in memory needs its saved folder as `config_dir`")
    with open_source(source) as ckpt, _left_as_found(source if in_memory else None):
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
        if config.target_size is not None or config.target_bits is not None:
            target = _target(ckpt, stacks, config)
            if config.quantize == "auto":
                budgets = share_budget(stacks, target["stack_budget_bytes"])
            else:
                config = replace(config, rank=target["rank"])
        device = _device(config.device, source if in_memory else None)
        read = ckpt.read if device.type == "cpu" else (lambda key: ckpt.read(key).to(device))
        aligned, align_notes = {}, []
        if config.align:
            aligned, align_notes = _align(stacks, read, _model_config(source, config_dir))
            unaligned = read
            read = lambda key: aligned[key] if key in aligned else unaligned(key)  # noqa: E731
        grams = meter = model = by_layer = packed = None
        planned = _needs_search(config) or (calib is not None and config.ranks == "measured" and config.method != "dense")
        # planned block by block as the stream flows (pipelines/blocks.py); --quantize auto plans on the model
        by_blocks, planning_note = (_by_blocks(ckpt, stacks, config, device)
                                    if planned and calib is not None and config.sequential and config.quantize != "auto"
                                    else (False, None))
        fixed = None if planned else plan_equal(stacks, config)  # a plan that needs no measurement
        # families that need the original model's Grams (a shared basis, a whitened mean), outside planning by blocks
        at_once = fixed is not None and not all(sequential_family(fp) for fp in fixed.families)
        if calib is not None:
            # planning on the model, fitting not sequential, or a family fitted at once needs the whole
            # model's Grams and every layer loaded; the sequential fit and planning by blocks load one
            # layer (block) at a time where they can (one stack)
            one_at_a_time = config.sequential and (by_blocks or not planned) and not at_once and len(stacks) == 1
            on_model = planned and not by_blocks  # measured on the whole model's outputs (a causal LM's with its head)
            model, preprocessor, samples, held, by_layer, lm = _calibration_model(
                source, config_dir, calib, tokenizer, config.calibration, ckpt, aligned, device,
                {f.key(layer) for f in stacks[0].families for layer in f.layers} if one_at_a_time else set(),
                with_head=on_model and config.calibration.measure in ("auto", "logits"))
            packed = packing(preprocessor, config.calibration, head_of(model.config) == "causal-lm")
            if on_model or not config.sequential or at_once:  # the original's Grams: to plan or fit by
                keys = [f.key(layer) for s in stacks for f in s.families for layer in f.layers]
                grams = calibrate(model, preprocessor, samples, keys, config.calibration, progress, ckpt.read)
                if on_model and held:
                    measure = _measure(config.calibration.measure, model, lm)
                    meter = OutputMeter(lm if measure == "logits" else model, preprocessor, held,
                                        config.calibration.max_length, ckpt.read, measure=measure)
        auto_shared = config.shared is None and _shares(config, meter)  # auto: tried where next-token KL measures
        config = replace(config, shared=bool(config.shared) or auto_shared)
        onload = (read, by_layer) if by_layer is not None else None
        with ExitStack() as spooling:
            spooled = sequential = None
            if by_blocks:  # the plan is whole only after the last block: the fitted tensors wait on disk
                sequential = BlockPlanner(model, preprocessor, samples, held, stacks, config, ckpt.read, read, onload,
                                          target["stack_budget_bytes"] if target else None)
                spool = spooling.enter_context(Spool(out))
                spooled = spool, list(sequential.run(spool.write, progress))
                plan = sequential.plan
            else:
                whitener = grams.whitener if grams is not None else (lambda key: None)
                plan = fixed or plan_measured(stacks, config, read, whitener, meter, budgets,
                                              target["stack_budget_bytes"] if target else None)
            record = source_info(ckpt)
            notes = (tuple(align_notes) + ((planning_note,) if planning_note else ())
                     + ((SHARING_NOTE,) if auto_shared else ()) + plan.notes)
            plan = replace(plan, aligned=bool(aligned), notes=notes,
                           passthrough=quantized_passthrough(record.tensors, factorised_keys(plan), config))
            entries = layout(plan, record)
            if calib is not None and config.sequential and not by_blocks:
                sequential = SequentialFit(model, preprocessor, samples, plan, config, ckpt.read, onload=onload,
                                           bases=(read, grams.whitener) if grams is not None else None)
            fits = _write(read, plan, config, record, entries, out, grams, progress, asked, sequential, spooled)
        report = CompressReport.build(
            output=out, source_path=ckpt.source, source=record, entries=entries, plan=plan, config=config,
            fits=fits, file_bytes=out.stat().st_size, seconds=time.perf_counter() - started,
            target=target, calibration=_calibration_summary(grams, sequential, calib, config.calibration, plan,
                                                            by_layer is not None, packed, planned),
        )
    if distill is not None:
        report = replace(report, healing=_heal_in_place(out, config_folder(config_dir or source), distill,
                                                        heal_config, progress, eval_data, eval_config))
    if eval_data is not None:
        cfg = eval_config or EvalConfig(task=default_task(config_dir or source), device=config.device)
        folder = config_folder(config_dir or source)
        if cfg.compare:
            svd = lambda nbytes: _svd_alternative(source, out, config, calib, config_dir, tokenizer, nbytes)  # noqa: E731
            scheme = yardstick(report.families, report.stack_compressed_bytes, cfg.group_size)
            gptq = None if calib is None else \
                lambda: _gptq_alternative(source, out, config, calib, config_dir, tokenizer, *scheme)  # noqa: E731
            result, alts = alternatives(out, folder, config_dir or config_folder(source), eval_data, cfg,
                                        report.original_bytes, report.compressed_bytes, svd, progress, gptq, scheme)
            report = replace(report, evaluation=result.to_dict(), alternatives=alts)
        else:
            result = evaluate(out, eval_data, cfg, reference=folder,
                              config_dir=config_dir or config_folder(source), progress=progress)
            report = replace(report, evaluation=result.to_dict())
    return report


def _svd_alternative(source, out: Path, config: CompressConfig, calib, config_dir, tokenizer, nbytes: int):
    """(path, command, tensor bytes) of whitened per-layer SVD with uniform ranks at ``nbytes`` of
    tensors, calibrated as the file was: the report's ``per-layer SVD`` row."""
    quantize = "none" if config.quantize == "auto" else config.quantize
    svd_config = replace(config, method="svd", ranks="uniform", base="auto", chunks=None, align=False,
                         target_size=str(nbytes), target_of="model", target_bits=None, quantize=quantize)
    flags = f"--method svd --ranks uniform --target-size {nbytes}B" + (f" --quantize {quantize}" if quantize != "none" else "")
    return _alternative_file(source, out, "svd", svd_config, calib, config_dir, tokenizer, flags)


def _gptq_alternative(source, out: Path, config: CompressConfig, calib, config_dir, tokenizer, scheme: str,
                      group_size: int):
    """(path, command, tensor bytes) of quantization alone in ``scheme`` with GPTQ rounding on the
    file's calibration: the report's ``int4 alone, GPTQ`` row (alternatives.yardstick)."""
    gptq_config = replace(config, method="dense", quantize=scheme, group_size=group_size, rounding="gptq",
                          target_size=None, target_bits=None, base="auto", chunks=None, align=False, ranks="uniform",
                          quantize_passthrough=False, base_quantize=None)
    flags = f"--method dense --quantize {scheme} --group-size {group_size}"
    return _alternative_file(source, out, "gptq", gptq_config, calib, config_dir, tokenizer, flags)


def _alternative_file(source, out: Path, name: str, config: CompressConfig, calib, config_dir, tokenizer, flags: str):
    """(path, command, tensor bytes) of one more compress of ``source`` beside ``out``, calibrated
    as the file was: an alternatives row that is made, not read from the source."""
    path = out.with_name(out.name + f".{name}-alternative")
    report = compress(source, path, config, calib=calib, config_dir=config_dir, tokenizer=tokenizer, force=True)
    command = (f"vlora-compress {source} {flags}"
               + (f" --calib {calib}" if calib is not None and not isinstance(calib, (list, tuple)) else ""))
    return path, command, report.compressed_bytes


def _heal_in_place(out: Path, teacher: Path, data, heal_config, progress: bool, eval_data, eval_config) -> dict:
    """Distil the teacher into the file just written, then put the healed file in its place.

    With eval data, healing scores before and after on it (``healing.before``/``after``)."""
    from .heal.distill import HealConfig, heal, state_path  # torch.distributed and friends only when healing

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
    if config.method == "dense":
        return False
    if config.quantize == "auto":
        return True
    if base == "none":
        return False
    if "auto" in (base, config.topology) or config.chunks is None or base in ("mean", "best"):
        return True
    return config.bounds == "dp" and config.chunks > 1


def _by_blocks(ckpt, stacks, config: CompressConfig, device: torch.device) -> tuple[bool, str]:
    """Whether to plan by blocks, and a note that says why. ``auto`` plans on the model where the
    model and every Gram (each family's own, at ``gram_dtype``: an upper bound, as q, k and v share
    one; none when ``gram_dir`` keeps them on disk) take at most half the device's memory."""
    if config.planning != "auto":
        return config.planning == "blocks", f"planned {'by blocks of layers' if config.planning == 'blocks' else 'on the model'}"
    itemsize = 0 if config.calibration.gram_dir else 8 if config.calibration.gram_dtype == "fp64" else 4
    grams = sum(len(f.layers) * f.shape[1] ** 2 * itemsize for s in stacks for f in s.families)
    need, have = ckpt.nbytes + grams, device_memory(device)
    gib = lambda n: f"{n / 2**30:.3g} GiB"  # noqa: E731
    if 2 * need <= have:
        return False, f"planned on the model: it and its Grams ({gib(need)}) take at most half of {device}'s {gib(have)}"
    return True, f"planned by blocks of layers: the model and its Grams ({gib(need)}) are more than half of {device}'s {gib(have)}"


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


def _calibration_model(source, config_dir, calib, tokenizer, calib_config: CalibConfig, ckpt, aligned, device,
                       by_layer_keys: set[str], with_head: bool = False):
    """(model, preprocessor, samples for the Grams, held-back samples, weights loaded by layer, the
    model with its language-model head) of the original model.

    A model in memory is used as it is, with ``tokenizer`` (or the preprocessor in ``config_dir``).
    From a path, the weights in ``by_layer_keys`` are not loaded but left to the sequential fit,
    which loads each layer's when it gets there (models.load_by_layer: the model never whole in
    memory); the fifth item maps those keys to their parameters, or is None when the model was
    loaded whole. With aligned weights the model runs aligned too: the same function, but the
    inputs of the output projections arrive permuted and rotated as the aligned weights expect them.
    ``with_head``: a causal LM is loaded whole with its head, the model being its base (the same
    modules), to measure plans by next-token KL; else (and for other models) the last item is None.
    """
    by_layer = lm = None
    if isinstance(source, torch.nn.Module):
        model = getattr(source, "base_model", source)  # the hidden states, as the "base" head gives them
        if with_head and model is not source and source.get_output_embeddings() is not None:
            lm = source
        preprocessor = tokenizer if tokenizer is not None else \
            load_preprocessor(config_dir) if config_dir is not None else None
        if preprocessor is None:
            raise VloraError("calibrating a model in memory needs its `tokenizer` (or image processor)")
    else:
        folder = config_folder(config_dir or source)
        path, cdir = (Path(source), None) if config_dir is None else (source, folder)
        loaded = load_by_layer(path, cdir, "base", ckpt, by_layer_keys, device) if by_layer_keys else None
        if loaded is not None:
            model, by_layer = loaded
        elif with_head and head_of(read_config(folder)) == "causal-lm":
            lm = load_model(path, cdir, "causal-lm").to(device)
            model = lm.base_model
        else:
            model = load_model(path, cdir, "base").to(device)
        preprocessor = tokenizer if tokenizer is not None else load_preprocessor(folder)
    if aligned:  # weights loaded by layer are read aligned when they are loaded
        set_tensors(model, {k: v for k, v in aligned.items() if not (by_layer and k in by_layer)}, ckpt.read)
    samples, held = read_calibration(preprocessor, calib, calib_config, head_of(model.config) == "causal-lm")
    return model, preprocessor, samples, held, by_layer, lm


SHARING_NOTE = "shared bases tried beside every other form (--shared auto: the plan is measured by next-token KL)"


def _shares(config: CompressConfig, meter: OutputMeter | None) -> bool:
    """What ``shared`` auto resolves to: on where the plan is measured on the whole model by a causal
    LM's next-token KL, and `quantize` is not auto (its search with shared bases beside it was never
    measured), with `method` vlora and `topology` auto. There, on SmolLM2-135M, shared bases measured
    15%, 5% and 6% below per-layer SVD at 20%, 35% and 50% removed; measured by pooled embeddings on
    all-MiniLM-L6-v2 they lost end to end (docs/planning.md)."""
    return (meter is not None and meter.measure == "logits" and config.quantize != "auto"
            and config.topology == "auto" and config.method == "vlora")


def _measure(asked: str, model, lm) -> str:
    """What plans are measured by (calibrate.resolve_measure); ``auto`` on a causal LM given without
    its head (a base model in memory) measures its final hidden states."""
    measure = resolve_measure(asked, model.config)
    if measure == "logits" and lm is None:
        if asked == "auto":
            return "hidden"
        raise VloraError("`calibration.measure` logits needs the model with its language-model head")
    return measure


def _calibration_summary(grams: Grams | None, sequential: SequentialFit | None, calib, calib_config: CalibConfig,
                         plan: Plan, by_layer: bool, packed: str | None, planned: bool) -> dict | None:
    if grams is None and sequential is None:
        return None
    keys = [fp.key(layer) for fp in plan.families for layer in fp.layers]
    fitted = set(sequential.fitted) if sequential is not None else set()
    whitened = {k for k in keys if k in fitted or (grams is not None and k in grams)}
    return {
        "data": str(calib) if not isinstance(calib, (list, tuple)) else f"{len(calib)} samples given in memory",
        "model_loaded": "by layer" if by_layer else "whole",
        "packing": f"windows of {calib_config.max_length} tokens" if packed == "windows" else packed,
        "samples": sequential.samples if sequential is not None else grams.samples,
        "tokens": sequential.tokens if sequential is not None else grams.tokens,
        "damping": calib_config.damping,
        "gram_bytes": max(grams.nbytes if grams is not None else 0, sequential.gram_bytes if sequential else 0),
        "holdout_samples": calib_config.holdout,
        "holdout_data": calib_config.holdout_data,  # None: the calibration data's tail
        "sequential_layers": len(fitted),
        "feedback": sequential.feedback if sequential is not None else None,
        "planning": ("blocks" if isinstance(sequential, BlockPlanner) else "model") if planned else None,
        "whitened_layers": len(whitened),
        "data_free_layers": [k for k in keys if k not in whitened],
    }


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
        tensors=tuple((i.key, i.dtype, i.shape) for i in ckpt.infos.values()),
    )


def _write(read, plan: Plan, config: CompressConfig, source: SourceInfo, entries, out: Path, grams, progress: bool,
           asked: CompressConfig, sequential: SequentialFit | None = None,
           spooled: tuple[Spool, list[LayerFit]] | None = None):
    """Write the file: tensors fitted already (``spooled``: the spool and its LayerFits), then what
    the sequential fit makes layer by layer, then everything else; the LayerFits of all."""
    fits: list[LayerFit] = []
    with SafetensorsWriter(out, entries, header_metadata(plan, source, asked.to_dict())) as writer:
        if spooled is not None:
            spool, made = spooled
            for name in spool.index:
                writer.write(name, spool.read(name))
            fits += made
        elif sequential is not None:  # layer by layer, writing each tensor at its place as it is made
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
