"""Which text encoding a CSV file is in, and where it stops being that encoding.

Why: pyarrow reads UTF-8 only unless told otherwise; a UTF-16 export (Excel's "Unicode
text") parsed as UTF-8 is one column of garbage ("Expected 5 columns, got 1"), and one
Latin-1 byte in a UTF-8 file ends the read with "Invalid UTF8 payload": neither names the
file, the line or the column, nor the `encoding` setting. Here a byte-order mark (or the NUL
pattern of BOM-less UTF-16) picks the encoding, a source's `encoding` setting overrides the
default, and a bad byte is reported by file, line and column name, never by the row's values.
"""

from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path
from typing import IO

__all__ = [
    "detect_encoding",
    "locate_ragged_row",
    "locate_undecodable",
    "normalize_encoding",
    "read_head",
]

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_PIECE = 1 << 20


def normalize_encoding(encoding: str) -> str:
    """Python's canonical name ('latin-1' -> 'iso8859-1'); ValueError naming an unknown one."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(
            f"unknown text encoding {encoding!r} (e.g. utf-8, latin-1, cp1252, utf-16)"
        ) from None


def detect_encoding(head: bytes, configured: str | None = None) -> tuple[str, int]:
    """(encoding, bytes of byte-order mark to skip) for a file starting with `head`. A BOM
    wins over the setting (it cannot be wrong about UTF-16); then the setting; then UTF-16
    without a BOM when every other byte of an ASCII-ish start is NUL; else UTF-8."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name, len(bom)
    if configured:
        return normalize_encoding(configured), 0
    sample = head[:4096]
    if len(sample) >= 4:
        even, odd = sample[0::2], sample[1::2]
        if odd.count(0) >= 0.9 * len(odd) and even.count(0) < 0.1 * len(even):
            return "utf-16-le", 0
        if even.count(0) >= 0.9 * len(even) and odd.count(0) < 0.1 * len(odd):
            return "utf-16-be", 0
    return "utf-8", 0


def read_head(where: Path | IO[bytes], size: int = 4096) -> bytes:
    """The first bytes of a file, leaving a stream where it was (b"" if it cannot seek)."""
    if isinstance(where, Path):
        with where.open("rb") as handle:
            return handle.read(size)
    if not where.seekable():
        return b""
    at = where.tell()
    head = where.read(size)
    where.seek(at)
    return bytes(head)


def locate_undecodable(
    where: Path | IO[bytes], encoding: str, delimiter: str = ","
) -> tuple[int, str] | None:
    """(line, column name) of the first byte that is not `encoding`, or None. The column is
    the header's name for the field the byte is in (quotes respected); no value is kept."""
    if isinstance(where, Path):
        handle: IO[bytes] = where.open("rb")
    elif where.seekable():
        where.seek(0)
        handle = where
    else:
        return None
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    text_before = io.StringIO()  # the current line's text so far, to count its fields
    header: list[str] | None = None
    line = 1
    try:
        while True:
            piece = handle.read(_PIECE)
            final = not piece
            try:
                text = decoder.decode(piece, final=final)
            except UnicodeDecodeError as exc:
                # exc.object: the decoder's pending bytes and this piece; valid up to start
                text = bytes(exc.object[: exc.start]).decode(encoding, "ignore")
                header, line = _advance(text, text_before, header, line)
                return line, _column(text_before.getvalue(), header, delimiter)
            header, line = _advance(text, text_before, header, line)
            if final:
                return None
    finally:
        if isinstance(where, Path):
            handle.close()


def _advance(
    text: str, current: io.StringIO, header: list[str] | None, line: int
) -> tuple[list[str] | None, int]:
    """Feed decoded text: complete lines advance the count (the first is the header)."""
    parts = text.split("\n")
    for part in parts[:-1]:
        current.write(part)
        if header is None:
            header = next(csv.reader([current.getvalue().lstrip("\ufeff")]), [])
        current.seek(0)
        current.truncate()
        line += 1
    current.write(parts[-1])
    return header, line


def _column(prefix: str, header: list[str] | None, delimiter: str) -> str:
    """The header's name of the field `prefix` (a line up to the bad byte) ends in."""
    fields = next(csv.reader([prefix], delimiter=delimiter), [""])
    index = max(len(fields) - 1, 0)
    if header is None:
        return f"#{index + 1} of the header"
    return repr(header[index]) if index < len(header) else f"#{index + 1}"


def locate_ragged_row(
    where: Path | IO[bytes], encoding: str, delimiter: str = ","
) -> tuple[int, int, int] | None:
    """(line, header width, row width) of the first record whose width is not the header's."""
    if isinstance(where, Path):
        raw: IO[bytes] = where.open("rb")
    elif where.seekable():
        where.seek(0)
        raw = where
    else:
        return None
    text = io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline="")
    try:
        reader = csv.reader(text, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return None
        for row in reader:
            if row and len(row) != len(header):
                return reader.line_num, len(header), len(row)
        return None
    finally:
        text.detach()  # the caller's stream stays open
        if isinstance(where, Path):
            raw.close()
