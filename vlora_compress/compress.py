"""The pipeline: read checkpoint -> find layer stacks -> plan -> factorise -> write -> report."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from .checkpoint import VLORA_SUFFIX, Checkpoint, open_checkpoint
from .errors import VloraError
from .factorise import LayerFit, fit_family
from .fileformat import SourceInfo, factorised_keys, header_metadata, layout
from .plan import CompressConfig, Plan, plan_equal
from .progress import Progress
from .report import CompressReport
from .stacks import find_stacks
from .write import SafetensorsWriter, check_output


def compress(
    source: str | Path,
    out: str | Path | None = None,
    *,
    rank: int = 4,
    chunks: int = 1,
    svd: str = "auto",
    dtype: str | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
) -> CompressReport:
    """Compress a checkpoint into one VLoRA file and report its size and reconstruction error.

    ``source`` is a .safetensors file, a sharded ``*.safetensors.index.json`` or a model folder;
    ``out`` defaults to ``<source stem>.vlora.safetensors`` beside it.
    """
    config = CompressConfig(rank=rank, chunks=chunks, svd=svd, dtype=dtype, seed=seed)
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
        plan = plan_equal(stacks, config)
        record = source_info(ckpt)
        entries = layout(plan, record)
        fits = _write(ckpt, plan, config, record, entries, out, progress)
        return CompressReport.build(
            output=out, source_path=ckpt.source, source=record, entries=entries, plan=plan, config=config,
            fits=fits, file_bytes=out.stat().st_size, seconds=time.perf_counter() - started,
        )


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


def _write(ckpt, plan: Plan, config: CompressConfig, source: SourceInfo, entries, out: Path, progress: bool):
    factorised = factorised_keys(plan)
    fits: list[LayerFit] = []
    total = sum(len(fp.layers) for fp in plan.families)
    with SafetensorsWriter(out, entries, header_metadata(plan, source, asdict(config))) as writer, Progress(
        "factorising", total, enabled=progress
    ) as bar:
        for key, _, _ in source.tensors:
            if key not in factorised:
                writer.write(key, ckpt.read(key))
        for fp in plan.families:
            bar.describe(fp.name)
            for item in fit_family(fp, ckpt.read, config):
                if isinstance(item, LayerFit):
                    fits.append(item)
                    bar.advance()
                else:
                    writer.write(*item)
    return fits
