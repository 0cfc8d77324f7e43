"""vlora-compress: post-hoc Vertical LoRA compression of pretrained transformer checkpoints.

The package reads in pipeline order, a sub-package per stage: io (read a checkpoint, find its
layer stacks, write the file, whose specification is io/fileformat.py) -> calibrate -> planning ->
fit -> pipelines, joined by compress.py; then runtime (expand, factored), heal, evaluate, report
and cli. Every option of a compression is a field of one frozen ``CompressConfig`` (config.py);
what a file stores is a ``Plan`` (plan.py). docs/architecture.md has the map.
"""

from .compress import compress
from .config import CalibConfig, CompressConfig
from .errors import VloraError
from .runtime.expand import expand, expand_to_file
from .report.inspection import delta_spectra, inspect_checkpoint, inspect_source, inspect_vlora
from .plan import Plan
from .report.compress_report import CompressReport
from .run import run

__version__ = "0.1.0"

__all__ = [
    "CalibConfig",
    "CompressConfig",
    "CompressReport",
    "Plan",
    "VloraError",
    "compress",
    "delta_spectra",
    "expand",
    "expand_to_file",
    "inspect_checkpoint",
    "inspect_source",
    "inspect_vlora",
    "run",
]
