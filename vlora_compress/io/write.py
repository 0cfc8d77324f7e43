"""Write safetensors files atomically and one tensor at a time.

``safetensors.torch.save_file`` wants every tensor in memory at once. The plan fixes every stored
tensor's name, dtype and shape before any math runs, so the header can be written first and the
data streamed after it; peak memory is then one tensor, whatever the model's size. The file appears
under its final name only when complete: temp file beside the target, fsync, rename.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..io.checkpoint import DTYPES, ITEMSIZE
from ..errors import VloraError

Entry = tuple[str, str, tuple[int, ...]]


def check_output(out: Path, force: bool) -> None:
    """Refuse early, before any work, an output we could not or should not write."""
    parent = out.parent
    if out.is_dir():
        raise VloraError(f"{out}: is a folder; name an output file")
    if out.exists() and not force:
        raise VloraError(f"{out}: already exists; pass `force` to overwrite it")
    if not parent.exists():
        raise VloraError(f"{parent}: output folder does not exist")
    if not parent.is_dir():
        raise VloraError(f"{parent}: output folder is not a folder")
    if not os.access(parent, os.W_OK):
        raise VloraError(f"{parent}: output folder is not writable")


class SafetensorsWriter:
    """Context manager: declare the layout, then ``write`` each tensor once, in any order.

    The header (and so every tensor's offset) is fixed by the layout, so a tensor is written at its
    place whenever it is ready: the sequential compressor fits layer by layer while the layout is
    family by family, and nothing has to wait in memory for its turn."""

    def __init__(self, path: str | Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = {}
        self._written: set[str] = set()
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in entries:
            if name in header:
                raise ValueError(f"duplicate tensor name {name!r}")
            n = ITEMSIZE[dtype]
            for d in shape:
                n *= d
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.entries[name] = (dtype, tuple(shape), offset)
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._header = struct.pack("<Q", len(raw)) + raw
        self.nbytes = len(self._header) + offset

    def __enter__(self) -> "SafetensorsWriter":
        fd, self._tmp = _temp_beside(self.path)
        self._file = os.fdopen(fd, "wb")
        self._file.write(self._header)
        self._file.truncate(self.nbytes)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape, offset = self.entries.get(name, (None, None, None))
        if dtype is None or name in self._written or tensor.dtype != DTYPES[dtype] or tuple(tensor.shape) != shape:
            want = f"{dtype}{list(shape)}" if dtype else "nothing of that name"
            raise ValueError(f"writer expected {want} for {name}{' once' if name in self._written else ''}, "
                             f"got {tensor.dtype}{list(tensor.shape)}")
        self._written.add(name)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # the CPU only here
        self._file.seek(len(self._header) + offset)
        self._file.write(memoryview(data))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and len(self._written) != len(self.entries):
                missing = next(n for n in self.entries if n not in self._written)
                raise ValueError(f"writer got {len(self._written)} of {len(self.entries)} tensors ({missing!r} missing)")
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
                _fsync_dir(self.path.parent)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | Path):
    """Yield a temp path beside ``path``; on success fsync it and rename it into place."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temp_beside(path: Path) -> tuple[int, Path]:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise VloraError(f"{path.parent}: cannot write there ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
    return fd, Path(tmp)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Tensors kept on disk until the layout that places them is known: planning by blocks fits a
    block before the next is planned, and the file's header holds the whole plan. A temp file beside
    the output, appended to and read back one tensor at a time; gone on close."""

    def __init__(self, beside: str | Path):
        fd, self.path = _temp_beside(Path(beside))
        self._file = os.fdopen(fd, "w+b")
        self.index: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}  # dtype, shape, offset, bytes

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.index:
            raise ValueError(f"spool got {name} twice")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # the CPU only here
        self._file.seek(0, os.SEEK_END)
        self.index[name] = (tensor.dtype, tuple(tensor.shape), self._file.tell(), data.nbytes)
        self._file.write(memoryview(data))

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, offset, n = self.index[name]
        self._file.seek(offset)
        raw = bytearray(self._file.read(n))
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
