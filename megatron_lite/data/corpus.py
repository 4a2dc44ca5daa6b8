"""Reading raw corpora: `.jsonl` / `.jsonl.gz` (one JSON object per line) and plain text files.

Shared by tools/preprocess_data.py and tools/train_tokenizer.py, so both report a bad line the same
way: file and line number.
"""

from __future__ import annotations

import gzip
import json
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
    """(path, 1-based line number, line) for every non-blank line of the files, in order."""
    for path in paths:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield path, lineno, line


def parse_json_line(line: str, keys: Sequence[str], path: str, lineno: int) -> dict[str, str]:
    """The requested string fields of one JSONL line, or BadLineError saying what is wrong."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLineError(path, lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadLineError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
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
            with open_text(path) as f:
                yield f.read()
