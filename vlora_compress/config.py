"""Every option of a compression, declared once: frozen dataclasses that validate themselves.

The CLI builds a ``CompressConfig`` from its flags, the Python API takes one (or its fields as
keywords), and the VLoRA file records it whole (``vlora.config``), so a file says how it was made.
``CompressConfig`` is composed of parts (``PARTS``: form, target, storage, calibration, pipeline),
each a frozen dataclass that checks its own fields. Every field's default, help text and flag are
written once, in its metadata (``option``): the CLI's options are built from them (cli/options.py).
Errors name the fields in backquotes (`rank`, `calibration.samples`); the CLI turns each into the
flag that sets it.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
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


def option(default=MISSING, flag: str | None = None, help: str = "", *, short: str | None = None,  # noqa: A002
           cli_type: type | None = None, default_factory=MISSING):
    """A dataclass field whose metadata holds its help text and its CLI flag (``--x`` or ``--x/--no-x``).

    ``short`` is a one-letter alias (``-r``); ``cli_type`` the type the flag parses where it is not
    the field's own (a path recorded as text); no ``flag``: the field has no option of its own."""
    meta = {"help": help, **({"flag": flag} if flag else {}), **({"short": short} if short else {}),
            **({"type": cli_type} if cli_type else {})}
    return field(default=default, default_factory=default_factory, metadata=meta)


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise VloraError(f"`{name}` must be one of {', '.join(choices)}, not {value!r}")


@dataclass(frozen=True)
class CalibConfig:
    """How calibration data is read and its Grams kept (calibrate/grams.py); used when calibration data
    is given. Samples are the file's first ones; ``damping`` is δ over the Gram's mean eigenvalue
    (fit/fit/svd.Whitener); Grams stored in fp32 are still summed a batch at a time in float64;
    plans are measured as calibrate/grams.OutputMeter does, on samples the Grams did not see
    (docs/planning.md)."""

    samples: int = option(512, "--calib-samples", "Calibration samples to use (the file's first N lines, or windows).")
    max_length: int = option(128, "--calib-max-length",
                             "Tokens per calibration sample (a line is cut there; a window is that long).")
    packing: str = option("auto", "--calib-packing",
                          "Text samples: lines (one per line), windows (the text run together, cut every "
                          "--calib-max-length tokens) or auto (windows for a causal LM, lines otherwise).")
    batch_size: int = option(32, help="Calibration samples a forward pass.")
    damping: float = option(1e-2, help="Whitening's damping: δ over the mean eigenvalue of the Gram.")
    holdout: int = option(32, "--calib-holdout",
                          "Further samples kept back from the Grams, on which the planner measures every candidate "
                          "plan (the model's output error); none where no plan is measured.")
    holdout_data: str | None = option(None, "--holdout-data",
                                      "Read the --calib-holdout samples from this file (the same kinds as --calib) "
                                      "instead of the calibration data's tail: plans measured on text the "
                                      "calibration did not see.", cli_type=Path)
    measure: str = option("auto", "--measure",
                          "What the planner measures each candidate plan by on the held-back samples: logits (a "
                          "causal LM's next-token KL from the original, what perplexity feels), embedding (1 - "
                          "cosine of the pooled embeddings), hidden (the final hidden states' relative error) or "
                          "auto (logits for a causal LM, embedding for a model without a head, else hidden).")
    gram_dtype: str = option("fp64", "--gram-dtype",
                             "Store calibration Grams as fp64 or fp32 (half the memory).")
    gram_dir: str | None = option(None, "--gram-dir",
                                  "Keep calibration Grams in memory-mapped files in this folder instead of RAM.",
                                  cli_type=Path)

    def __post_init__(self):
        if self.gram_dir is not None:
            object.__setattr__(self, "gram_dir", str(self.gram_dir))  # a path, recorded as text
        if self.holdout_data is not None:
            object.__setattr__(self, "holdout_data", str(self.holdout_data))
        if self.gram_dtype not in GRAM_DTYPE_NAMES:
            raise VloraError(f"`calibration.gram_dtype` must be fp64 or fp32, not {self.gram_dtype!r}")
        if self.gram_dir is not None and not Path(self.gram_dir).is_dir():
            raise VloraError(f"{self.gram_dir}: `calibration.gram_dir` must be an existing folder")
        _one_of("calibration.packing", self.packing, PACKINGS)
        _one_of("calibration.measure", self.measure, MEASURES)
        if self.holdout < 0:
            raise VloraError(f"`calibration.holdout` must be at least 0, not {self.holdout}")
        for name in ("samples", "max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise VloraError(f"`calibration.{name}` must be at least 1, not {getattr(self, name)}")
        if not self.damping > 0:
            raise VloraError(f"`calibration.damping` must be positive, not {self.damping}")


@dataclass(frozen=True)
class FormPart:
    """What each family is stored as: bases, rank-r increments and how layers share them. ``chunks``
    None: the budget counts one chunk and the planner tries 1 to 3 (``MAX_AUTO_CHUNKS``). ``shared``
    None (auto) is resolved by compress(); the file records what was asked, and the plan's notes say
    where auto tried shared bases (docs/planning.md). ``align``: fit/align.py."""

    rank: int = option(4, "--rank", "Rank of each layer's increment over the layer before it.", short="-r")
    chunks: int | None = option(None, "--chunks", "Contiguous chunks per stack, each with one base; by default the "
                                "planner tries 1 to 3 (the budget counts one).", short="-c")
    method: str = option("vlora", "--method",
                         "vlora (shared bases and increments), svd (every layer its own low-rank factors: the "
                         "baseline) or dense (every layer whole, as --quantize stores it: quantization alone).")
    base: str = option("auto", "--base", "first, mean (whitened mean, stored once), best (least residual), none "
                       "(per-layer SVD) or auto (chosen per family by measured error).")
    topology: str = option("auto", "--topology",
                           "chain (each layer over its neighbour), star (each over the base), shared (no base: one "
                           "right factor per chunk that every layer's own left factor reads, W_l = B_l A: for "
                           "nn.Linear the inputs' side), shared-left (one left factor per chunk, W_l = B A_l: the "
                           "outputs' side) or auto.")
    shared: bool | None = option(None, "--shared/--no-shared",
                                 "With --topology auto, also try a basis shared by groups of 2 to 4 layers (either "
                                 "factor; adjacent layers, or grouped by how alike their subspaces are), by "
                                 "measurement like every form. By default on where the plan is measured by a causal "
                                 "LM's next-token KL (calibrated, planned on the model, --quantize not auto: the "
                                 "default plan with a size is auto), off elsewhere: on SmolLM2-135M it measured 15%, 5% and 6% better than per-layer SVD at "
                                 "20%, 35% and 50% removed, for about 2.5 times the planning time; on "
                                 "all-MiniLM-L6-v2 it measured worse end to end.")
    bounds: str = option("dp", "--bounds", "dp (chunk bounds by dynamic programming on the deltas) or equal.")
    ranks: str = option("measured", "--ranks", "measured (move bytes between families by measured output error; "
                        "needs --calib) or uniform.")
    align: bool = option(False, "--align", "Align each layer's MLP neurons and attention heads to the layer before it "
                         "first (same function, smaller deltas).")

    def _check_form(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise VloraError(f"`rank` must be a whole number of at least 1, not {self.rank!r}")
        if self.chunks is not None and (not isinstance(self.chunks, int) or self.chunks < 1):
            raise VloraError(f"`chunks` must be a whole number of at least 1, not {self.chunks!r}")
        _one_of("method", self.method, METHODS)
        _one_of("base", self.base, BASES)
        _one_of("topology", self.topology, TOPOLOGY_CHOICES)
        _one_of("ranks", self.ranks, RANK_CHOICES)
        if self.shared not in (None, True, False):
            raise VloraError(f"`shared` must be true, false or null (auto), not {self.shared!r}")
        _one_of("bounds", self.bounds, BOUNDS)
        if self.topology in ("shared", "shared-left") and (self.base not in ("auto", "none") or self.method != "vlora"):
            raise VloraError(f"`topology` {self.topology} stores a basis per chunk and no base: it takes `base` none "
                             "or auto and `method` vlora")
        if self.method in ("svd", "dense") and self.base not in ("auto", "none"):
            raise VloraError(f"`method` {self.method} stores every layer alone; it takes no `base` {self.base}")


@dataclass(frozen=True)
class TargetPart:
    """How large, instead of ``rank``: a byte budget, for which the largest rank that fits is chosen
    (or, with ``quantize`` auto, that the planner shares out)."""

    target_size: str | None = option(None, "--target-size",
                                     "Choose the largest uniform rank that fits: a fraction such as 0.35, or a size "
                                     "such as 40MB. Overrides --rank.")
    target_of: str = option("model", "--target-of", "What --target-size is a fraction of: model (the whole "
                            "checkpoint) or stack (the factorised layers).")
    target_bits: float | None = option(None, "--target-bits",
                                       "Instead of --target-size: a budget of this many bits a weight over the stacks' "
                                       "factorised weights (scales and dense bases included), e.g. 2.5.")

    max_drop: float | None = option(None, "--max-drop",
                                    "Instead of a size: the smallest file whose plan measures within this on the "
                                    "held-back calibration samples, in the planner's measure (--measure: next-token KL "
                                    "in nats for a causal LM, 1 - cosine of the pooled embeddings for an encoder, the "
                                    "hidden states' relative error otherwise), found by bisection on bits a weight "
                                    "(needs --calib).")

    def _check_target(self) -> None:
        if self.max_drop is not None and (isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float))
                                          or not self.max_drop > 0 or self.target_size is not None
                                          or self.target_bits is not None):
            raise VloraError(f"`max_drop` must be a positive number, given instead of `target_size` and `target_bits`, "
                             f"not {self.max_drop!r}")
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
        _one_of("target_of", self.target_of, TARGETS_OF)


@dataclass(frozen=True)
class StoragePart:
    """How the factors are stored and computed: dtype, integers (fit/integers.py, GPTQ rounding
    fit/integers.gptq) and the SVD. ``quantize`` auto: the planner chooses per family (docs/planning.md)."""

    dtype: str | None = option(None, "--dtype",
                               "Store bases and factors as fp32, fp16 or bf16; by default in the input's dtype.")
    quantize: str | None = option(None, "--quantize",
                                  "Store bases and factors as none, int8 (per row), or int4, int3 or int2 (per group of "
                                  "a row, packed 4, 3 or 2 bits a value), or int3-midrise or int2-midrise (the same "
                                  "bits on grids with no zero level that use every code); each increment is fitted "
                                  "against the quantized layer before it. auto: the planner picks per family, by "
                                  "measured error at equal bytes, between low rank in 16-bit floats, int8 or int4, "
                                  "every layer dense in 16-bit floats or int8 to int2 (quantization alone), and every "
                                  "layer a dense int4, int3-midrise or int2-midrise base under a low-rank int4 "
                                  "increment (W ≈ Q + BA). By default auto where the plan is calibrated and sized "
                                  "(--calib with --target-size or --target-bits, the form left to the planner), "
                                  "none otherwise.")
    base_quantize: str | None = option(None, "--base-quantize",
                                       "Store bases as int8, int4, int3, int2, int3-midrise or int2-midrise apart from "
                                       "their factors (--quantize); under a low-rank increment the mid-rise grids "
                                       "measure better. With --method svd every layer becomes its own base in these "
                                       "integers under a rank-r increment fitted to what the rounding lost "
                                       "(W ≈ Q + BA, CALDERA's form); with vlora, each chunk's base.")
    group_size: int = option(128, "--group-size", "int4, int3, int2: values per float16 scale along a row.")
    rounding: str = option("gptq", "--rounding",
                           "How calibrated layers stored as integers are rounded: gptq (each input column's error "
                           "spread over the columns not yet rounded, against the calibration Grams) or nearest. "
                           "Without --calib always nearest.")
    quantize_passthrough: bool = option(False, "--quantize-passthrough",
                                        "Also store large pass-through matrices (2-D, at least 65,536 values: "
                                        "embeddings, a head) with the --quantize scheme (int8 under auto); expand "
                                        "gives them back in their own dtype. Without it, the default plan with a "
                                        "--target-of model size weighs their storage (as stored, int8, int4) in "
                                        "the budget.")
    svd: str = option("auto", "--svd", "auto, exact or randomized. auto: exact SVD up to 1024 on the short side or "
                      "when rank >= 1/4 of it.")
    seed: int = option(0, "--seed", "Seed of the randomized SVD; the same input and options give the same bytes.")
    niter: int = option(4, help="Power iterations of the randomized SVD.")

    def _check_storage(self) -> None:
        _one_of("svd", self.svd, SVD_METHODS)
        if self.dtype is not None and self.dtype not in STORE_DTYPES:
            raise VloraError(f"`dtype` must be one of fp32, fp16, bf16, not {self.dtype!r}")
        if self.niter < 0:
            raise VloraError(f"`niter` must be at least 0, not {self.niter}")
        if self.quantize is not None:  # None: resolved by compress (default_storage)
            _one_of("quantize", self.quantize, QUANTIZE_CHOICES)
        check_scheme(self.family_scheme, self.group_size)
        if self.base_quantize is not None:
            _one_of("base_quantize", self.base_quantize, SCHEMES[1:])  # every scheme but none
            if (self.quantize == "auto" or self.method == "dense" or self.topology in ("shared", "shared-left")
                    or self.base == "none"):
                raise VloraError("`base_quantize` stores bases apart from their factors: it takes `method` svd or "
                                 "vlora with bases, a `quantize` that is not auto (auto weighs quantized bases "
                                 "itself), and no `topology` shared")
            check_scheme(self.base_quantize, self.group_size)
        _one_of("rounding", self.rounding, ROUNDINGS)
        if self.quantize_passthrough and self.quantize == "none":
            raise VloraError("`quantize_passthrough` needs `quantize` int8, int4, int3, int2 or auto")

    @property
    def passthrough_scheme(self) -> str:
        if not self.quantize_passthrough:
            return "none"
        return "int8" if self.quantize in ("auto", None) else self.quantize

    @property
    def family_scheme(self) -> str:
        """The scheme of every family when it is fixed; under ``auto`` the float one is the reference."""
        return "none" if self.quantize in ("auto", None) else self.quantize


@dataclass(frozen=True)
class PipelinePart:
    """In what order and where a calibrated compression runs: layer by layer (pipelines/sequential.py),
    by blocks (pipelines/blocks.py) or on the whole model; on which device."""

    sequential: bool = option(True, "--sequential/--no-sequential",
                              "With --calib: collect Grams and fit one layer at a time, one layer's Grams in memory "
                              "(default); or every Gram from the original model at once.")
    feedback: str = option("inputs", "--feedback",
                           "Sequential: inputs (each layer whitened by what the layers compressed before it feed it; "
                           "default), none (the original activations throughout) or outputs (and fitted to give the "
                           "original's outputs from those inputs; needs much calibration data).")
    planning: str = option("auto", "--planning",
                           "With --calib (sequential), for a plan chosen by measurement: model (every Gram and the "
                           "whole model's output error), blocks (each stack cut into --chunks blocks, 3 by default, "
                           "planned on the block's own Grams and output error, fitted and passed on: one block in "
                           "memory, never the whole model or every Gram), or auto: model where the model and its "
                           "Grams take at most half the device's memory, else blocks. --quantize auto always plans "
                           "on the model.")
    device: str = option("auto", "--device",
                         "Where every stage runs (calibration, whitening, decompositions, alignment, planning, eval "
                         "and --distill): auto (CUDA when present), cpu, cuda or cuda:N. Weights keep their dtype; "
                         "only the writer is on the CPU.")

    def _check_pipeline(self) -> None:
        try:
            torch.device(self.device if self.device != "auto" else "cpu")
        except (RuntimeError, TypeError):
            raise VloraError(f"`device` {self.device!r} is not a device name (cpu, cuda, cuda:1, auto)") from None
        _one_of("feedback", self.feedback, FEEDBACK)
        _one_of("planning", self.planning, PLANNINGS)


@dataclass(frozen=True)
class CompressConfig(PipelinePart, StoragePart, TargetPart, FormPart):
    """What the user chose. Everything else in a plan follows from this and the checkpoint.

    Its fields are its parts' (``PARTS``), flat (``config.rank``, ``CompressConfig(rank=4)``), and
    ``calibration``; each part checks its own, in the order of ``__post_init__``."""

    calibration: CalibConfig = option(help="Used when calibration data is given.", default_factory=CalibConfig)

    def __post_init__(self):
        self._check_form()
        self._check_target()
        self._check_storage()
        self._check_pipeline()
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


PARTS = {  # CompressConfig's parts by title (the CLI's help panels); the calibration's is nested
    "Form (rank, chunks, bases)": FormPart,
    "Target (a size instead of --rank)": TargetPart,
    "Storage (dtype, integers, SVD)": StoragePart,
    "Calibration": CalibConfig,
    "Pipeline (calibrated runs, device)": PipelinePart,
}


def flags(config, names: tuple[str, ...]) -> str:
    """The command-line flags that give the fields ``names`` of ``config`` its values, from the fields'
    metadata (as the CLI reads them: cli/options.py): ``--method svd``; a switch, its side
    (``--sequential`` or ``--no-sequential``; a flag with no off side, nothing when off). What a
    report says makes a config it did not write itself."""
    meta = {f.name: f.metadata for f in fields(config)}
    out = []
    for name in names:
        flag, value = meta[name]["flag"], getattr(config, name)
        on, _, off = flag.partition("/")
        out.append((on if value else off) if isinstance(value, bool) else f"{flag} {value}")
    return " ".join(x for x in out if x)


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
