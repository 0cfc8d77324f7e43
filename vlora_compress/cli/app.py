"""Command-line entry points: a thin Typer layer over the Python API.

Tables and progress go to stderr-safe rich output; ``--json`` puts one JSON object on stdout and
nothing else there. Exit codes: 0 ok, 1 a check failed, 2 bad input or usage (one line, no traceback).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..config import CalibConfig, CompressConfig
from ..compress import compress
from ..evaluate.scoring import DEFAULT_COMPARE, EvalConfig, default_task, evaluate
from ..errors import Interrupted, VloraError
from ..runtime.expand import expand_to_file
from ..evaluate.check import check, fmt_number, load_budgets, merge, parse_eval_drop
from ..evaluate.scoring import markdown_eval
from ..report.inspection import (
    delta_spectra,
    inspect_source,
    inspect_vlora,
    markdown_inspect,
    markdown_spectra,
    markdown_subspaces,
    render_checkpoint,
    render_spectra,
    render_subspaces,
    render_vlora,
    subspace_sharing,
)
from ..config import parse_size
from ..report.compress_report import healing_line, markdown_heal, write_report

stdout = Console()

# Typer raises click's exceptions, or since 0.26 those of its vendored click: find them by name.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]
ForceFlag = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ReportFlag = Annotated[Optional[Path], typer.Option("--report", help="Also write the report to FILE.json or FILE.md.")]


class DefaultGroup(typer.core.TyperGroup):
    """Sub-commands with a default: the first command runs unless the first argument names another.

    ``vlora-compress SOURCE`` is ``vlora-compress compress SOURCE`` and ``vlora-compress heal ...`` the
    heal command; a source named like a command is given after ``--`` (``vlora-compress -- heal``) or
    with the command named (``vlora-compress compress heal``). ``--help`` shows the default command's.
    """

    def parse_args(self, ctx, args):
        if not args or args[0] not in self.commands:
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)


def _app(help_text: str, group: bool = False) -> typer.Typer:
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=help_text,
                       **({"cls": DefaultGroup} if group else {}))


compress_app = _app("Compress a checkpoint into a VLoRA file, or heal one.", group=True)
expand_app = _app("Expand a VLoRA file back into a dense safetensors checkpoint.")
inspect_app = _app("Show layer stacks, delta spectra and sizes of a checkpoint or a VLoRA file.", group=True)
eval_app = _app("Evaluate a model on local data, side by side with the original.")
heal_app = _app("Heal a VLoRA file by distillation from the original model, keeping its structure and size.")


@compress_app.command("compress")
def compress_cmd(
    source: Annotated[Path, typer.Argument(help="A .safetensors file, a *.safetensors.index.json, or a model folder.")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="Rank of each layer's increment over the layer before it.")] = 4,
    chunks: Annotated[Optional[int], typer.Option("--chunks", "-c", help="Contiguous chunks per stack, each with one base; by default the planner tries 1 to 3 (the budget counts one).")] = None,
    method: Annotated[str, typer.Option("--method", help="vlora (shared bases and increments), svd (every layer its own low-rank factors: the baseline) or dense (every layer whole, as --quantize stores it: quantization alone).")] = "vlora",
    base: Annotated[str, typer.Option("--base", help="first, mean (whitened mean, stored once), best (least residual), none (per-layer SVD) or auto (chosen per family by measured error).")] = "auto",
    topology: Annotated[str, typer.Option("--topology", help="chain (each layer over its neighbour), star (each over the base), shared (no base: one right factor per chunk that every layer's own left factor reads, W_l = B_l A: for nn.Linear the inputs' side), shared-left (one left factor per chunk, W_l = B A_l: the outputs' side) or auto.")] = "auto",
    shared: Annotated[Optional[bool], typer.Option("--shared/--no-shared", help="With --topology auto, also try a basis shared by groups of 2 to 4 layers (either factor; adjacent layers, or grouped by how alike their subspaces are), by measurement like every form. By default on where the plan is measured by a causal LM's next-token KL (calibrated, planned on the model, --quantize not auto), off elsewhere: on SmolLM2-135M it measured 15%, 5% and 6% better than per-layer SVD at 20%, 35% and 50% removed, for about 2.5 times the planning time; on all-MiniLM-L6-v2 it measured worse end to end.")] = None,
    bounds: Annotated[str, typer.Option("--bounds", help="dp (chunk bounds by dynamic programming on the deltas) or equal.")] = "dp",
    ranks: Annotated[str, typer.Option("--ranks", help="measured (move bytes between families by measured output error; needs --calib) or uniform.")] = "measured",
    align: Annotated[bool, typer.Option("--align", help="Align each layer's MLP neurons and attention heads to the layer before it first (same function, smaller deltas).")] = False,
    target_size: Annotated[Optional[str], typer.Option("--target-size", help="Choose the largest uniform rank that fits: a fraction such as 0.35, or a size such as 40MB. Overrides --rank.")] = None,
    target_of: Annotated[str, typer.Option("--target-of", help="What --target-size is a fraction of: model (the whole checkpoint) or stack (the factorised layers).")] = "model",
    target_bits: Annotated[Optional[float], typer.Option("--target-bits", help="Instead of --target-size: a budget of this many bits a weight over the stacks' factorised weights (scales and dense bases included), e.g. 2.5.")] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration data (.txt or .jsonl text; a folder of images or .npz): whiten every fit by the original model's layer inputs.")] = None,
    calibration_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration samples to use (the file's first N lines, or windows).")] = 512,
    calibration_max_length: Annotated[int, typer.Option("--calib-max-length", help="Tokens per calibration sample (a line is cut there; a window is that long).")] = 128,
    calibration_holdout: Annotated[int, typer.Option("--calib-holdout", help="Further samples kept back from the Grams, on which the planner measures every candidate plan (the model's output error).")] = 32,
    holdout_data: Annotated[Optional[Path], typer.Option("--holdout-data", help="Read the --calib-holdout samples from this file (the same kinds as --calib) instead of the calibration data's tail: plans measured on text the calibration did not see.")] = None,
    calibration_measure: Annotated[str, typer.Option("--measure", help="What the planner measures each candidate plan by on the held-back samples: logits (a causal LM's next-token KL from the original, what perplexity feels), embedding (1 - cosine of the pooled embeddings), hidden (the final hidden states' relative error) or auto (logits for a causal LM, embedding for a model without a head, else hidden).")] = "auto",
    calibration_packing: Annotated[str, typer.Option("--calib-packing", help="Text samples: lines (one per line), windows (the text run together, cut every --calib-max-length tokens) or auto (windows for a causal LM, lines otherwise).")] = "auto",
    gram_dtype: Annotated[str, typer.Option("--gram-dtype", help="Store calibration Grams as fp64 or fp32 (half the memory).")] = "fp64",
    gram_dir: Annotated[Optional[Path], typer.Option("--gram-dir", help="Keep calibration Grams in memory-mapped files in this folder instead of RAM.")] = None,
    sequential: Annotated[bool, typer.Option("--sequential/--no-sequential", help="With --calib: collect Grams and fit one layer at a time, one layer's Grams in memory (default); or every Gram from the original model at once.")] = True,
    feedback: Annotated[str, typer.Option("--feedback", help="Sequential: inputs (each layer whitened by what the layers compressed before it feed it; default), none (the original activations throughout) or outputs (and fitted to give the original's outputs from those inputs; needs much calibration data).")] = "inputs",
    planning: Annotated[str, typer.Option("--planning", help="With --calib (sequential), for a plan chosen by measurement: model (every Gram and the whole model's output error), blocks (each stack cut into --chunks blocks, 3 by default, planned on the block's own Grams and output error, fitted and passed on: one block in memory, never the whole model or every Gram), or auto: model where the model and its Grams take at most half the device's memory, else blocks. --quantize auto always plans on the model.")] = "auto",
    config_dir: Annotated[Optional[Path], typer.Option("--config", help="The original model folder (config.json, tokenizer) when SOURCE is a bare file.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval", help="Evaluate the result against the original on this data (see vlora-eval).")] = None,
    eval_task: Annotated[Optional[str], typer.Option("--eval-task", help="embedding, perplexity, classification or logits; by default from the model's head.")] = None,
    eval_samples: Annotated[Optional[int], typer.Option("--eval-samples", help="Evaluate on the data's first N samples.")] = None,
    compare: Annotated[Optional[str], typer.Option("--compare", help="With --eval: more alternatives to score beside the file, besides int8 and int4 alone and, when calibrated, int4 alone rounded by GPTQ (comma list; svd: whitened per-layer SVD at the file's bytes, one more compress).")] = None,
    no_compare: Annotated[bool, typer.Option("--no-compare", help="With --eval: score the file alone, no alternatives (a CI run that only needs the check).")] = False,
    distill: Annotated[Optional[Path], typer.Option("--distill", help="Heal the result by distillation from the original on this text (see vlora-compress heal).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="With --distill: optimiser steps.")] = 150,
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="With --distill: stop healing after this much wall time.")] = None,
    device: Annotated[str, typer.Option("--device", help="Where every stage runs (calibration, whitening, decompositions, alignment, planning, eval and --distill): auto (CUDA when present), cpu, cuda or cuda:N. Weights keep their dtype; only the writer is on the CPU.")] = "auto",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file; by default <source name>.vlora.safetensors beside the source.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Store bases and factors as fp32, fp16 or bf16; by default in the input's dtype.")] = None,
    quantize: Annotated[str, typer.Option("--quantize", help="Store bases and factors as none, int8 (per row), or int4, int3 or int2 (per group of a row, packed 4, 3 or 2 bits a value), or int3-midrise or int2-midrise (the same bits on grids with no zero level that use every code); each increment is fitted against the quantized layer before it. auto: the planner picks per family, by measured error at equal bytes, between more rank in fewer bits and less rank in the store dtype (none, int8, int4), every layer dense in int8 to int2 (quantization alone), and every layer a dense int4, int3-midrise or int2-midrise base under a low-rank int4 increment (W ≈ Q + BA).")] = "none",
    base_quantize: Annotated[Optional[str], typer.Option("--base-quantize", help="Store bases as int8, int4, int3, int2, int3-midrise or int2-midrise apart from their factors (--quantize); under a low-rank increment the mid-rise grids measure better. With --method svd every layer becomes its own base in these integers under a rank-r increment fitted to what the rounding lost (W ≈ Q + BA, CALDERA's form); with vlora, each chunk's base.")] = None,
    group_size: Annotated[int, typer.Option("--group-size", help="int4, int3, int2: values per float16 scale along a row.")] = 128,
    rounding: Annotated[str, typer.Option("--rounding", help="How calibrated layers stored as integers are rounded: gptq (each input column's error spread over the columns not yet rounded, against the calibration Grams) or nearest. Without --calib always nearest.")] = "gptq",
    quantize_passthrough: Annotated[bool, typer.Option("--quantize-passthrough", help="Also store large pass-through matrices (2-D, at least 65,536 values: embeddings, a head) with the --quantize scheme (int8 under auto); expand gives them back in their own dtype.")] = False,
    svd: Annotated[str, typer.Option("--svd", help="auto, exact or randomized. auto: exact SVD up to 1024 on the short side or when rank >= 1/4 of it.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the randomized SVD; the same input and options give the same bytes.")] = 0,
    report_file: ReportFlag = None,
    force: ForceFlag = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Store each chunk of every layer stack as a dense base plus rank-r increments (W_l = W_l-1 + B_l A_l).

    `vlora-compress heal FILE ...` heals a VLoRA file instead (see `vlora-compress heal --help`); a
    source named `heal` is given as `./heal` or `vlora-compress compress heal`.
    """
    show = not quiet and not as_json
    eval_config = None
    if eval_data is not None:
        extra = tuple(c.strip() for c in compare.split(",") if c.strip()) if compare else ()
        eval_config = EvalConfig(task=eval_task or default_task(config_dir or source), samples=eval_samples,
                                 device=device, compare=() if no_compare else tuple(dict.fromkeys(DEFAULT_COMPARE + extra)))
    config = CompressConfig(
        rank=rank, chunks=chunks, method=method, base=base, topology=topology, shared=shared, bounds=bounds, ranks=ranks,
        align=align, target_size=target_size, target_of=target_of, target_bits=target_bits, svd=svd, dtype=dtype, quantize=quantize,
        base_quantize=base_quantize, group_size=group_size, rounding=rounding, quantize_passthrough=quantize_passthrough, seed=seed,
        calibration=CalibConfig(samples=calibration_samples, max_length=calibration_max_length, packing=calibration_packing,
                                gram_dtype=gram_dtype, gram_dir=gram_dir, holdout=calibration_holdout,
                                holdout_data=holdout_data, measure=calibration_measure),
        sequential=sequential, feedback=feedback, planning=planning, device=device,
    )
    report = compress(
        source, out, config, calib=calib, config_dir=config_dir, eval_data=eval_data, eval_config=eval_config,
        distill=distill, heal_config=_heal_config(steps, minutes, device) if distill else None, force=force,
        progress=show,
    )
    if report_file is not None:
        write_report(report_file, report.to_dict(), report.to_markdown())
    if as_json:
        print(report.to_json())
    else:
        report.render(stdout)


@eval_app.command()
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A dense model folder, or a VLoRA (or dense .safetensors) file beside the original's config.")],
    data: Annotated[Path, typer.Option("--data", help="Local data: .txt/.jsonl text, .jsonl sentence pairs with scores, labelled .jsonl/.csv, or an image folder.")],
    task: Annotated[Optional[str], typer.Option("--task", help="embedding, perplexity, classification or logits; by default from the model's head.")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="The original model folder, scored side by side.")] = None,
    config_dir: Annotated[Optional[Path], typer.Option("--config", help="The folder with config.json and tokenizer, if not beside MODEL or in --reference.")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Use the data's first N samples (perplexity: its first N x --max-length tokens).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.")] = 32,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per sample (perplexity: the window).")] = 128,
    quantize: Annotated[str, typer.Option("--quantize", help="The quantization-only baseline: score MODEL (an original) with its layer stacks round-to-nearest int8 (per row), or int4, int3 or int2 (per --group-size values of a row).")] = "none",
    group_size: Annotated[int, typer.Option("--group-size", help="int4: values per scale.")] = 128,
    device: Annotated[str, typer.Option("--device", help="Where the models run: auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
    report_file: ReportFlag = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Score a model on local data next to its reference: each metric with the drop (+ = worse)."""
    folder = config_dir or (model if model.is_dir() else (reference if reference is not None and reference.is_dir() else model))
    config = EvalConfig(task=task or default_task(folder), batch_size=batch_size, max_length=max_length, samples=samples,
                        quantize=quantize, group_size=group_size, device=device)
    result = evaluate(model, data, config, reference=reference, config_dir=config_dir,
                      progress=not quiet and not as_json)
    if report_file is not None:
        write_report(report_file, result.to_dict(), markdown_eval(result.to_dict()))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        result.render(stdout)


@expand_app.command()
def expand_cmd(
    path: Annotated[Path, typer.Argument(help="A VLoRA file.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Dense output; by default <name>.expanded.safetensors beside the VLoRA file.")] = None,
    force: ForceFlag = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Rebuild the dense checkpoint: the original keys, shapes, dtypes and file metadata."""
    if out is None:
        out = path.parent / (path.name.split(".vlora.safetensors")[0].split(".safetensors")[0] + ".expanded.safetensors")
    written = expand_to_file(path, out, force=force, progress=not quiet and not as_json)
    if as_json:
        print(json.dumps({"output": str(written), "file_bytes": written.stat().st_size}))
    else:
        stdout.print(f"wrote {written} ({written.stat().st_size:,} bytes)")


@inspect_app.command("inspect")
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="A checkpoint (file, index or folder) or a VLoRA file.")],
    spectra: Annotated[bool, typer.Option("--spectra", help="Singular-value spectra of every consecutive-layer delta.")] = False,
    rank: Annotated[int, typer.Option("--rank", "-r", help="With --spectra: the rank whose kept energy is shown.")] = 4,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="With --spectra: also draw them to a .png or .svg (needs the plot extra).")] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="With --spectra: whiten the subspace view by the original model's inputs on this data (the energy of the layer's output, not of its weights).")] = None,
    calibration_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration samples to use.")] = 128,
    config_dir: Annotated[Optional[Path], typer.Option("--config", help="The original model folder (config.json, tokenizer) when PATH is a bare file.")] = None,
    report_file: ReportFlag = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Layer stacks, families, shapes and bytes; with --spectra how much a rank-r increment keeps,
    and which layers could share a rank-r basis (how much of each layer's output energy the other
    layers' top-r subspaces keep; whitened with --calib).

    Sub-commands: `vlora-inspect check ...` (budgets for CI) and `vlora-inspect plot ...` (pictures);
    a path named `check` or `plot` is given as `vlora-inspect -- check`.
    """
    if plot is not None and not spectra:
        raise VloraError("`plot` draws the spectra; add `spectra`")
    if calib is not None and not spectra:
        raise VloraError("`calib` whitens the spectra's subspace view; add `spectra`")
    if spectra:
        rows = delta_spectra(path, rank, progress=not quiet and not as_json)
        shared = subspace_sharing(path, rank, calib, config_dir, calibration_samples, progress=not quiet and not as_json)
        if plot is not None:
            from ..report.plots import plot_spectra

            plot_spectra(rows, plot)
        data = {"path": str(path), "rank": rank, "pairs": rows, "subspaces": shared}
        if report_file is not None:
            write_report(report_file, data, markdown_spectra(rows) + "\n" + markdown_subspaces(shared))
        if as_json:
            print(json.dumps(data, indent=2))
        else:
            render_spectra(rows, stdout)
            render_subspaces(shared, stdout)
        return
    info = inspect_source(path)
    if report_file is not None:
        write_report(report_file, info, markdown_inspect(info))
    if as_json:
        print(json.dumps(info, indent=2))
    elif info["kind"] == "vlora":
        render_vlora(info, stdout)
    else:
        render_checkpoint(info, stdout)


@inspect_app.command("check")
def check_cmd(
    subject: Annotated[Path, typer.Argument(help="A VLoRA file (sizes) or a compress report .json (sizes and eval metrics).")],
    max_bytes: Annotated[Optional[str], typer.Option("--max-bytes", help="Largest file size allowed, e.g. 40MB.")] = None,
    max_size_ratio: Annotated[Optional[float], typer.Option("--max-size-ratio", help="Largest compressed / original bytes allowed.")] = None,
    max_params: Annotated[Optional[int], typer.Option("--max-params", help="Most stored parameters allowed.")] = None,
    max_eval_drop: Annotated[Optional[str], typer.Option("--max-eval-drop", help="Largest drop of the eval metrics against the original (report needed): 0.05 for all, or cosine_to_reference=0.05,perplexity=2.")] = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="A report or VLoRA file to compare with.")] = None,
    max_growth: Annotated[Optional[float], typer.Option("--max-growth", help="Allowed file growth against the baseline, as a fraction. File default 0.")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="Allowed drop of any eval metric against the baseline (and --max-drop-vs). File default 0.001.")] = None,
    max_drop_vs: Annotated[Optional[str], typer.Option("--max-drop-vs", help="Fail when the file scores worse than this alternative of its report (int8, int4, gptq, svd or original) by more than --max-drop.")] = None,
    min_heal_gain: Annotated[Optional[float], typer.Option("--min-heal-gain", help="A --distill report: the least relative gain healing must buy on its held-out metric (0.1: perplexity 10% lower than before healing).")] = None,
    budgets_file: Annotated[Optional[Path], typer.Option("--budgets", help="Budgets in a TOML or JSON file; by default [tool.vlora] of ./pyproject.toml if present.")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the verdict as a Markdown table, for a pull request.")] = False,
    report_file: ReportFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Exit 0 when every budget holds, 1 when one is exceeded (each rule with value, budget and difference)."""
    from_file = load_budgets(budgets_file)
    size = None if max_bytes is None else parse_size(max_bytes, "max_bytes", bytes_only=True)[1]
    budgets = merge(from_file, max_bytes=size, max_size_ratio=max_size_ratio,
                    max_params=max_params, max_eval_drop=parse_eval_drop(max_eval_drop),
                    baseline=str(baseline) if baseline else None, max_growth=max_growth, max_drop=max_drop,
                    max_drop_vs=max_drop_vs, min_heal_gain=min_heal_gain)
    verdict = check(subject, budgets)
    if report_file is not None:
        write_report(report_file, verdict.to_dict(), verdict.to_markdown())
    if as_json:
        print(json.dumps(verdict.to_dict(), indent=2))
    elif markdown:
        print(verdict.to_markdown())
    else:
        for r in verdict.rules:
            mark = "[green]ok[/]  " if r.ok else "[red]FAIL[/]"
            stdout.print(f"{mark} {r.rule}: {fmt_number(r.value)} (budget {fmt_number(r.budget)}, "
                         f"difference {r.difference:+.4g})")
        if verdict.healing:
            stdout.print(f"healing: {verdict.healing}")
        stdout.print("[green]all budgets hold[/]" if verdict.ok else "[red]a budget is exceeded[/]")
    raise typer.Exit(0 if verdict.ok else 1)


@inspect_app.command("plot")
def plot_cmd(
    kind: Annotated[str, typer.Argument(help="spectra or subspaces (a checkpoint), bytes (a VLoRA file), ranks or errors (a compress report .json), tradeoff (several reports).")],
    inputs: Annotated[list[Path], typer.Argument(help="What to draw from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The picture: .png or .svg.")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="spectra: the rank to mark; subspaces: the basis rank.")] = 4,
    metric: Annotated[Optional[str], typer.Option("--metric", help="tradeoff: which eval metric (default: the first).")] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="subspaces: whiten by the original model's inputs on this data.")] = None,
    config_dir: Annotated[Optional[Path], typer.Option("--config", help="subspaces: the original model folder when the input is a bare file.")] = None,
) -> None:
    """Pictures where people would rather look than read (needs the plot extra)."""
    from ..report import plots

    if kind not in plots.PLOTS:
        raise VloraError(f"`kind` must be one of {', '.join(plots.PLOTS)}, not {kind!r}")
    if kind != "tradeoff" and len(inputs) != 1:
        raise VloraError(f"{kind} draws one input, not {len(inputs)}")
    if kind == "spectra":
        plots.plot_spectra(delta_spectra(inputs[0], rank), out)
    elif kind == "subspaces":
        plots.plot_subspaces(subspace_sharing(inputs[0], rank, calib, config_dir), out)
    elif kind == "bytes":
        plots.plot_bytes(inspect_vlora(inputs[0]), out)
    else:
        reports = [_report_json(p) for p in inputs]
        if kind == "tradeoff":
            plots.plot_tradeoff(reports, out, metric)
        else:
            getattr(plots, f"plot_{kind}")(reports[0], out)
    stdout.print(f"wrote {out}")


@compress_app.command("heal")
def heal_cmd(
    path: Annotated[Path, typer.Argument(help="The VLoRA file to heal.")],
    teacher: Annotated[Path, typer.Option("--teacher", help="The original model folder (config, weights, tokenizer).")],
    data: Annotated[Path, typer.Option("--data", help="Training text: .txt (a sample per line) or .jsonl.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The healed VLoRA file.")],
    steps: Annotated[int, typer.Option("--steps", help="Optimiser steps: the budget and the length of the learning-rate schedule.")] = 150,
    tokens: Annotated[Optional[int], typer.Option("--tokens", help="Also stop after this many training tokens.")] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="Also stop after this much wall time; the schedule decays over it.")] = None,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate of bases and factors (warm-up, then cosine decay).")] = 3e-4,
    lr_dense: Annotated[Optional[float], typer.Option("--lr-dense", help="Learning rate of the stack's biases and norms (default: --lr).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per step, over all processes.")] = 32,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per sample.")] = 128,
    warmup: Annotated[int, typer.Option("--warmup", help="Steps of linear warm-up.")] = 10,
    losses: Annotated[Optional[list[str]], typer.Option("--loss", help="hidden (per-layer hidden states), cosine (pooled embedding) or kl (logits), as NAME or NAME:WEIGHT; repeat to combine. Default: hidden + cosine for encoders, hidden + kl for models with a head.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature of the kl loss.")] = 2.0,
    freeze: Annotated[Optional[str], typer.Option("--freeze", help="Comma-separated: increments, bases, dense.")] = None,
    cache_teacher: Annotated[bool, typer.Option("--cache-teacher/--no-cache-teacher", help="Keep the teacher's outputs per batch (memory) or rerun it every step (time).")] = True,
    teacher_cache: Annotated[str, typer.Option("--teacher-cache", help="Bound of the teacher's cached outputs, kept in host memory (e.g. 4GiB, 500MB); batches past it rerun the teacher.")] = "4GiB",
    eval_data: Annotated[Optional[Path], typer.Option("--eval", help="Held-out data: score before, every --eval-every steps and after; the best step is written, the start included. Without it, the last tenth of the training data is held back and scored.")] = None,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between evals (0: before and after only).")] = 0,
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="Evaluate on the data's first N samples.")] = 64,
    save_every: Annotated[int, typer.Option("--save-every", help="Steps between saves of the resumable state (OUT.state).")] = 25,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.state, left by an interrupted run.")] = False,
    precision: Annotated[str, typer.Option("--precision", help="bf16: the teacher and frozen tensors in bfloat16, what trains in float32, the maths under bf16 autocast; fp32: all float32; auto: bf16 on CUDA, fp32 elsewhere.")] = "auto",
    parallel: Annotated[str, typer.Option("--parallel", help="Under torchrun: ddp (each process holds student and teacher whole) or fsdp (both sharded layer by layer with fully_shard).")] = "ddp",
    checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute layers in the backward pass: less memory, more time.")] = False,
    quantization_aware: Annotated[bool, typer.Option("--quantization-aware/--no-quantization-aware", help="Quantized files: train through a straight-through quantizer, so the loss is that of the integers written (default), or train in float and round once at the end.")] = True,
    local_steps: Annotated[Optional[int], typer.Option("--local-steps", help="Block-local healing first: each layer of the stack trained, in order, to give the teacher's layer output, this many steps a layer (0: none). Default for causal LMs: 32, or with --minutes as many as --local-share of them allows; 0 otherwise.")] = None,
    local_lr: Annotated[float, typer.Option("--local-lr", help="Adam learning rate of block-local healing (cosine decay over each layer's steps).")] = 3e-4,
    local_batch_size: Annotated[int, typer.Option("--local-batch-size", help="Samples a step of block-local healing, over all processes.")] = 8,
    local_samples: Annotated[int, typer.Option("--local-samples", help="Training samples block-local healing uses (windows of --max-length tokens for a causal LM).")] = 256,
    local_share: Annotated[float, typer.Option("--local-share", help="With --minutes: the share of them block-local healing may take; the end-to-end loop has the rest.")] = 1.0,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed for the order of batches.")] = 0,
    force: ForceFlag = False,
    report_file: ReportFlag = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Train the stored bases, increments and 1-D parameters to match the teacher; same plan, same size.

    Causal LMs are first healed layer by layer (--local-steps), then end to end (--steps).

    Under torchrun (python -m vlora_compress.heal ...) every process takes its share of each batch.
    """
    from ..heal.distill import TRAINABLE, HealConfig, heal

    frozen = {f.strip() for f in freeze.split(",")} if freeze else set()
    if frozen - set(TRAINABLE):
        raise VloraError(f"`freeze` takes some of {', '.join(TRAINABLE)}, not {sorted(frozen - set(TRAINABLE))[0]!r}")
    config = HealConfig(
        steps=steps, tokens=tokens, minutes=minutes, lr=lr, lr_dense=lr_dense, batch_size=batch_size,
        max_length=max_length, warmup=warmup, losses=tuple(_loss_spec(x) for x in losses or ()),
        temperature=temperature, train=tuple(t for t in TRAINABLE if t not in frozen), cache_teacher=cache_teacher,
        cache_bytes=int(parse_size(teacher_cache, "teacher_cache", bytes_only=True, zero=True, example="4GiB or 500MB")[1]),
        eval_every=eval_every, eval_samples=eval_samples, save_every=save_every, precision=precision, parallel=parallel,
        checkpointing=checkpointing, quantization_aware=quantization_aware, local_steps=local_steps,
        local_lr=local_lr, local_batch_size=local_batch_size, local_samples=local_samples, local_share=local_share, seed=seed, device=device,
    )
    result = heal(path, teacher, data, out, config, force=force, progress=not quiet and not as_json,
                  eval_data=eval_data, resume=resume).to_dict()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if report_file is not None:
        write_report(report_file, result, markdown_heal(result))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    stdout.print(f"healed {path} -> {out}: {healing_line(result)}")


def _loss_spec(text: str) -> tuple[str, float]:
    name, _, weight = text.partition(":")
    try:
        return name.strip(), float(weight) if weight else 1.0
    except ValueError:
        raise VloraError(f"`losses` takes NAME or NAME:WEIGHT, not {text!r}") from None


def _heal_config(steps: int, minutes: float | None, device: str):
    from ..heal.distill import HealConfig

    return HealConfig(steps=steps, minutes=minutes, device=device)


def _report_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["tensors"], data["families"]  # noqa: B018 - a compress report has both
    except FileNotFoundError:
        raise VloraError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise VloraError(f"{path}: not a vlora-compress report (.json from --report or --json)") from None
    return data


def _run(app: typer.Typer, prog: str, argv: list[str] | None) -> int:
    """Run a Typer app so that every user mistake is one line on stderr with exit code 2.

    The library names options by their config fields in backquotes (`rank`, `calib.samples`); here
    each becomes the flag that sets it (--rank, --calib-samples)."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        rv = command.main(args=args, prog_name=prog, standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _CLICK_ERROR as e:
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else prog
        print(f"{where}: error: {e.format_message()}{_named_like_a_command(command, args)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"{prog}: {_flags(command, str(e))}", file=sys.stderr)
        return 130
    except VloraError as e:
        print(f"{prog}: error: {_flags(command, str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return rv if isinstance(rv, int) else 0


def _flags(command, message: str) -> str:
    """Each backquoted config field of ``message`` as the command's flag for it.

    ``calib.samples`` is the flag of a parameter named ``calib_samples``, else of one named
    ``samples``; a field no parameter sets keeps its name."""
    params = {}
    for cmd in [command, *getattr(command, "commands", {}).values()]:
        for p in cmd.params:
            flags = [o for o in p.opts if o.startswith("--")]
            params.setdefault(p.name, max(flags, key=len) if flags else p.name.upper())

    def flag(m: re.Match) -> str:
        path = m.group(1)
        for name in (path.replace(".", "_"), path.rpartition(".")[2]):
            if name in params:
                return params[name]
        return path

    return re.sub(r"`([a-z_][a-z0-9_.]*)`", flag, message)


def _named_like_a_command(command, args: list[str]) -> str:
    """A hint when a mistaken sub-command may have been meant as a path (a source named ``heal``)."""
    if args and args[0] in getattr(command, "commands", {}) and Path(args[0]).exists():
        return f" ({args[0]!r} is taken as the {args[0]} command; for the path of that name write ./{args[0]})"
    return ""


heal_app.command()(heal_cmd)  # the same command alone, for torchrun


def compress_main(argv: list[str] | None = None) -> None:
    """``vlora-compress SOURCE ...``, or ``vlora-compress heal VLORA_FILE ...``."""
    sys.exit(_run(compress_app, "vlora-compress", argv))


def heal_main(argv: list[str] | None = None) -> None:
    """``python -m vlora_compress.heal ...``: the heal command alone, for torchrun."""
    sys.exit(_run(heal_app, "vlora_compress.heal", argv))


def expand_main(argv: list[str] | None = None) -> None:
    sys.exit(_run(expand_app, "vlora-expand", argv))


def inspect_main(argv: list[str] | None = None) -> None:
    """``vlora-inspect PATH``, or its sub-commands ``vlora-inspect check ...`` and ``vlora-inspect plot ...``."""
    sys.exit(_run(inspect_app, "vlora-inspect", argv))


def eval_main(argv: list[str] | None = None) -> None:
    sys.exit(_run(eval_app, "vlora-eval", argv))
