"""The loss a model scores by ignoring context: the entropy of the token distribution.

    python tools/unigram_baseline.py --data-path PREFIX [--vocab-size N]

A pretraining run has learned something real only when its validation loss is well below this
figure (in nats, the unit of `lm loss`); its perplexity is exp(entropy).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_lite.data.indexed_dataset import IndexedDataset  # noqa: E402


def unigram_entropy(prefix: str) -> tuple[float, int]:
    """(entropy in nats of the token frequencies of the whole dataset, number of tokens)."""
    ds = IndexedDataset(prefix)
    counts = np.zeros(0, dtype=np.int64)
    for i in range(len(ds)):
        c = np.bincount(ds[i].astype(np.int64))
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[: len(c)] += c
    total = int(counts.sum())
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum()), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-path", required=True, help="dataset prefix (without .bin/.idx)")
    args = ap.parse_args()
    h, n = unigram_entropy(args.data_path)
    print(f"unigram baseline over {n:,} tokens: loss {h:.4f} nats, perplexity {math.exp(h):.1f}")


if __name__ == "__main__":
    main()
