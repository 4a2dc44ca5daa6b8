"""MinHash signatures of word shingles and the LSH banding that finds near-duplicate candidates.

MinHash (Broder 1997): for each of `num_perm` hash functions, the minimum over a document's shingle
hashes; two documents agree in one position with probability equal to the Jaccard similarity of
their shingle sets. LSH (Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3.4): cut
the signature into b bands of r rows; documents sharing any whole band are candidates, which are then
verified by the signatures' agreement. (b, r) minimise the false-positive plus false-negative area
of the S-curve 1 - (1 - s^r)^b around the Jaccard threshold (as datasketch does), false
negatives weighted 9 to 1.

The hash functions are multiply-shift: h_i(x) = high 32 bits of (a_i x + b_i) mod 2^64 with random
odd a_i. numpy computes a [num_perm, shingles] block at a time; bench/bench_clean.py measures it
against datasketch's MinHash on the same documents (README, "Cleaning a corpus").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_lite.data.cleaning.text import ngram_hashes

MAX_HASH = np.uint32(0xFFFFFFFF)
_BLOCK = 2048  # shingles per [num_perm, block] product: bounded memory for any document length


@dataclass(frozen=True)
class MinHasher:
    """num_perm hash functions over word `shingle_size`-grams; the same seed gives the same ones."""

    num_perm: int = 128
    shingle_size: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(1, 2**63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(
            1
        )
        b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)
        object.__setattr__(self, "_a", a[:, None])
        object.__setattr__(self, "_b", b[:, None])

    def shingles(self, wh: np.ndarray) -> np.ndarray:
        """Distinct shingle hashes of a document's word hashes; one shingle of every word when the
        document is shorter than a shingle, none when it has no words."""
        n = min(self.shingle_size, len(wh))
        return np.unique(ngram_hashes(wh, n)) if n else np.zeros(0, dtype=np.uint64)

    def signature(self, wh: np.ndarray) -> np.ndarray:
        """The document's MinHash signature from its word hashes; uint32 [num_perm]."""
        sh = self.shingles(wh)
        sig = np.full(self.num_perm, MAX_HASH, dtype=np.uint32)
        with np.errstate(over="ignore"):
            for start in range(0, len(sh), _BLOCK):
                block = sh[None, start : start + _BLOCK]  # [1, k]
                hv = ((self._a * block + self._b) >> np.uint64(32)).astype(np.uint32)  # [p, k]
                np.minimum(sig, hv.min(axis=1), out=sig)
        return sig


def jaccard_estimate(sig: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Share of positions where `sig` [p] agrees with each row of `others` [k, p]; [k]."""
    return (others == sig[None, :]).mean(axis=1)


def _integral(f, lo: float, hi: float) -> float:
    x = np.linspace(lo, hi, 201)
    y = f(x)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def lsh_params(threshold: float, num_perm: int, fn_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows) with bands x rows <= num_perm minimising the weighted false-positive and
    false-negative areas. Candidates are verified against the signatures, so a false positive costs
    only a comparison while a false negative keeps a duplicate: false negatives weigh 0.9."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--jaccard-threshold must be in (0, 1), got {threshold}")
    best, best_err = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _integral(lambda s, b=b, r=r: 1 - (1 - s**r) ** b, 0.0, threshold)
            fn = _integral(lambda s, b=b, r=r: (1 - s**r) ** b, threshold, 1.0)
            err = (1 - fn_weight) * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 key of each band (its rows and its index); equal keys = a shared band. [bands]."""
    m = sig[: bands * rows].reshape(bands, rows).astype(np.uint64)
    key = np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        for j in range(rows):
            key = (key ^ m[:, j]) * np.uint64(0x100000001B3)  # FNV-1a style over 32-bit rows
            key ^= key >> np.uint64(31)
    return key
