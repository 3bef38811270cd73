"""Loose-JSON input: which files, their numbered lines, and the checks on one line.

A line is one JSON object; the text of each ``--json-keys`` key is a string, or a list of
strings that are already sentences (the format of Megatron's ``_ss`` sentence-split files).
A line that is not that raises ``LineProblem`` with the reason and a short snippet; the caller
adds the file and line number.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from typing import BinaryIO, Dict, Iterator, List, Sequence, Tuple, Union

SNIPPET_CHARS = 60
_UTF8_BOM = b"\xef\xbb\xbf"

Text = Union[str, List[str]]


class LineProblem(ValueError):
    """What is wrong with one input line: ``reason`` and a ``snippet`` of the line."""

    def __init__(self, reason: str, snippet: str):
        super().__init__(f"{reason}: {snippet}")
        self.reason = reason
        self.snippet = snippet


def resolve_inputs(pattern: str) -> List[str]:
    """``--input``: an existing file, or a glob (sorted, so the order is reproducible)."""
    if os.path.isfile(pattern):
        return [pattern]
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"--input {pattern!r} is neither a file nor a glob that matches files; check the path")
    return paths


def open_input(path: str) -> BinaryIO:
    """Open an input file for binary reading; ``.gz`` files are decompressed on the fly."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def numbered_lines(paths: Sequence[str]) -> Iterator[Tuple[int, int, bytes]]:
    """Every line of every file, as ``(file index, 1-based line number, raw bytes)``."""
    for file_index, path in enumerate(paths):
        with open_input(path) as f:
            for lineno, raw in enumerate(f, start=1):
                yield file_index, lineno, raw


def count_lines(paths: Sequence[str]) -> int:
    """Number of lines in all files (a last line without a newline counts)."""
    total = 0
    for path in paths:
        with open_input(path) as f:
            last = b"\n"
            for block in iter(lambda: f.read(1 << 22), b""):
                total += block.count(b"\n")
                last = block[-1:]
            total += last != b"\n"
    return total


def snippet_of(raw: bytes, around: int = 0) -> str:
    """Up to ``SNIPPET_CHARS`` characters of the line near byte ``around``, printable."""
    start = max(0, around - SNIPPET_CHARS // 2)
    piece = raw[start:start + SNIPPET_CHARS].rstrip(b"\r\n")
    text = piece.decode("utf-8", errors="backslashreplace")
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return ("..." if start else "") + text + ("..." if start + SNIPPET_CHARS < len(raw.rstrip(b"\r\n")) else "")


def decode_line(raw: bytes, lineno: int) -> str:
    """The line as text; invalid UTF-8 raises LineProblem with the byte offset."""
    if lineno == 1 and raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start:err.start + 1].hex()
        raise LineProblem(f"invalid UTF-8 (byte 0x{bad} at offset {err.start})", snippet_of(raw, err.start)) from None


def parse_document(raw: bytes, lineno: int, json_keys: Sequence[str]) -> Dict[str, Text]:
    """The texts of ``json_keys`` in one line; LineProblem if the line is not a valid document."""
    line = decode_line(raw, lineno)
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise LineProblem(f"malformed JSON ({err.msg} at column {err.colno})",
                          snippet_of(line.encode("utf-8"), len(line[:err.pos].encode("utf-8")))) from None
    if not isinstance(data, dict):
        raise LineProblem(f"expected a JSON object, got a {type(data).__name__}", snippet_of(raw))
    texts: Dict[str, Text] = {}
    for key in json_keys:
        if key not in data:
            present = ", ".join(repr(k) for k in list(data)[:8]) or "none"
            raise LineProblem(f"missing key {key!r} (keys present: {present}; choose keys with --json-keys)",
                              snippet_of(raw))
        value = data[key]
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            texts[key] = value
        else:
            raise LineProblem(
                f"key {key!r} holds a {type(value).__name__}, expected a string (or a list of sentence strings)",
                snippet_of(raw),
            )
    return texts
