"""Read local calibration and evaluation data: text, labelled text, sentence pairs and images.

Every reader refuses bad data with one sentence naming the file: empty, not text, the wrong
modality for the model, or a malformed line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import VloraError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
BUNDLED = Path(__file__).resolve().parent.parent / "data"


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Samples from plain text (one per non-empty line) or JSONL (a "text" field per line)."""
    path = _existing(path)
    if path.is_dir() or path.suffix == ".npz":
        raise VloraError(f"{path}: holds images, but this model takes text (give a .txt or .jsonl file)")
    if path.suffix == ".jsonl":
        texts = [_field(row, ("text", "sentence"), path, n) for n, row in _jsonl(path)]
    else:
        texts = [line.strip() for line in _text(path).splitlines() if line.strip()]
    if not texts:
        raise VloraError(f"{path}: holds no text")
    return texts[:limit] if limit else texts


def read_corpus(path: str | Path) -> str:
    """One running text, for perplexity: a plain file as it is, or JSONL texts joined by blank lines."""
    path = _existing(path)
    if path.suffix == ".jsonl":
        return "\n\n".join(read_texts(path))
    if path.is_dir() or path.suffix == ".npz":
        raise VloraError(f"{path}: holds images, but perplexity needs text")
    text = _text(path)
    if not text.strip():
        raise VloraError(f"{path}: holds no text")
    return text


def read_pairs(path: str | Path) -> list[tuple[str, str, float]] | None:
    """Sentence pairs with gold scores (JSONL: sentence1, sentence2, score), or None if the file has none."""
    path = _existing(path)
    if path.suffix != ".jsonl":
        return None
    rows = list(_jsonl(path))
    if not rows or "sentence1" not in rows[0][1]:
        return None
    out = []
    for n, row in rows:
        try:
            out.append((str(row["sentence1"]), str(row["sentence2"]), float(row["score"])))
        except (KeyError, TypeError, ValueError):
            raise VloraError(f"{path}: line {n} needs sentence1, sentence2 and a numeric score") from None
    return out


def read_labelled(path: str | Path) -> list[tuple[object, str]]:
    """(sample, label) pairs: JSONL with text and label, CSV with text and label columns, or a folder
    of images in one sub-folder per class."""
    path = _existing(path)
    if path.is_dir():
        return [(img, label) for img, label in _image_folder(path, labelled=True)]
    if path.suffix == ".jsonl":
        return [(_field(row, ("text", "sentence"), path, n), str(_field(row, ("label",), path, n)))
                for n, row in _jsonl(path)]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
                raise VloraError(f"{path}: a CSV needs 'text' and 'label' columns")
            rows = [(r["text"], r["label"]) for r in reader]
        if not rows:
            raise VloraError(f"{path}: holds no rows")
        return rows
    raise VloraError(f"{path}: labelled data is a .jsonl or .csv file, or a folder of class sub-folders")


def read_images(path: str | Path, limit: int | None = None) -> list:
    """Images from a folder (recursively) or an .npz array of shape (N, H, W, C) or (N, C, H, W)."""
    path = _existing(path)
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path) as npz:
                arrays = [npz[k] for k in npz.files]
        except (OSError, ValueError) as e:
            raise VloraError(f"{path}: not a readable .npz ({e})") from None
        if not arrays or arrays[0].ndim != 4:
            raise VloraError(f"{path}: needs an array of images shaped (N, H, W, C) or (N, C, H, W)")
        images = list(arrays[0])
    elif path.is_dir():
        images = [img for img, _ in _image_folder(path, labelled=False)]
    else:
        raise VloraError(f"{path}: holds text, but this model takes images (give a folder of images or .npz)")
    if not images:
        raise VloraError(f"{path}: holds no images")
    return images[:limit] if limit else images


def _image_folder(folder: Path, labelled: bool):
    try:
        from PIL import Image
    except ImportError:
        raise VloraError("reading images needs Pillow: pip install pillow") from None
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise VloraError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for p in files:
        if labelled and p.parent == folder:
            raise VloraError(f"{folder}: put each image in a sub-folder named after its class ({p.name} is not)")
        try:
            img = Image.open(p).convert("RGB")
        except OSError:
            raise VloraError(f"{p}: is not a readable image") from None
        yield img, p.parent.name


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise VloraError(f"{path}: no such file or folder")
    return path


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise VloraError(f"{path}: is not UTF-8 text") from None


def _jsonl(path: Path):
    for n, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise VloraError(f"{path}: line {n} is not valid JSON") from None
        if not isinstance(row, dict):
            raise VloraError(f"{path}: line {n} is not a JSON object")
        yield n, row


def _field(row: dict, names: tuple[str, ...], path: Path, n: int):
    for name in names:
        if name in row:
            return row[name]
    raise VloraError(f"{path}: line {n} has no {' or '.join(repr(x) for x in names)} field")
