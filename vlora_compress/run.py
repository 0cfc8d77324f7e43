"""The chain the command line runs: compress, then heal the file in place, then score it against the
original beside the alternatives at its size. Each step is its own function; ``run`` is the API's
one call for all three."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .compress import compress
from .config import CompressConfig
from .errors import VloraError
from .evaluate.alternatives import alternatives, gptq_alternative, svd_alternative, yardstick
from .evaluate.scoring import EvalConfig, default_task, evaluate
from .io.models import config_folder
from .report.compress_report import CompressReport


def run(
    source: str | Path | torch.nn.Module,
    out: str | Path | None = None,
    config: CompressConfig | None = None,
    *,
    eval_data: str | Path | None = None,
    eval_config: EvalConfig | None = None,
    distill: str | Path | None = None,
    heal_config=None,
    **compress_args,
) -> CompressReport:
    """``compress(source, out, config, **compress_args)`` (calib, tokenizer, config_dir, force,
    progress, or config fields as keywords), then with ``distill`` (a text file) heal the written
    file by distillation from the original (``heal_config``: heal.config.HealConfig), then with
    ``eval_data`` score the final file against the original, with the alternatives at its size
    (``eval_config.compare``). Healing and evaluating need the original's folder: the source's, or
    ``config_dir`` for a model in memory."""
    calib, tokenizer, config_dir = (compress_args.get(k) for k in ("calib", "tokenizer", "config_dir"))
    progress = compress_args.get("progress", False)
    if isinstance(source, torch.nn.Module) and (distill is not None or eval_data is not None) and config_dir is None:
        raise VloraError("healing or evaluating a model in memory needs its saved folder as `config_dir`")
    report = compress(source, out, config, **compress_args)
    config = report_config(config, {k: v for k, v in compress_args.items() if k not in COMPRESS_ARGS})
    if distill is not None:
        from .heal.in_place import heal_in_place  # torch.distributed and friends only when healing

        report = replace(report, healing=heal_in_place(Path(report.output), config_folder(config_dir or source), distill,
                                                       heal_config, progress, eval_data, eval_config))
    if eval_data is not None:
        report = scored(report, source, config, calib, tokenizer, config_dir, eval_data, eval_config, progress)
    return report


COMPRESS_ARGS = ("calib", "tokenizer", "config_dir", "force", "progress")  # compress's own, not config fields


def report_config(config: CompressConfig | None, options: dict) -> CompressConfig:
    """The config compress was asked for (its fields as keywords applied over it)."""
    return replace(config or CompressConfig(), **options)


def scored(report: CompressReport, source, config: CompressConfig, calib, tokenizer, config_dir, eval_data,
           eval_config: EvalConfig | None, progress: bool) -> CompressReport:
    """The report with the file scored against the original on ``eval_data``, and with
    ``eval_config.compare`` the alternatives at its size beside it (evaluate/alternatives.py)."""
    out = Path(report.output)
    cfg = eval_config or EvalConfig(task=default_task(config_dir or source), device=config.device)
    folder = config_folder(config_dir or source)
    if not cfg.compare:
        result = evaluate(out, eval_data, cfg, reference=folder, config_dir=config_dir or config_folder(source),
                          progress=progress)
        return replace(report, evaluation=result.to_dict())
    svd = lambda nbytes: svd_alternative(source, out, config, calib, config_dir, tokenizer, nbytes)  # noqa: E731
    scheme = yardstick(report.families, report.stack_compressed_bytes, cfg.group_size)
    gptq = None if calib is None else \
        lambda: gptq_alternative(source, out, config, calib, config_dir, tokenizer, *scheme)  # noqa: E731
    result, alts = alternatives(out, folder, config_dir or config_folder(source), eval_data, cfg,
                                report.original_bytes, report.compressed_bytes, svd, progress, gptq, scheme)
    return replace(report, evaluation=result.to_dict(), alternatives=alts)
