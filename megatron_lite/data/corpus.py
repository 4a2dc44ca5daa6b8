"""Reading raw corpora: `.jsonl` / `.jsonl.gz` (one JSON object per line) and plain text files.

Shared by tools/preprocess_data.py and tools/train_tokenizer.py, so both report a bad line the same
way: file and line number.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from typing import IO

from megatron_lite.errors import DataError


class BadLineError(DataError):
    """A JSONL line that is not a JSON object or lacks a requested key."""

    def __init__(self, path: str, lineno: int, reason: str) -> None:
        super().__init__(f"{path}:{lineno}: {reason}")
        self.path, self.lineno, self.reason = path, lineno, reason


def open_text(path: str) -> IO[str]:
    """Open a (possibly gzip-compressed, by its .gz suffix) UTF-8 text file."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def is_jsonl(path: str) -> bool:
    return path.removesuffix(".gz").endswith((".jsonl", ".json"))


def iter_lines(paths: Sequence[str]) -> Iterator[tuple[str, int, str]]:
    """(path, 1-based line number, line) for every non-blank line of the files, in order.

    Bytes that are not UTF-8 come through as lone surrogates (`surrogateescape`), so that
    `parse_json_line` reports that line as bad (and --skip-bad-lines can skip it); a truncated or
    corrupt `.gz` raises DataError naming the file and the last whole line.
    """
    for path in paths:
        lineno = 0
        try:
            with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    line = raw.decode("utf-8", "surrogateescape")
                    if line.strip():
                        yield path, lineno, line
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(
                f"{path}: truncated or corrupt gzip file, after line {lineno} ({e}); "
                "re-create or re-download it"
            ) from None


def check_utf8(text: str, path: str, lineno: int) -> None:
    """BadLineError for text holding bytes that were not UTF-8 (see iter_lines)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00
        raise BadLineError(
            path, lineno, f"not valid UTF-8 (byte {byte:#04x} at character {e.start + 1})"
        ) from None


def parse_json_object(line: str, path: str, lineno: int) -> dict:
    """One JSONL line as a JSON object, or BadLineError saying what is wrong."""
    check_utf8(line, path, lineno)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLineError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadLineError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_json_line(line: str, keys: Sequence[str], path: str, lineno: int) -> dict[str, str]:
    """The requested string fields of one JSONL line, or BadLineError saying what is wrong."""
    obj = parse_json_object(line, path, lineno)
    out = {}
    for key in keys:
        if key not in obj:
            raise BadLineError(
                path, lineno, f"no key {key!r} (--json-keys); the line has {sorted(obj)[:10]}"
            )
        value = obj[key]
        if not isinstance(value, str):
            raise BadLineError(path, lineno, f"key {key!r} is {type(value).__name__}, not a string")
        out[key] = value
    return out


def iter_documents(paths: Sequence[str], key: str = "text") -> Iterator[str]:
    """Document texts: field `key` of each JSONL line, or each plain text file as one document."""
    for path in paths:
        if is_jsonl(path):
            for p, lineno, line in iter_lines([path]):
                yield parse_json_line(line, [key], p, lineno)[key]
        else:
            with open(path, "rb") as f:
                data = f.read()
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as e:
                lineno = data.count(b"\n", 0, e.start) + 1
                raise BadLineError(
                    path, lineno, f"not valid UTF-8 (byte {data[e.start]:#04x})"
                ) from None
