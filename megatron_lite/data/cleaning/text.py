"""Words, deterministic hashes and n-gram hashes shared by dedup, MinHash and decontamination.

Every hash here is the same in every process and on every machine (no Python `hash()`, which is
salted per interpreter), so shards cleaned by different SLURM tasks agree on their keys.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

WORD_RE = re.compile(r"\w+", re.UNICODE)
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd constant of the polynomial n-gram hash


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed: what "the same text" means for exact dedup."""
    return " ".join(text.lower().split())


def exact_key(text: str) -> int:
    """64-bit key of the normalised text (blake2b)."""
    digest = hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def words(text: str) -> list[str]:
    """Lower-cased runs of letters/digits: the units of shingles and of 13-gram decontamination."""
    return WORD_RE.findall(text.lower())


_CACHE: dict[str, int] = {}  # per process: words repeat (Zipf), a lookup beats crc32


def _word_hash(w: str) -> int:
    h = _CACHE.get(w)
    if h is None:
        h = _CACHE[w] = ((zlib.crc32(w.encode("utf-8")) + 1) * int(_MIX)) & 0xFFFFFFFFFFFFFFFF
    return h


def word_hashes(ws: list[str]) -> np.ndarray:
    """uint64 hash (crc32, spread to 64 bits) of each word; [n_words]."""
    if len(_CACHE) > 200_000:  # ~25 MiB at most
        _CACHE.clear()
    return np.fromiter(map(_word_hash, ws), dtype=np.uint64, count=len(ws))


def ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every run of `n` consecutive words; [max(n_words - n + 1, 0)].

    h = sum_j wh[i + j] * M^(n-1-j) mod 2^64 with an odd M (Horner's rule, wrapping arithmetic).
    A document shorter than n words gives no n-gram.
    """
    m = len(wh) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = wh[:m].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            out *= _MIX
            out += wh[j : j + m]
        out ^= out >> np.uint64(29)  # mix the high bits down (the MinHash takes the low 32)
    return out
