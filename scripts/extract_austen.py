"""Make the shipped calibration and evaluation text from Debian's r-cran-janeaustenr package.

The novels are in the public domain. The package stores them as an R lazy-load database of
character vectors (one element per printed line); this reads that format directly, joins lines
into paragraphs, splits paragraphs into sentences and writes one sentence per line:

- calibration: Pride and Prejudice (1813);
- evaluation: Persuasion (1818), a different novel, so calibration and evaluation never share text;
- training (healing): Emma (1815), a third novel, so healing never sees either of the other two.

    apt-get download r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb /tmp/ja
    python scripts/extract_austen.py /tmp/ja/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "vlora_compress" / "data"
BOOKS = {
    "PRIDE AND PREJUDICE": ("austen-calibration.txt", 1024),
    "Persuasion": ("austen-evaluation.txt", 512),
    "EMMA": ("austen-training.txt", 4096),
}


def read_rdb(path: Path) -> list[list[str]]:
    """Each record: a 4-byte length, then a zlib stream of an R XDR serialisation of a STRSXP."""
    raw = path.read_bytes()
    books, pos = [], 0
    while pos < len(raw):
        z = zlib.decompressobj()
        data = z.decompress(raw[pos + 4:])
        pos = len(raw) - len(z.unused_data)
        i = data.index(b"UTF-8") + 5
        flags, n = struct.unpack(">II", data[i:i + 8])
        i += 8
        assert flags & 0xFF == 0x10, "expected a character vector"
        lines = []
        for _ in range(n):
            _, length = struct.unpack(">Ii", data[i:i + 8])
            i += 8
            if length < 0:  # NA
                lines.append("")
                continue
            lines.append(data[i:i + length].decode("utf-8"))
            i += length
        books.append(lines)
    return books


def sentences(lines: list[str]) -> list[str]:
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    out = []
    for p in paragraphs:
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", p):
            s = s.replace("_", "").strip()
            if 8 <= len(s.split()) <= 60 and not s.isupper():
                out.append(s)
    return out


def main() -> None:
    books = read_rdb(Path(sys.argv[1]))
    OUT.mkdir(exist_ok=True)
    for lines in books:
        title = next(line for line in lines if line.strip())
        if title in BOOKS:
            name, count = BOOKS[title]
            picked = sentences(lines)
            step = max(1, len(picked) // count)  # spread over the whole novel
            chosen = picked[::step][:count]
            (OUT / name).write_text("\n".join(chosen) + "\n", encoding="utf-8")
            print(f"{name}: {len(chosen)} sentences from {title} ({len(picked)} available)")


if __name__ == "__main__":
    main()
