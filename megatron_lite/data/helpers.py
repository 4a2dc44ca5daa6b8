"""Dataset index helpers: the C++ extension (csrc/helpers.cpp) when built, numpy otherwise.

Both implementations give identical arrays (tests/test_data_helpers.py checks it).
"""

from __future__ import annotations

import numpy as np

from megatron_lite import _extensions


def build_blending_indices_numpy(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blending: sample i comes from argmax_d (w[d] * max(i, 1) - count[d])."""
    weights = np.asarray(weights, dtype=np.float64)
    counts = np.zeros(len(weights), dtype=np.int64)
    dataset_index = np.empty(size, dtype=np.uint8)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for i in range(size):
        d = int(np.argmax(weights * max(i, 1) - counts))
        dataset_index[i] = d
        dataset_sample_index[i] = counts[d]
        counts[d] += 1
    return dataset_index, dataset_sample_index


def build_blending_indices(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index uint8[size], dataset_sample_index int64[size]) for normalized `weights`."""
    ext = _extensions.load("_helpers")
    if ext is None:
        return build_blending_indices_numpy(weights, size)
    return ext.build_blending_indices(np.asarray(weights, dtype=np.float64), int(size))
