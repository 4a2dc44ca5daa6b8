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


def _sample_idx_dtype(sizes: np.ndarray, document_idx: np.ndarray) -> type:
    """int32 rows when every stored value fits (Megatron's choice), else int64."""
    max_value = max(len(document_idx), int(sizes.max()) if len(sizes) else 0)
    return np.int32 if max_value <= np.iinfo(np.int32).max else np.int64


def build_sample_idx_numpy(
    sizes: np.ndarray,
    document_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token: int = 1,
) -> np.ndarray:
    """Vectorized twin of the C++ walk: sample i starts at stream position p = i * seq_length, in
    the first document whose end lies beyond p + extra - 1 (so a sample that ends exactly at a
    document end moves to the next non-empty document), at offset p - that document's start."""
    if seq_length <= 1 or num_epochs <= 0 or tokens_per_epoch <= 1 or len(document_idx) == 0:
        raise ValueError(
            f"build_sample_idx: need seq_length > 1 ({seq_length}), num_epochs > 0 ({num_epochs}), "
            f"tokens_per_epoch > 1 ({tokens_per_epoch}) and documents ({len(document_idx)})"
        )
    total = num_epochs * tokens_per_epoch - add_extra_token
    if drop_last_partial_sequence:
        num_samples = total // seq_length
    else:
        num_samples = -(-total // seq_length)
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(document_idx)]
    ends = np.cumsum(lengths)  # stream position where each document ends
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    doc_pos = np.searchsorted(ends, positions + add_extra_token - 1, side="right")
    exhausted = doc_pos >= len(lengths)  # only the partial last sample, when not dropped
    doc_pos = np.minimum(doc_pos, len(lengths) - 1)
    offsets = positions - (ends[doc_pos] - lengths[doc_pos])
    offsets[exhausted] = lengths[-1] - add_extra_token
    out = np.zeros((num_samples + 1, 2), dtype=_sample_idx_dtype(np.asarray(sizes), document_idx))
    out[1:, 0] = doc_pos
    out[1:, 1] = offsets
    return out


def build_sample_idx(
    sizes: np.ndarray,
    document_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token: int = 1,
) -> np.ndarray:
    """Megatron's GPT sample index, [num_samples + 1, 2] rows of (document_idx position, offset)."""
    args = (seq_length, num_epochs, tokens_per_epoch, drop_last_partial_sequence, add_extra_token)
    ext = _extensions.load("_helpers")
    if ext is None:
        return build_sample_idx_numpy(sizes, document_idx, *args)
    return ext.build_sample_idx(
        np.ascontiguousarray(sizes, dtype=np.int32),
        np.ascontiguousarray(document_idx, dtype=np.int32),
        *args,
    )
