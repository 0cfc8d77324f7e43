"""``vlora-export``: a VLoRA file in a format other engines load (export/, docs/export.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import JsonFlag, _app, _run, stdout

export_app = _app("Export a VLoRA file to a format other engines load: compressed-tensors, gptq, gguf or transformers-remote.")


@export_app.command()
def export_cmd(
    path: Annotated[Path, typer.Argument(help="A VLoRA file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The output folder (written beside its name, then renamed into place).")],
    format: Annotated[str, typer.Option("--format", "-f", help="compressed-tensors (transformers, vLLM), gptq (gptqmodel, vLLM), gguf (llama.cpp): the integer forms exactly, increments over a quantized base as a LoRA adapter beside them; transformers-remote: every form, the file beside a trust_remote_code modeling file.")],
    config_dir: Annotated[Optional[Path], typer.Option("--config", help="The original model's folder (config.json, tokenizer), if not beside the file.")] = None,
    pre_tokenizer: Annotated[Optional[str], typer.Option("--gguf-pre", help="gguf: llama.cpp's pre-tokenizer name for the model's tokenizer (e.g. smollm, llama-bpe).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output folder.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Write the file in a standard format, exactly, or say which families it cannot hold (exit 2)."""
    from ..export import export

    report = export(path, out, format, config_dir=config_dir, force=force, pre_tokenizer=pre_tokenizer)
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    stdout.print(f"wrote {out} as {format}: {report.layers} integer layers, {report.float_layers} float, "
                 f"{report.adapter_layers} with a LoRA increment; {report.nbytes:,} bytes")
    for note in report.notes:
        stdout.print(f"  {note}")


def export_main(argv: list[str] | None = None) -> None:
    sys.exit(_run(export_app, "vlora-export", argv))
