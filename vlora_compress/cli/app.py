"""Command-line entry points: a thin Typer layer over the Python API.

Tables and progress go to stderr-safe rich output; ``--json`` puts one JSON object on stdout and
nothing else there. Exit codes: 0 ok, 1 a check failed, 2 bad input or usage (one line, no traceback).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..config import CalibConfig, CompressConfig, parse_size
from ..run import run
from ..sweep import sweep as sweep_curve
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
from ..heal.config import TRAINABLE, HealConfig
from ..report.compress_report import healing_line, markdown_heal, write_report
from .options import CALIB_GROUP, COMPRESS_GROUPS, HEAL_GROUP, config_values, flags_for_fields, with_fields

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

# help panels of hand-written options (the config's fields have theirs: cli/options.py); --calib joins its part's
CALIBRATION, EVALUATION, HEALING = CALIB_GROUP.title, "Evaluation (--eval)", "Healing (--distill)"


@compress_app.command("compress")
@with_fields(*COMPRESS_GROUPS)
def compress_cmd(
    source: Annotated[Path, typer.Argument(help="A .safetensors file, a *.safetensors.index.json, or a model folder.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file; by default <source name>.vlora.safetensors beside the source.")] = None,
    config_dir: Annotated[Optional[Path], typer.Option("--config", help="The original model folder (config.json, tokenizer) when SOURCE is a bare file.")] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration data (.txt or .jsonl text; a folder of images or .npz): whiten every fit by the original model's layer inputs.", rich_help_panel=CALIBRATION)] = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval", help="Evaluate the result against the original on this data (see vlora-eval).", rich_help_panel=EVALUATION)] = None,
    eval_task: Annotated[Optional[str], typer.Option("--eval-task", help="embedding, perplexity, classification or logits; by default from the model's head.", rich_help_panel=EVALUATION)] = None,
    eval_samples: Annotated[Optional[int], typer.Option("--eval-samples", help="Evaluate on the data's first N samples.", rich_help_panel=EVALUATION)] = None,
    compare: Annotated[Optional[str], typer.Option("--compare", help="With --eval: more alternatives to score beside the file, besides int8 and int4 alone and, when calibrated, int4 alone rounded by GPTQ (comma list; svd: whitened per-layer SVD at the file's bytes, one more compress).", rich_help_panel=EVALUATION)] = None,
    no_compare: Annotated[bool, typer.Option("--no-compare", help="With --eval: score the file alone, no alternatives (a CI run that only needs the check).", rich_help_panel=EVALUATION)] = False,
    distill: Annotated[Optional[Path], typer.Option("--distill", help="Heal the result by distillation from the original on this text (see vlora-compress heal).", rich_help_panel=HEALING)] = None,
    steps: Annotated[int, typer.Option("--steps", help="With --distill: optimiser steps.", rich_help_panel=HEALING)] = 150,
    minutes: Annotated[Optional[float], typer.Option("--minutes", help="With --distill: stop healing after this much wall time.", rich_help_panel=HEALING)] = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="The size-quality curve: a file at each of these points (bits a weight over the stacks such as 16,8,4,3,2.5,2; or sizes: 0.5,0.35 of --target-of, 40MB,20MB), planned on one calibration (needs --calib), scored with --eval beside GPTQ int8, int4, int3 and int2 alone; -o is the folder (sweep.json, sweep.md, tradeoff.png).", rich_help_panel="Target (a size instead of --rank)")] = None,
    report_file: ReportFlag = None,
    force: ForceFlag = False,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
    **options,
) -> None:
    """Store each chunk of every layer stack as a dense base plus rank-r increments (W_l = W_l-1 + B_l A_l).

    `vlora-compress heal FILE ...` heals a VLoRA file instead (see `vlora-compress heal --help`); a
    source named `heal` is given as `./heal` or `vlora-compress compress heal`.
    """
    show = not quiet and not as_json
    device = options["device"]
    eval_config = None
    if eval_data is not None:
        extra = tuple(c.strip() for c in compare.split(",") if c.strip()) if compare else ()
        eval_config = EvalConfig(task=eval_task or default_task(config_dir or source), samples=eval_samples,
                                 device=device, compare=() if no_compare else tuple(dict.fromkeys(DEFAULT_COMPARE + extra)))
    parts = {k: v for g in COMPRESS_GROUPS if g is not CALIB_GROUP for k, v in config_values(options, g).items()}
    config = CompressConfig(**parts, calibration=CalibConfig(**config_values(options, CALIB_GROUP)))
    if sweep is not None:
        if distill is not None or config.target_size is not None or config.target_bits is not None or config.max_drop:
            raise VloraError("`sweep` sets the size of every file: it takes no --target-size, --target-bits, --max-drop "
                             "or --distill")
        result = sweep_curve(source, out, sweep, config, calib=calib, eval_data=eval_data, eval_config=eval_config,
                       config_dir=config_dir, force=force, progress=show)
        if report_file is not None:
            write_report(report_file, result.to_dict(), result.to_markdown())
        if as_json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            result.render(stdout)
        return
    report = run(
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
    runtime: Annotated[str, typer.Option("--runtime", help="A VLoRA file: expanded (dense weights, as vlora-expand writes them), packed (factored, integers kept as stored: the model at the file's size) or packed-kernels (the same through torch's int8/int4 weight-only matmuls, bfloat16 activations: faster on CPU at small batches).")] = "expanded",
    report_file: ReportFlag = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Score a model on local data next to its reference: each metric with the drop (+ = worse)."""
    folder = config_dir or (model if model.is_dir() else (reference if reference is not None and reference.is_dir() else model))
    config = EvalConfig(task=task or default_task(folder), batch_size=batch_size, max_length=max_length, samples=samples,
                        quantize=quantize, group_size=group_size, device=device, runtime=runtime)
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
@with_fields(HEAL_GROUP)
def heal_cmd(
    path: Annotated[Path, typer.Argument(help="The VLoRA file to heal.")],
    teacher: Annotated[Path, typer.Option("--teacher", help="The original model folder (config, weights, tokenizer).")],
    data: Annotated[Path, typer.Option("--data", help="Training text: .txt (a sample per line) or .jsonl.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The healed VLoRA file.")],
    eval_data: Annotated[Optional[Path], typer.Option("--eval", help="Held-out data: score before, every --eval-every steps and after; the best step is written, the start included. Without it, the last tenth of the training data is held back and scored.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.state, left by an interrupted run.")] = False,
    losses: Annotated[Optional[list[str]], typer.Option("--loss", help="hidden (per-layer hidden states), cosine (pooled embedding) or kl (logits), as NAME or NAME:WEIGHT; repeat to combine. Default: hidden + cosine for encoders, hidden + kl for models with a head.", rich_help_panel=HEAL_GROUP.title)] = None,
    freeze: Annotated[Optional[str], typer.Option("--freeze", help="Comma-separated: increments, bases, dense.", rich_help_panel=HEAL_GROUP.title)] = None,
    teacher_cache: Annotated[str, typer.Option("--teacher-cache", help="Bound of the teacher's cached outputs, kept in host memory (e.g. 4GiB, 500MB); batches past it rerun the teacher.", rich_help_panel=HEAL_GROUP.title)] = "4GiB",
    force: ForceFlag = False,
    report_file: ReportFlag = None,
    as_json: JsonFlag = False,
    quiet: QuietFlag = False,
    **options,
) -> None:
    """Train the stored bases, increments and 1-D parameters to match the teacher; same plan, same size.

    Causal LMs are first healed layer by layer (--local-steps), then end to end (--steps).

    Under torchrun (python -m vlora_compress.heal ...) every process takes its share of each batch.
    """
    from ..heal.distill import heal

    frozen = {f.strip() for f in freeze.split(",")} if freeze else set()
    if frozen - set(TRAINABLE):
        raise VloraError(f"`freeze` takes some of {', '.join(TRAINABLE)}, not {sorted(frozen - set(TRAINABLE))[0]!r}")
    config = HealConfig(**config_values(options, HEAL_GROUP), losses=tuple(_loss_spec(x) for x in losses or ()),
                        train=tuple(t for t in TRAINABLE if t not in frozen),
                        cache_bytes=int(parse_size(teacher_cache, "teacher_cache", bytes_only=True, zero=True,
                                                   example="4GiB or 500MB")[1]))
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


def _heal_config(steps: int, minutes: float | None, device: str) -> HealConfig:
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

    The library names options by their config fields in backquotes (`rank`, `calibration.samples`);
    here each becomes the flag that sets it (--rank, --calib-samples)."""
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
        print(f"{prog}: {flags_for_fields(command, str(e))}", file=sys.stderr)
        return 130
    except VloraError as e:
        print(f"{prog}: error: {flags_for_fields(command, str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return rv if isinstance(rv, int) else 0


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
