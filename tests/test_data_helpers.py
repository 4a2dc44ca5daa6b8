"""csrc/helpers.cpp and its numpy twins give identical arrays on random inputs."""

import numpy as np
import pytest

from megatron_lite import _extensions
from megatron_lite.data import helpers


@pytest.fixture(scope="module")
def ext():
    module = _extensions.load("_helpers")
    assert module is not None, "csrc/helpers.cpp is not built: run `make build`"
    return module


def megatron_walk(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, drop_last, extra):
    """Megatron's documented procedure, step by step in plain Python: the spec both follow."""
    total = num_epochs * tokens_per_epoch - extra
    n = total // seq_length if drop_last else -(-total // seq_length)
    rows, d, off = [(0, 0)], 0, 0
    for _ in range(n):
        remaining = seq_length + extra
        while remaining:
            length = int(sizes[doc_idx[d]]) - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - extra
                remaining = 0
            elif d == len(doc_idx) - 1:
                off = int(sizes[doc_idx[d]]) - extra
                break
            else:
                d, off = d + 1, 0
        rows.append((d, off))
    return np.array(rows)


def random_case(rng):
    n_seq = int(rng.integers(1, 40))
    sizes = rng.integers(0, 25, size=n_seq).astype(np.int32)
    sizes[rng.integers(n_seq)] += 2  # at least two tokens somewhere
    docs = rng.permutation(n_seq)[: int(rng.integers(1, n_seq + 1))].astype(np.int32)
    if sizes[docs].sum() < 2:
        docs = np.array([int(np.argmax(sizes))], dtype=np.int32)
    epochs = int(rng.integers(1, 4))
    doc_idx = np.tile(docs, epochs)
    rng.shuffle(doc_idx)
    return sizes, doc_idx, epochs, int(sizes[docs].sum())


def test_build_sample_idx_cpp_equals_numpy_and_megatron_walk(ext):
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(400):
        sizes, doc_idx, epochs, tpe = random_case(rng)
        seq = int(rng.integers(2, 30))
        for drop in (True, False):
            for extra in (1, 0):
                args = (seq, epochs, tpe, drop, extra)
                got = ext.build_sample_idx(sizes, doc_idx, *args)
                want = helpers.build_sample_idx_numpy(sizes, doc_idx, *args)
                assert got.dtype == want.dtype == np.int32
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(got, megatron_walk(sizes, doc_idx, *args))
                checked += len(got)
    assert checked > 1000


def test_build_sample_idx_rows_are_stream_positions(ext):
    sizes = np.array([5, 3, 0, 7, 4], dtype=np.int32)
    doc_idx = np.array([0, 1, 2, 3, 4], dtype=np.int32)  # stream of 19 tokens
    rows = ext.build_sample_idx(sizes, doc_idx, 4, 1, 19, True, 1)
    # samples start at 0, 4, 8, 12, 16 (last ends at 20 > 19 - 1: dropped -> 4 samples)
    assert rows.tolist() == [[0, 0], [0, 4], [3, 0], [3, 4], [4, 1]]


def test_sample_idx_dtype_is_int32_until_values_overflow_it():
    small = helpers._sample_idx_dtype(np.array([2**31 - 1]), np.zeros(3, np.int32))
    large = helpers._sample_idx_dtype(np.array([2**31], dtype=np.int64), np.zeros(3, np.int32))
    assert small == np.int32 and large == np.int64


def test_build_blending_indices_cpp_equals_numpy(ext):
    rng = np.random.default_rng(1)
    for _ in range(30):
        w = rng.random(int(rng.integers(1, 8)))
        w /= w.sum()
        size = int(rng.integers(0, 3000))
        got = ext.build_blending_indices(w, size)
        want = helpers.build_blending_indices_numpy(w, size)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        if size:
            counts = np.bincount(got[0], minlength=len(w))
            assert np.all(np.abs(counts - w * size) <= 1.0 + 1e-9)
            for d in range(len(w)):  # each dataset's samples are taken in order 0, 1, 2, ...
                assert got[1][got[0] == d].tolist() == list(range(counts[d]))
