"""vlora-compress: post-hoc Vertical LoRA compression of pretrained transformer checkpoints.

The pipeline, one module per stage:
checkpoint (read) -> stacks (find layer stacks) -> plan -> factorise -> write, with fileformat
as the file's specification; expand, inspection and report sit on top. Every option of a
compression is a field of one frozen ``CompressConfig`` (config.py).
"""

from .compress import compress
from .config import CalibConfig, CompressConfig
from .errors import VloraError
from .expand import expand, expand_to_file
from .inspection import delta_spectra, inspect_checkpoint, inspect_source, inspect_vlora
from .plan import Plan
from .report import CompressReport

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
]
