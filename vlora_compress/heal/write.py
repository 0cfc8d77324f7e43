"""The healed file: the teacher checked against the file's plan before healing, and the writer,
which keeps the file's plan and layout and stores the trained tensors in the file's own dtypes."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VloraError
from ..fit.factorise import encode
from ..fit.integers import SCALE_SUFFIX
from ..io.checkpoint import DTYPES
from ..io.fileformat import VloraFile, header_metadata, layout
from ..io.models import module_for_key
from ..io.write import SafetensorsWriter
from ..forms.stored import family_matrices


def check_match(vfile: VloraFile, teacher) -> None:
    for fp in vfile.plan.families:
        key = fp.key(fp.layers[0])
        found = module_for_key(teacher, key)
        w = getattr(found[1], "weight", None) if found else None
        if w is None or tuple(w.shape) != fp.shape:
            raise VloraError(f"{vfile.path}: does not match the teacher: {key} is not a {list(fp.shape)} weight there")


def write_healed(vfile: VloraFile, trained: dict[str, torch.Tensor], out: Path) -> None:
    """The same plan and layout; trained tensors in the stored dtype (quantized where the file is:
    with quantization-aware training, the values the forward trained against), the rest byte for byte."""
    entries = layout(vfile.plan, vfile.source)
    meta = header_metadata(vfile.plan, vfile.source, vfile.config)
    encoded = {}
    for fp in vfile.plan.families:
        for name, _ in family_matrices(fp):
            if name in trained:  # at the file's own scales, which quantization-aware training kept
                scale = vfile.checkpoint.read(name + SCALE_SUFFIX) if fp.quant_of(name) != "none" else None
                encoded.update(encode(fp, name, trained[name].detach().cpu().float(), scale=scale)[0])
    with SafetensorsWriter(out, entries, meta) as writer, torch.no_grad():
        for name, dtype, _ in entries:
            if name in encoded:
                t = encoded[name]
            elif name in trained:
                t = trained[name].detach().cpu()
            else:
                t = vfile.checkpoint.read(name)
            writer.write(name, t.to(DTYPES[dtype]).contiguous())
