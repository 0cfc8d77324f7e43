"""Exports of a VLoRA file to formats other engines load (docs/export.md); each format's module
registers it on import."""

from . import compressed_tensors, gguf, gptq, remote
from .base import EXPORTERS, ExportReport, export

__all__ = ["EXPORTERS", "ExportReport", "export", "compressed_tensors", "gguf", "gptq", "remote"]
