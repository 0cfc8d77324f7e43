"""Export a VLoRA file to a format other engines load: the registry, the one entry point, and
what every format shares (the rest of the model as the file stores it, the report).

Each format is one module that registers an ``Exporter``: which of the file's layers it can hold
exactly (``problems``) and how it writes them (``write``). ``export`` refuses, before writing
anything, a file with a family that the format cannot hold, naming each family and why, and
otherwise writes the folder beside its final name and renames it into place. Layers with a
low-rank increment over their base (W = Q + B A) get a PEFT LoRA adapter in ``adapter/``
(export/peft.py), whichever format holds the base.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import VloraError
from ..io.checkpoint import DTYPES
from ..io.fileformat import VloraFile
from .layers import CONV1D_MODELS, Layer, file_layers


@dataclass
class ExportReport:
    format: str
    source: str
    out: str
    layers: int  # Linear layers the format holds as integers
    float_layers: int  # layers written as float weights (stored so in the file)
    adapter_layers: int  # layers whose increment is in adapter/
    files: dict[str, int] = field(default_factory=dict)  # path in the folder -> bytes
    notes: list[str] = field(default_factory=list)  # what was re-expressed, and its cost in bytes
    _seen: dict[str, list] = field(default_factory=dict, repr=False)  # note -> [tensors, extra bytes, first key]

    def note(self, text: str, key: str, extra_bytes: int = 0) -> None:
        """Record that ``key`` was re-expressed as ``text`` says, costing ``extra_bytes`` more."""
        seen = self._seen.setdefault(text, [0, 0, key])
        seen[0] += 1
        seen[1] += extra_bytes
        self.notes = [f"{n} tensor{'s' if n > 1 else ''} ({first}{', ...' if n > 1 else ''}): {what}"
                      + (f" (+{extra:,} bytes)" if extra else "") for what, (n, extra, first) in self._seen.items()]

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["_seen"]
        return d

    @property
    def nbytes(self) -> int:
        return sum(self.files.values())


class Exporter:
    """A format. Subclasses set ``name`` and implement ``write``; ``register`` adds them."""

    name: ClassVar[str]
    adapter: ClassVar[str] = "peft"  # how increments are written: a PEFT folder (gguf: a LoRA GGUF)
    standard: ClassVar[bool] = True  # holds integer Linear weights only (transformers-remote: the file itself)

    def problems(self, layers: list[Layer], config: dict | None) -> dict[str, str]:
        """Layer or family -> why this format cannot hold it exactly (beyond the forms no format
        holds); ``config`` the model's config.json, None to judge the layers alone."""
        return {}

    def write(self, vfile: VloraFile, layers: list[Layer], folder: Path, config_dir: Path,
              report: ExportReport, pre_tokenizer: str | None = None) -> None:
        raise NotImplementedError


EXPORTERS: dict[str, Exporter] = {}


def register(cls: type[Exporter]) -> type[Exporter]:
    EXPORTERS[cls.name] = cls()
    return cls


def export(path: str | Path, out: str | Path, format: str, *, config_dir: str | Path | None = None,
           force: bool = False, pre_tokenizer: str | None = None) -> ExportReport:
    """Write the VLoRA file at ``path`` as ``format`` into the folder ``out``; ``config_dir`` is the
    original's folder (config.json and tokenizer), by default the file's own folder.
    ``pre_tokenizer`` (gguf) names llama.cpp's pre-tokenizer for the model's tokenizer."""
    from .folder import output_folder
    from .peft import write_adapter

    if format not in EXPORTERS:
        raise VloraError(f"`format` must be one of {', '.join(sorted(EXPORTERS))}, not {format!r}")
    path, out = Path(path), Path(out)
    vfile = VloraFile(path)
    config_dir = Path(config_dir) if config_dir is not None else path.parent
    if not (config_dir / "config.json").is_file():
        raise VloraError(f"{config_dir}: has no config.json (pass the original model's folder with --config)")
    config = json.loads((config_dir / "config.json").read_text())
    exporter = EXPORTERS[format]
    layers, problems = file_layers(vfile) if exporter.standard else ([], {})
    if config.get("model_type") in CONV1D_MODELS and any(layer.scheme != "none" for layer in layers):
        problems["model"] = f"{config['model_type']} stores its Linear layers as (in, out), so its integer groups run along outputs"
    problems.update(exporter.problems(layers, config))
    if problems:
        listed = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise VloraError(f"{path}: {format} cannot hold {len(problems)} part(s) of this file exactly: {listed}"
                         " (vlora-inspect lists what each format holds; --format transformers-remote holds every form)")
    report = ExportReport(format, str(path), str(out), sum(layer.scheme != "none" for layer in layers),
                          sum(layer.scheme == "none" for layer in layers), sum(layer.factors is not None for layer in layers))
    with output_folder(out, force) as folder:
        exporter.write(vfile, layers, folder, config_dir, report, pre_tokenizer=pre_tokenizer)
        if report.adapter_layers and exporter.adapter == "peft":
            write_adapter(vfile, layers, folder / "adapter", config, report)
        report.files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return report


def formats_holding(fp) -> list[str]:
    """The export formats that hold family ``fp`` (plan.FamilyPlan) exactly, the model's own type
    aside: what its plan stores decides, so the compress report lists them before anything reads
    the file back."""
    from .layers import family_layers

    layers = family_layers(fp)
    return [name for name, exporter in sorted(EXPORTERS.items())
            if not exporter.standard or (not isinstance(layers, str) and not exporter.problems(layers, None))]


def rest_of_model(vfile: VloraFile, layers: list[Layer], report: ExportReport) -> dict[str, torch.Tensor]:
    """Every source tensor that is not an integer layer, as the source dtype holds it: pass-through
    tensors (a quantized one dequantized, noted), and float layers' weights (their bases)."""
    integer = {layer.key for layer in layers if layer.scheme != "none"}
    floats = {layer.key: layer for layer in layers if layer.scheme == "none"}
    passthrough = {q.key for q in vfile.plan.passthrough}
    out = {}
    for key, dt, _ in vfile.source.tensors:
        if key in integer:
            continue
        if key in floats:
            out[key] = vfile.get(floats[key].base).to(DTYPES[dt])
        elif key in vfile.quantized or key in passthrough:
            out[key] = vfile.get(key)
            report.note(f"stored in {vfile.quantized[key].scheme}, written as {dt} floats (no integer table here)", key,
                        out[key].numel() * out[key].element_size() - vfile.checkpoint.infos[key].nbytes
                        - vfile.checkpoint.infos[key + ".scale"].nbytes)
        else:
            out[key] = vfile.checkpoint.read(key)
    return out
