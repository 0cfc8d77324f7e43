"""The VLoRA file: one plain safetensors file whose ``__metadata__`` carries the plan.

docs/format.md is the specification; this module is its reference implementation. Tensor names:

- a pass-through tensor and a chunk's base layer keep their original key;
- the increment of layer ``l`` is ``<key of l>.vlora_B`` (m x r) and ``<key of l>.vlora_A`` (r x n);
- a synthetic base is ``<stack>.vlora_base<c>.<suffix>`` for chunk ``c`` of its family.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..io.checkpoint import DTYPES, FLOAT_DTYPES, ITEMSIZE, Checkpoint, open_checkpoint
from ..errors import VloraError
from ..forms.stored import family_matrices, form_of
from ..plan import DIM_LIMIT, FamilyPlan, Plan
from .plan_record import is_whole, read_plan
from ..fit.integers import MIDRISE, SCALE_SUFFIX, SCALE_TAG, dequantize, packed_shape, scale_shape, storage_tag
from .versions import (BASE_QUANT_VERSION, FORMAT_VERSION, GRID_VERSION, LEFT_VERSION, QUANTIZED_VERSION,
                       SHARED_VERSION)

FORMAT_NAME = "vlora"
READS = tuple(str(v) for v in (FORMAT_VERSION, QUANTIZED_VERSION, SHARED_VERSION, BASE_QUANT_VERSION, GRID_VERSION,
                               LEFT_VERSION))
HOLDS = {LEFT_VERSION: "shared left factors or residual factors", GRID_VERSION: "mid-rise schemes", BASE_QUANT_VERSION: "bases in their own scheme",
         SHARED_VERSION: "shared bases", QUANTIZED_VERSION: "quantized tensors"}

Entry = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype, shape)


@dataclass(frozen=True)
class SourceInfo:
    """What expand needs to give back the original: keys in order, dtypes, shapes, metadata.

    It describes the weights, not where they were kept (no file names, which files written by
    earlier versions carry and readers ignore): a model in memory and its saved folder give the
    same record, and ``sha256`` is checkpoint.tensor_digest, a digest of the tensors themselves."""

    sha256: str
    nbytes: int
    metadata: dict[str, str]
    tensors: tuple[Entry, ...]  # original order

    @classmethod
    def from_dict(cls, d: dict) -> "SourceInfo":
        """Parse and check a source record: expand writes exactly these tensors and this metadata,
        and sizes are reported against ``nbytes``, so every field is checked, types included."""
        if not isinstance(d, dict):
            raise VloraError("corrupted plan: the source record is not a JSON object")
        missing = [k for k in ("sha256", "nbytes", "metadata", "tensors") if k not in d]
        if missing:
            raise VloraError(f"corrupted plan: the source record has no {missing[0]!r}")
        sha256, nbytes, metadata, tensors = d["sha256"], d["nbytes"], d["metadata"], d["tensors"]
        if not isinstance(sha256, str):
            raise VloraError("corrupted plan: the source record's sha256 is not a string")
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise VloraError("corrupted plan: the source record's metadata is not a map of strings to strings")
        if not isinstance(tensors, (list, tuple)):
            raise VloraError("corrupted plan: the source record's tensors are not a list")
        entries, seen = [], set()
        for t in tensors:
            if not (isinstance(t, (list, tuple)) and len(t) == 3 and isinstance(t[0], str) and isinstance(t[1], str)
                    and isinstance(t[2], (list, tuple)) and all(is_whole(x) and 0 <= x < DIM_LIMIT for x in t[2])):
                raise VloraError(f"corrupted plan: source tensor {reprlib.repr(t)} is not [key, dtype, shape]")
            key, dt, shape = t
            if dt not in DTYPES:
                raise VloraError(f"corrupted plan: tensor {key!r} has unknown dtype {dt!r}")
            if key in seen:  # expand would write it twice
                raise VloraError(f"corrupted plan: source tensor {key!r} is listed twice")
            seen.add(key)
            entries.append((key, dt, tuple(shape)))
        if not is_whole(nbytes) or nbytes < 1:
            raise VloraError(f"corrupted plan: the source record's nbytes {reprlib.repr(nbytes)} is not a positive "
                             "whole number")
        held = sum(ITEMSIZE[dt] * math.prod(shape) for _, dt, shape in entries)
        if nbytes != held:
            raise VloraError(f"corrupted plan: the source record's nbytes {nbytes:,} is not the {held:,} bytes "
                             "of the tensors it lists")
        return cls(sha256, nbytes, dict(metadata), tuple(entries))

    def by_key(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """key -> (dtype, shape)."""
        return {key: (dt, shape) for key, dt, shape in self.tensors}


@dataclass(frozen=True)
class Quantized:
    """How a matrix the file holds as integers reads back: logical shape and the dtype to give."""

    scheme: str
    group_size: int
    shape: tuple[int, int]
    dtype: str


def read_matrix(fp: FamilyPlan, shape: tuple[int, int], name: str, raw, where: str | None = None) -> torch.Tensor:
    """A base or factor as stored entries ``raw(name)`` hold it: dequantized when quantized."""
    if fp.quant_of(name) == "none":
        return raw(name)
    return read_quantized(Quantized(fp.quant_of(name), fp.group_size, shape, fp.store_dtype), name, raw, where)


def read_quantized(spec: Quantized, name: str, raw, where: str | None = None) -> torch.Tensor:
    q, s = raw(name), raw(name + SCALE_SUFFIX)
    return dequantize(q, s, spec.shape, spec.scheme, spec.group_size, where or name).to(DTYPES[spec.dtype])


def quantized_entries(name: str, shape: tuple[int, int], scheme: str, group_size: int) -> list[Entry]:
    """The integers, then the scales."""
    return [(name, storage_tag(scheme), packed_shape(shape, scheme)),
            (name + SCALE_SUFFIX, SCALE_TAG, scale_shape(shape, scheme, group_size))]


def family_layout(fp: FamilyPlan) -> list[Entry]:
    """Stored tensors of one family: each matrix, or when quantized its integers and then its scales."""
    out: list[Entry] = []
    for name, shape in family_matrices(fp):
        scheme = fp.quant_of(name)
        out += ([(name, fp.store_dtype, shape)] if scheme == "none"
                else quantized_entries(name, shape, scheme, fp.group_size))
    return out


def factorised_keys(plan: Plan) -> set[str]:
    return {fp.key(layer) for fp in plan.families for layer in fp.layers}


def layout(plan: Plan, source: SourceInfo) -> list[Entry]:
    """Every stored tensor: pass-through tensors in original order, then each family."""
    factorised = factorised_keys(plan)
    quantized = {q.key: q for q in plan.passthrough}
    out: list[Entry] = []
    for key, dt, shape in source.tensors:
        if key in quantized:
            out += quantized_entries(key, shape, quantized[key].quant, quantized[key].group_size)
        elif key not in factorised:
            out.append((key, dt, shape))
    for fp in plan.families:
        out += family_layout(fp)
    return out


def version_of(plan: Plan) -> int:
    """The least format version that holds the plan: the most any chunk's form needs (shared bases 3,
    shared left factors or residual factors 6), and what its storage needs (mid-rise schemes 5,
    bases in their own scheme 4, integers 2)."""
    schemes = {q.quant for q in plan.passthrough} | {s for fp in plan.families for s in (fp.quant, fp.base_quant)}
    storage = (GRID_VERSION if schemes & MIDRISE else BASE_QUANT_VERSION if any(fp.base_quant is not None for fp in plan.families)
               else QUANTIZED_VERSION if plan.quantized else FORMAT_VERSION)
    return max([storage] + [form_of(c).version(c) for fp in plan.families for c in fp.chunks])


def header_metadata(plan: Plan, source: SourceInfo, config: dict) -> dict[str, str]:
    dump = lambda obj: json.dumps(obj, sort_keys=True, separators=(",", ":"))  # noqa: E731
    return {
        "vlora.format": FORMAT_NAME,
        "vlora.version": str(version_of(plan)),
        "vlora.config": dump(config),
        "vlora.source": dump(asdict(source)),
        "vlora.plan": dump(plan.to_dict()),
    }


class VloraFile:
    """A validated VLoRA file: the plan and source record parsed, every stored tensor checked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise VloraError(f"{self.path}: is a folder, not a VLoRA file")
        self.checkpoint: Checkpoint = open_checkpoint(self.path)
        meta = self.checkpoint.metadata
        if meta.get("vlora.format") != FORMAT_NAME:
            raise VloraError(f"{self.path}: is not a VLoRA file (no 'vlora.format' in its metadata)")
        version = meta.get("vlora.version")
        if version not in READS:
            raise VloraError(f"{self.path}: has VLoRA format version {version!r}; this tool reads versions {', '.join(READS)}")
        try:
            self.config = json.loads(meta["vlora.config"])
            source = json.loads(meta["vlora.source"])
            plan = json.loads(meta["vlora.plan"])
        except KeyError as e:
            raise VloraError(f"{self.path}: corrupted plan: no {e.args[0]!r} in its metadata") from None
        except (ValueError, RecursionError) as e:  # not JSON, an integer of over 4,300 digits, nesting too deep
            raise VloraError(f"{self.path}: corrupted plan ({type(e).__name__}: {e})") from None
        if not isinstance(self.config, dict):
            raise VloraError(f"{self.path}: corrupted plan: vlora.config is not a JSON object")
        try:
            self.source = SourceInfo.from_dict(source)
            self.plan = read_plan(plan)
        except VloraError as e:
            raise VloraError(f"{self.path}: {e}") from None
        need = version_of(self.plan)
        if int(version) < need:
            raise VloraError(f"{self.path}: corrupted plan: a version {version} file cannot hold {HOLDS[need]}")
        self._check_passthrough()
        self._check_layout()
        # what reads back as floats: name -> how
        self.quantized = {name: Quantized(fp.quant_of(name), fp.group_size, shape, fp.store_dtype)
                          for fp in self.plan.families for name, shape in family_matrices(fp)
                          if fp.quant_of(name) != "none"}
        source = self.source.by_key()
        for q in self.plan.passthrough:
            dt, shape = source[q.key]
            self.quantized[q.key] = Quantized(q.quant, q.group_size, shape, dt)

    def _check_passthrough(self) -> None:
        source = self.source.by_key()
        factorised = factorised_keys(self.plan)
        for q in self.plan.passthrough:
            dt, shape = source.get(q.key, (None, ()))
            if dt is None or q.key in factorised or len(shape) != 2 or dt not in FLOAT_DTYPES:
                raise VloraError(f"{self.path}: corrupted plan: quantized pass-through {q.key!r} is not a "
                                 "pass-through floating-point matrix of the source")

    def _check_layout(self) -> None:
        infos = self.checkpoint.infos
        expected = layout(self.plan, self.source)
        names = set()
        for name, _, _ in expected:  # a synthetic base or a factor's name can be a source key
            if name in names:
                raise VloraError(f"{self.path}: corrupted plan: tensor {name!r} has two places in the layout")
            names.add(name)
        for name, dtype, shape in expected:
            info = infos.get(name)
            if info is None:
                raise VloraError(f"{self.path}: corrupted plan: tensor {name!r} is missing")
            if (info.dtype, info.shape) != (dtype, shape):
                raise VloraError(
                    f"{self.path}: corrupted plan: tensor {name!r} is {info.dtype}{list(info.shape)}, "
                    f"the plan says {dtype}{list(shape)}"
                )
        extra = set(infos) - names
        if extra:
            raise VloraError(f"{self.path}: corrupted plan: tensor {sorted(extra)[0]!r} is not in the plan")
        source = self.source.by_key()
        for fp in self.plan.families:
            for layer in fp.layers:
                if source.get(fp.key(layer)) != (fp.dtype, fp.shape):
                    raise VloraError(f"{self.path}: corrupted plan: {fp.key(layer)!r} does not match its source record")

    def get(self, name: str) -> torch.Tensor:
        """A stored tensor; a quantized one comes back dequantized: a base or factor in its store
        dtype, a pass-through tensor in its original dtype."""
        if name in self.quantized:
            return read_quantized(self.quantized[name], name, self.checkpoint.read, f"{self.path}: {name}")
        return self.checkpoint.read(name)

    @property
    def nbytes(self) -> int:
        return self.checkpoint.nbytes
