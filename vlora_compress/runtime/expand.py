"""Expand a VLoRA file back to the dense checkpoint: the exact inverse of compress's layout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import VloraError
from ..fit.factorise import rebuild_family
from ..io.fileformat import VloraFile, factorised_keys
from ..forms.stored import walk
from ..progress import Progress
from ..io.write import SafetensorsWriter, check_output


def expand(path: str | Path) -> dict[str, torch.Tensor]:
    """All dense tensors in memory, keyed and ordered as in the original checkpoint."""
    vfile = VloraFile(path)
    tensors = dict(iter_expanded(vfile))
    return {key: tensors[key] for key, _, _ in vfile.source.tensors}


def expand_to_file(path: str | Path, out: str | Path, *, force: bool = False, progress: bool = False) -> Path:
    """Write the dense checkpoint as one safetensors file, one tensor in memory at a time.

    Keys, shapes, dtypes and the file's ``__metadata__`` are the original's, so a loader that read
    the original reads this.
    """
    out = Path(out)
    check_output(out, force)
    vfile = VloraFile(path)
    if out.resolve() == vfile.path.resolve():
        raise VloraError(f"{out}: is the VLoRA file itself; choose another output")
    order = expand_order(vfile)
    info = vfile.source.by_key()
    entries = [(key, *info[key]) for key in order]
    with SafetensorsWriter(out, entries, vfile.source.metadata or None) as writer, Progress(
        "expanding", len(entries), enabled=progress
    ) as bar:
        for key, tensor in iter_expanded(vfile):
            writer.write(key, tensor)
            bar.advance()
    return out


def expand_order(vfile: VloraFile) -> list[str]:
    """The order iter_expanded yields keys in: pass-through first, then family by family."""
    factorised = factorised_keys(vfile.plan)
    keys = [key for key, _, _ in vfile.source.tensors if key not in factorised]
    for fp in vfile.plan.families:
        keys += [t.key for t in walk(fp) if t.layer is not None]
    return keys


def iter_expanded(vfile: VloraFile) -> Iterator[tuple[str, torch.Tensor]]:
    factorised = factorised_keys(vfile.plan)
    for key, _, _ in vfile.source.tensors:
        if key not in factorised:
            yield key, vfile.get(key)
    for fp in vfile.plan.families:
        yield from rebuild_family(fp, vfile.get)

