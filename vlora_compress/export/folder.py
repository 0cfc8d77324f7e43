"""An export's output folder: written beside its final name and renamed into place when complete,
so a failed export leaves nothing; the original's config and tokenizer files copied in."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import VloraError

MODEL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
               "preprocessor_config.json")


def check_folder(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise VloraError(f"{out}: is a file; name an output folder")
    if out.exists() and not force:
        raise VloraError(f"{out}: already exists; pass --force to overwrite it")
    parent = out.parent
    if not parent.is_dir():
        raise VloraError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise VloraError(f"{parent}: output folder is not writable")


@contextmanager
def output_folder(out: str | Path, force: bool = False):
    """Yield a temp folder beside ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    check_folder(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_model_files(config_dir: Path, dest: Path, config_update: dict | None = None) -> dict:
    """config.json (with ``config_update`` merged in) and the tokenizer files; returns the config."""
    source = config_dir / "config.json"
    if not source.is_file():
        raise VloraError(f"{config_dir}: has no config.json (pass the original model's folder with --config)")
    config = json.loads(source.read_text())
    config.update(config_update or {})
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in MODEL_FILES:
        if (config_dir / name).is_file():
            shutil.copy2(config_dir / name, dest / name)
    return config
