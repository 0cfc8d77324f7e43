"""Every option of a compression, declared once: frozen dataclasses that validate themselves.

The CLI builds a ``CompressConfig`` from its flags, the Python API takes one (or its fields as
keywords), and the VLoRA file records it whole (``vlora.config``), so a file says how it was made.
Errors name the fields in backquotes (`rank`, `calibration.samples`); the CLI turns each into the
flag that sets it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .errors import VloraError
from .fit.integers import SCHEMES, check_scheme

SVD_METHODS = ("auto", "exact", "randomized")
METHODS = ("vlora", "svd", "dense")
BASES = ("auto", "first", "mean", "best", "none")
TOPOLOGY_CHOICES = ("auto", "chain", "star", "shared", "shared-left")
BOUNDS = ("dp", "equal")
RANK_CHOICES = ("measured", "uniform")
TARGETS_OF = ("model", "stack")
QUANTIZE_CHOICES = SCHEMES + ("auto",)
STORE_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "F32": "F32", "F16": "F16", "BF16": "BF16"}
GRAM_DTYPE_NAMES = ("fp64", "fp32")
FEEDBACK = ("none", "inputs", "outputs")
PACKINGS = ("auto", "lines", "windows")
ROUNDINGS = ("nearest", "gptq")
PLANNINGS = ("auto", "blocks", "model")
MEASURES = ("auto", "logits", "embedding", "hidden")


@dataclass(frozen=True)
class CalibConfig:
    """How calibration data is read and its Grams kept (calibrate/grams.py)."""

    samples: int = 512  # calibration samples read from the file (its first ones)
    max_length: int = 128  # tokens per text sample
    packing: str = "auto"  # text samples: lines (one per line, cut at max_length) | windows (the text
    # run together and cut into windows of max_length tokens) | auto (windows for a causal LM, else lines)
    batch_size: int = 32
    damping: float = 1e-2  # δ / mean eigenvalue of the Gram, see factorise.Whitener
    holdout: int = 32  # further samples kept back from the Grams, to measure plans on
    holdout_data: str | None = None  # read those from this file's first samples instead of the
    # calibration data's: plans measured on text the calibration did not see (docs/planning.md)
    measure: str = "auto"  # what a plan's error on them is (calibrate.OutputMeter): logits (a causal LM's
    # next-token KL from the original) | embedding (1 - cosine of pooled embeddings) | hidden (the final
    # hidden states' relative squared error) | auto (logits for a causal LM, embedding for a model
    # without a head, else hidden: what vlora-eval scores the model by)
    gram_dtype: str = "fp64"  # storage of the Grams; each batch is still summed in float64
    gram_dir: str | None = None  # keep the Grams in memory-mapped files here, not in RAM

    def __post_init__(self):
        if self.gram_dir is not None:
            object.__setattr__(self, "gram_dir", str(self.gram_dir))  # a path, recorded as text
        if self.holdout_data is not None:
            object.__setattr__(self, "holdout_data", str(self.holdout_data))
        if self.gram_dtype not in GRAM_DTYPE_NAMES:
            raise VloraError(f"`calibration.gram_dtype` must be fp64 or fp32, not {self.gram_dtype!r}")
        if self.gram_dir is not None and not Path(self.gram_dir).is_dir():
            raise VloraError(f"{self.gram_dir}: `calibration.gram_dir` must be an existing folder")
        if self.packing not in PACKINGS:
            raise VloraError(f"`calibration.packing` must be one of {', '.join(PACKINGS)}, not {self.packing!r}")
        if self.measure not in MEASURES:
            raise VloraError(f"`calibration.measure` must be one of {', '.join(MEASURES)}, not {self.measure!r}")
        if self.holdout < 0:
            raise VloraError(f"`calibration.holdout` must be at least 0, not {self.holdout}")
        for name in ("samples", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise VloraError(f"`calibration.{name}` must be at least 1, not {getattr(self, name)}")
        if not self.damping > 0:
            raise VloraError(f"`calibration.damping` must be positive, not {self.damping}")


@dataclass(frozen=True)
class CompressConfig:
    """What the user chose. Everything else in a plan follows from this and the checkpoint."""

    rank: int = 4
    chunks: int | None = None  # None: 1 for the budget, and the planner tries 1..4
    method: str = "vlora"  # vlora: shared bases and increments; svd: every layer its own factors;
    # dense: every layer whole, stored as `quantize` (and `dtype`) say: quantization alone
    base: str = "auto"  # first | mean | best | none | auto (chosen per family by measurement)
    topology: str = "auto"  # chain | star | shared (a basis per chunk, W_l = B_l A; zero base) | auto
    shared: bool | None = None  # under topology auto, also try a basis shared by groups of 2 to 4 layers;
    # None (auto): on where the plan is measured by a causal LM's next-token KL (calibrated, planned on the
    # model, `quantize` not auto), off elsewhere: it measured better end to end on SmolLM2-135M and worse on
    # all-MiniLM-L6-v2 (docs/planning.md). compress() resolves it; the file records what was asked, and the
    # plan's notes say where auto tried them
    bounds: str = "dp"  # dp: chunk bounds by dynamic programming; equal: equal split
    ranks: str = "measured"  # measured: move bytes between families by measured output error
    # (needs calibration); uniform: one rank everywhere
    align: bool = False  # align each layer's neurons and heads to the layer before first (fit/align.py)
    target_size: str | None = None  # a fraction ("0.35") or a size ("40MB"): the largest rank that fits
    target_of: str = "model"  # what target_size is a share of: model | stack
    target_bits: float | None = None  # instead of target_size: bits a weight over the stacks' factorised
    # weights (2.5: a 2.5-bit budget for every stack matrix, scales and bases included)
    svd: str = "auto"  # exact | randomized | auto (exact where it is cheap)
    dtype: str | None = None  # storage dtype of factorised tensors; None keeps the input's
    seed: int = 0  # seeds the randomised SVD, so one input gives one output
    niter: int = 4  # power iterations of the randomised SVD
    quantize: str = "none"  # none | int8 | int4 | int3 | int2: integer storage of bases and factors (fit/integers.py);
    # auto: the planner chooses per family, by measured error at equal bytes (docs/planning.md)
    base_quantize: str | None = None  # int8 | int4 | int3 | int2: the bases' integers where they differ from
    # `quantize`'s (the factors'): with method svd every layer is its own base in these integers under a
    # rank-r increment, W ≈ Q + B A; with vlora each chunk's base is (VLoRA over a quantized base)
    group_size: int = 128  # int4, int3, int2: values per scale along a row
    rounding: str = "gptq"  # integers of calibrated layers: gptq (chosen against the inputs' Grams,
    # quantize.gptq) | nearest; without calibration always nearest
    quantize_passthrough: bool = False  # also large pass-through matrices (embeddings): int8 under auto
    calibration: CalibConfig = field(default_factory=CalibConfig)  # used when calibration data is given
    sequential: bool = True  # calibrated: Grams and fits a layer at a time (pipelines/sequential.py), one layer's
    # Grams in memory; off: every Gram from the original model at once
    device: str = "auto"  # where calibration, whitening, decompositions, alignment and planning run:
    # auto (CUDA when present) | cpu | cuda | cuda:N; weights stay in their dtype, the CPU only at the writer
    feedback: str = "inputs"  # sequential: none (original activations) | inputs (each layer's Grams from
    # what the compressed layers before it feed it) | outputs (and fitted to the original's outputs)
    planning: str = "auto"  # calibrated, sequential plans by measurement: blocks (each block of layers,
    # the chunk, planned on its own Grams and output error, then fitted and passed on: never the model
    # or all Grams in memory; pipelines/blocks.py) | model (every Gram and the whole model's output error) |
    # auto (model where the model and all its Grams take at most half the device's memory, else blocks)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise VloraError(f"`rank` must be a whole number of at least 1, not {self.rank!r}")
        if self.chunks is not None and (not isinstance(self.chunks, int) or self.chunks < 1):
            raise VloraError(f"`chunks` must be a whole number of at least 1, not {self.chunks!r}")
        if self.method not in METHODS:
            raise VloraError(f"`method` must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.base not in BASES:
            raise VloraError(f"`base` must be one of {', '.join(BASES)}, not {self.base!r}")
        if self.topology not in TOPOLOGY_CHOICES:
            raise VloraError(f"`topology` must be one of {', '.join(TOPOLOGY_CHOICES)}, not {self.topology!r}")
        if self.ranks not in RANK_CHOICES:
            raise VloraError(f"`ranks` must be one of {', '.join(RANK_CHOICES)}, not {self.ranks!r}")
        if self.shared not in (None, True, False):
            raise VloraError(f"`shared` must be true, false or null (auto), not {self.shared!r}")
        if self.bounds not in BOUNDS:
            raise VloraError(f"`bounds` must be one of {', '.join(BOUNDS)}, not {self.bounds!r}")
        if self.topology in ("shared", "shared-left") and (self.base not in ("auto", "none") or self.method != "vlora"):
            raise VloraError(f"`topology` {self.topology} stores a basis per chunk and no base: it takes `base` none "
                             "or auto and `method` vlora")
        if self.method in ("svd", "dense") and self.base not in ("auto", "none"):
            raise VloraError(f"`method` {self.method} stores every layer alone; it takes no `base` {self.base}")
        if self.target_bits is not None and (self.target_size is not None or isinstance(self.target_bits, bool)
                                             or not isinstance(self.target_bits, (int, float)) or not self.target_bits > 0):
            raise VloraError(f"`target_bits` must be a positive number of bits a weight, given instead of "
                             f"`target_size`, not {self.target_bits!r}" + (" beside it" if self.target_size else ""))
        if self.method == "dense" and (self.target_size is not None or self.target_bits is not None
                                       or self.quantize == "auto"):
            raise VloraError("`method` dense stores every layer whole, its size set by `quantize` int8, int4, int3 or int2 "
                             "(and `dtype`); it takes no `target_size`, no `target_bits` and no `quantize` auto")
        if self.target_size is not None:
            object.__setattr__(self, "target_size", str(self.target_size))  # 0.35 and "0.35" alike
            parse_size(self.target_size)
        if self.target_of not in TARGETS_OF:
            raise VloraError(f"`target_of` must be one of {', '.join(TARGETS_OF)}, not {self.target_of!r}")
        if self.svd not in SVD_METHODS:
            raise VloraError(f"`svd` must be one of {', '.join(SVD_METHODS)}, not {self.svd!r}")
        if self.dtype is not None and self.dtype not in STORE_DTYPES:
            raise VloraError(f"`dtype` must be one of fp32, fp16, bf16, not {self.dtype!r}")
        if self.niter < 0:
            raise VloraError(f"`niter` must be at least 0, not {self.niter}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise VloraError(f"`quantize` must be one of {', '.join(QUANTIZE_CHOICES)}, not {self.quantize!r}")
        check_scheme(self.family_scheme, self.group_size)
        if self.base_quantize is not None:
            if self.base_quantize not in SCHEMES or self.base_quantize == "none":
                raise VloraError(f"`base_quantize` must be one of {', '.join(SCHEMES[1:])}, not {self.base_quantize!r}")
            if (self.quantize == "auto" or self.method == "dense" or self.topology in ("shared", "shared-left")
                    or self.base == "none"):
                raise VloraError("`base_quantize` stores bases apart from their factors: it takes `method` svd or "
                                 "vlora with bases, a `quantize` that is not auto (auto weighs quantized bases "
                                 "itself), and no `topology` shared")
            check_scheme(self.base_quantize, self.group_size)
        if self.rounding not in ROUNDINGS:
            raise VloraError(f"`rounding` must be one of {', '.join(ROUNDINGS)}, not {self.rounding!r}")
        if self.quantize_passthrough and self.quantize == "none":
            raise VloraError("`quantize_passthrough` needs `quantize` int8, int4, int3, int2 or auto")
        try:
            torch.device(self.device if self.device != "auto" else "cpu")
        except (RuntimeError, TypeError):
            raise VloraError(f"`device` {self.device!r} is not a device name (cpu, cuda, cuda:1, auto)") from None
        if self.feedback not in FEEDBACK:
            raise VloraError(f"`feedback` must be one of {', '.join(FEEDBACK)}, not {self.feedback!r}")
        if self.planning not in PLANNINGS:
            raise VloraError(f"`planning` must be one of {', '.join(PLANNINGS)}, not {self.planning!r}")
        if not isinstance(self.calibration, CalibConfig):
            raise VloraError("`calibration` must be a CalibConfig")

    def to_dict(self) -> dict:
        """Every field, nested ones as dicts: what the file records in ``vlora.config``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressConfig":
        """The config a file records (fields it lacks, from older files, take their defaults)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("rounding", "nearest")  # files from before GPTQ rounded to nearest
        values.setdefault("planning", "model")  # and before block planning planned on the whole model
        if isinstance(values.get("calibration"), dict):
            calib_known = {f.name for f in fields(CalibConfig)}
            values["calibration"] = CalibConfig(**{k: v for k, v in values["calibration"].items() if k in calib_known})
        return cls(**values)

    @property
    def passthrough_scheme(self) -> str:
        if not self.quantize_passthrough:
            return "none"
        return "int8" if self.quantize == "auto" else self.quantize

    @property
    def family_scheme(self) -> str:
        """The scheme of every family when it is fixed; under ``auto`` the float one is the reference."""
        return "none" if self.quantize == "auto" else self.quantize


def parse_size(text: str | float, field: str = "target_size", *, bytes_only: bool = False, zero: bool = False,
               example: str = "40MB") -> tuple[str, float]:
    """``0.35`` -> ("fraction", 0.35); ``40MB`` / ``1.5GiB`` / ``123456`` -> ("bytes", n).

    ``field`` names the option in errors. ``bytes_only``: a fraction is refused (a size such as
    ``example`` is asked for); ``zero``: 0 (``0``, ``0B``, ``0MB``) is a size, ("bytes", 0)."""
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    raw = str(text).strip().upper().replace(" ", "")
    num = raw.rstrip("KMGIB")
    unit = raw[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    kind = "fraction" if unit == "" and 0 < value <= 1 else "bytes"
    if unit not in units or value < 0 or (value == 0 and not zero) or (bytes_only and kind == "fraction"):
        if bytes_only:
            raise VloraError(f"`{field}` must be a size such as {example}, not {text!r}")
        raise VloraError(f"`{field}` must be a fraction such as 0.35 or a size such as 40MB, not {text!r}")
    return kind, value * units[unit]
