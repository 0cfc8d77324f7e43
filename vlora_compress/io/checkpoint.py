"""Read checkpoints: a .safetensors file, a sharded index, a Hugging Face model folder, or a model
already in memory.

Files are read lazily through ``safe_open``: listing a checkpoint touches only headers, and a
tensor is loaded when it is asked for, so compressing never holds the whole model in memory. A
model in memory (ModelCheckpoint) is seen as the file ``save_pretrained`` would write for it: the
same tensor names, order and metadata, so that compressing it gives the file its folder would give.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..errors import VloraError

# safetensors dtype names -> torch dtypes (the ones torch can hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in DTYPES.items()}

VLORA_SUFFIX = ".vlora.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE.get(self.dtype, 1)


class Checkpoint:
    """A lazy, read-only view over the tensors of one or more safetensors files."""

    def __init__(self, source: Path, files: list[Path], weight_map: dict[str, str] | None = None):
        self.source = source
        self.files = files
        self._handles = {}
        self.infos: dict[str, TensorInfo] = {}
        self.file_metadata: dict[Path, dict[str, str]] = {}
        for path in files:
            handle = _open_safetensors(path)
            self._handles[path] = handle
            self.file_metadata[path] = handle.metadata() or {}
            # offset order is the order tensors sit in the file; keys() is sorted by name
            in_file = handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys()
            keys = in_file
            if weight_map is not None:
                wanted = {k for k, shard in weight_map.items() if (path.parent / shard) == path}
                missing = wanted - set(in_file)
                if missing:
                    raise VloraError(f"{path}: the index names tensor {sorted(missing)[0]!r}, which this shard lacks")
                keys = [k for k in in_file if k in wanted]
            for key in keys:
                if key in self.infos:
                    raise VloraError(f"{path}: tensor {key!r} also appears in {self.infos[key].file.name}")
                sl = handle.get_slice(key)
                dtype = sl.get_dtype()
                if dtype not in DTYPES:
                    raise VloraError(f"{path}: tensor {key!r} has dtype {dtype}, which torch cannot hold")
                self.infos[key] = TensorInfo(key, dtype, tuple(sl.get_shape()), path)
        if not self.infos:
            raise VloraError(f"{source}: holds no tensors")

    @property
    def metadata(self) -> dict[str, str]:
        """The first file's own ``__metadata__`` (shards of one model carry the same)."""
        return dict(self.file_metadata[self.files[0]])

    @property
    def is_vlora(self) -> bool:
        return any("vlora.format" in m for m in self.file_metadata.values())

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def read(self, key: str) -> torch.Tensor:
        """Load one tensor, refusing NaN or Inf: a broken weight must stop us, not spread."""
        info = self.infos[key]
        return _finite(self._handles[info.file].get_tensor(key), info.file, key)

    def sha256(self) -> str:
        """Digest of the tensors (tensor_digest): the same weights give the same digest, sharded or not."""
        return tensor_digest(self.infos.values(), lambda key: self._handles[self.infos[key].file].get_tensor(key))

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ModelCheckpoint:
    """A model in memory (a torch module, e.g. a transformers model) seen as the checkpoint that
    ``save_pretrained`` would write for it: its state dict without tied duplicates, in the order
    safetensors stores tensors, with safetensors' ``{"format": "pt"}`` metadata. Reading a tensor
    gives the module's own (detached, not copied) tensor, on the device where it lives."""

    is_vlora = False

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.source = f"<{type(model).__name__} in memory>"
        self.files: list[Path] = []
        state, seen = {}, {}
        for key, t in model.state_dict(keep_vars=False).items():
            if t.device.type == "meta":
                raise VloraError(f"{self.source}: tensor {key!r} is on the meta device (not loaded)")
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
            if ident is not None and ident in seen:  # a tied weight: save_pretrained stores it once
                continue
            if t.dtype not in DTYPE_NAMES:
                raise VloraError(f"{self.source}: tensor {key!r} has dtype {t.dtype}, which safetensors cannot hold")
            seen[ident] = key
            state[key] = t.detach()
        if not state:
            raise VloraError(f"{self.source}: holds no tensors")
        self._state = state
        self.infos = {key: TensorInfo(key, DTYPE_NAMES[state[key].dtype], tuple(state[key].shape), Path(self.source))
                      for key in _stored_order(state)}

    metadata = property(lambda self: {"format": "pt"})  # what transformers' save_pretrained writes
    nbytes = Checkpoint.nbytes

    def read(self, key: str) -> torch.Tensor:
        return _finite(self._state[key], self.source, key)

    def sha256(self) -> str:
        return tensor_digest(self.infos.values(), self._state.__getitem__)

    def close(self) -> None:
        pass

    def __enter__(self) -> "ModelCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _finite(t: torch.Tensor, where, key: str) -> torch.Tensor:
    """``t``, unless it holds NaN or Inf: a broken weight must stop us, not spread."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise VloraError(f"{where}: tensor {key!r} holds NaN or Inf")
    return t


def _stored_order(state: dict[str, torch.Tensor]) -> list[str]:
    """The order safetensors' serialiser stores these tensors in, asked of the library itself with
    one-element stand-ins (it sorts by dtype, then name)."""
    header = safetensors_header(save({k: torch.zeros(1, dtype=t.dtype) for k, t in state.items()}))
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def safetensors_header(blob: bytes) -> dict:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n])


def tensor_digest(infos, read) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: a digest of the
    weights themselves, the same for a model in memory, one file or any sharding of it."""
    h = hashlib.sha256()
    for info in sorted(infos, key=lambda i: i.key):
        h.update(json.dumps([info.key, info.dtype, list(info.shape)]).encode())
        t = read(info.key).detach().contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).cpu().numpy())
    return h.hexdigest()


def open_source(source) -> "Checkpoint | ModelCheckpoint":
    """A checkpoint path (open_checkpoint), or a model in memory (ModelCheckpoint)."""
    if isinstance(source, torch.nn.Module):
        return ModelCheckpoint(source)
    return open_checkpoint(source)


def open_checkpoint(source: str | Path) -> Checkpoint:
    """Resolve a file, an index or a folder to its safetensors files and open them lazily."""
    src = Path(source)
    if not src.exists():
        raise VloraError(f"{src}: no such file or folder")
    if src.is_dir():
        src = _pick_in_folder(src)
    if src.name.endswith(".json"):
        files, weight_map = _read_index(src)
        return Checkpoint(src, files, weight_map)
    return Checkpoint(src, [src])


def _pick_in_folder(folder: Path) -> Path:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        preferred = folder / "model.safetensors.index.json"
        if preferred in indexes:
            return preferred
        raise VloraError(f"{folder}: holds {len(indexes)} safetensors indexes; name the one to use")
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.endswith(VLORA_SUFFIX))
    if len(files) == 1:
        return files[0]
    if (folder / "model.safetensors") in files:
        return folder / "model.safetensors"
    if not files:
        raise VloraError(f"{folder}: holds no .safetensors file")
    raise VloraError(f"{folder}: holds {len(files)} .safetensors files and no index; name the one to use")


def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        data = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VloraError(f"{index}: not a valid JSON index ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise VloraError(f"{index}: has no 'weight_map' naming the shards")
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        if not isinstance(shard, str):
            raise VloraError(f"{index}: weight_map holds a shard name that is not a string")
        path = index.parent / shard
        if not path.is_file():
            raise VloraError(f"{index}: names missing shard {shard}")
        files.append(path)
    return files, weight_map


def _open_safetensors(path: Path):
    """safe_open, with its header checked first so that every failure gets a plain sentence."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except IsADirectoryError:
        raise VloraError(f"{path}: is a folder, not a safetensors file") from None
    except OSError as e:
        raise VloraError(f"{path}: cannot be read ({e.strerror})") from None
    if size == 0:
        raise VloraError(f"{path}: is empty")
    if size < 8:
        raise VloraError(f"{path}: is truncated ({size} bytes, not even a header length)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
        if header_len > 100_000_000:
            raise VloraError(f"{path}: is not a safetensors file (no valid header length)")
        raise VloraError(f"{path}: is truncated (header needs {header_len} bytes, file has {size - 8})")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        msg = str(e).replace("Error while deserializing header: ", "")
        if "incomplete" in msg.lower() or "buffer" in msg.lower():
            raise VloraError(f"{path}: is truncated or damaged ({msg})") from None
        raise VloraError(f"{path}: is not a valid safetensors file ({msg})") from None
