"""Metrics as lm-evaluation-harness computes them (acc, acc_norm, exact match, perplexities, pass@k)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np


def acc(lls: Sequence[float], gold: int) -> float:
    """1 when the gold choice has the highest log-likelihood (ties go to the first)."""
    return float(int(np.argmax(lls)) == gold)


def acc_norm(lls: Sequence[float], choices: Sequence[str], gold: int) -> float:
    """`acc` on log-likelihood per character of each choice (lm-eval's length normalisation)."""
    lengths = np.array([float(len(c)) for c in choices])
    return float(int(np.argmax(np.array(lls) / lengths)) == gold)


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def perplexity(lls: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood per item (LAMBADA's: per continuation)."""
    return math.exp(-float(np.mean(lls)))


def word_count(text: str) -> int:
    return len(re.split(r"\s+", text))


def word_perplexity(lls: Sequence[float], texts: Sequence[str]) -> float:
    """exp(-sum log-likelihood / number of words), words split on whitespace as lm-eval does."""
    return math.exp(-sum(lls) / sum(word_count(t) for t in texts))


def byte_perplexity(lls: Sequence[float], texts: Sequence[str]) -> float:
    return math.exp(-sum(lls) / sum(len(t.encode("utf-8")) for t in texts))


def bits_per_byte(lls: Sequence[float], texts: Sequence[str]) -> float:
    return -sum(lls) / sum(len(t.encode("utf-8")) for t in texts) / math.log(2)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 (section 2.1): 1 - C(n-c, k) / C(n, k), for n samples
    of which c pass, computed as a stable product."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
