"""``--format transformers-remote``: the file as it is, beside a small self-contained modeling file
(``modeling_vlora.py``, transformers' ``trust_remote_code``) that builds the original architecture
and runs every factorised layer from the file's own bases and increments, integers as stored.
Every form goes there (chains, shared bases, float low rank), so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` runs the file at its size
wherever transformers runs, with no import of this package."""

from __future__ import annotations

import shutil
from pathlib import Path

from ...io.fileformat import VloraFile
from ..base import ExportReport, Exporter, register
from ..folder import copy_model_files
from ..layers import Layer

MODELING = Path(__file__).with_name("modeling_vlora.py")
AUTO_MAP = {"AutoModelForCausalLM": "modeling_vlora.VloraForCausalLM", "AutoModel": "modeling_vlora.VloraModel"}


@register
class TransformersRemote(Exporter):
    name = "transformers-remote"
    standard = False  # holds every form: no family is refused

    def write(self, vfile: VloraFile, layers: list[Layer], folder: Path, config_dir: Path,
              report: ExportReport, pre_tokenizer: str | None = None) -> None:
        shutil.copy2(vfile.path, folder / "model.vlora.safetensors")
        shutil.copy2(MODELING, folder / MODELING.name)
        copy_model_files(config_dir, folder, {"auto_map": AUTO_MAP})
        report.layers = sum(len(fp.layers) for fp in vfile.plan.families)
        report.note("every factorised layer runs from the file's own bases and increments (modeling_vlora.py, "
                    "trust_remote_code)", str(vfile.path))
