"""`.bin/.idx` files: byte layout against hand-built bytes, round trips, and clear errors for every
corrupt or truncated pair."""

import struct

import numpy as np
import pytest
from data_util import run_tool, write_documents

from megatron_lite.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    token_dtype,
)


def reference_idx_bytes(dtype_code: int, lengths, itemsize: int, doc_idx) -> bytes:
    """The .idx bytes written out by hand from the format description (DESIGN.md)."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", n) for n in lengths)
    ptr = 0
    for n in lengths:
        out += struct.pack("<q", ptr)
        ptr += n * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_idx)
    return out


DOCS = [[5, 6, 7], [65000], [1, 2, 3, 4, 5], []]


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4), (np.int64, 5)])
def test_builder_writes_megatron_bytes(tmp_path, dtype, code):
    prefix = str(tmp_path / "d")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for d in DOCS[:3]:
        b.add_document(d)
    b.add_item([9, 9])  # a document of two sequences
    b.add_item([8])
    b.end_document()
    b.finalize(prefix + ".idx")
    lengths = [3, 1, 5, 2, 1]
    itemsize = np.dtype(dtype).itemsize
    want_idx = reference_idx_bytes(code, lengths, itemsize, [0, 1, 2, 3, 5])
    assert open(prefix + ".idx", "rb").read() == want_idx
    tokens = [5, 6, 7, 65000, 1, 2, 3, 4, 5, 9, 9, 8]
    fmt = {2: "<H", 4: "<i", 8: "<q"}[itemsize]
    assert open(prefix + ".bin", "rb").read() == b"".join(struct.pack(fmt, t) for t in tokens)


def test_reader_reads_hand_built_files(tmp_path):
    prefix = str(tmp_path / "hand")
    lengths, tokens = [2, 3], [10, 11, 20, 21, 22]
    (tmp_path / "hand.idx").write_bytes(reference_idx_bytes(4, lengths, 4, [0, 1, 2]))
    (tmp_path / "hand.bin").write_bytes(b"".join(struct.pack("<i", t) for t in tokens))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and len(ds) == 2 and ds.num_documents == 2
    assert ds[0].tolist() == [10, 11] and ds[1].tolist() == [20, 21, 22]
    assert ds.get(1, offset=1, length=2).tolist() == [21, 22]
    assert ds.document_indices.tolist() == [0, 1, 2]


def test_round_trip_with_empty_document(tmp_path):
    prefix = write_documents(str(tmp_path / "rt"), [np.array(d) for d in DOCS])
    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS
    assert ds.get(2, 3).tolist() == [4, 5]


def test_token_dtype_follows_vocab_size():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32
    assert token_dtype(128256) == np.int32


def _good_pair(tmp_path, name="c"):
    prefix = str(tmp_path / name)
    write_documents(prefix, [np.arange(4), np.arange(3)], np.int32)
    return prefix


def _corrupt(path, offset, data):
    raw = bytearray(open(path, "rb").read())
    raw[offset : offset + len(data)] = data
    open(path, "wb").write(bytes(raw))


CORRUPTIONS = {
    "magic": (lambda p: _corrupt(p + ".idx", 0, b"XXIDIDX"), r"c\.idx: not a Megatron index"),
    "version": (
        lambda p: _corrupt(p + ".idx", 9, struct.pack("<Q", 2)),
        r"c\.idx: index version 2",
    ),
    "dtype": (lambda p: _corrupt(p + ".idx", 17, b"\x09"), r"c\.idx: unknown dtype code 9"),
    "count": (
        lambda p: _corrupt(p + ".idx", 18, struct.pack("<Q", 3)),
        r"c\.idx: \d+ bytes, but its header \(3 sequences",
    ),
    "idx_truncated": (
        lambda p: open(p + ".idx", "r+b").truncate(40),
        r"c\.idx: \d+ bytes, but its header",
    ),
    "idx_header_truncated": (
        lambda p: open(p + ".idx", "r+b").truncate(20),
        r"c\.idx: truncated index file \(20 bytes",
    ),
    "bin_truncated": (
        lambda p: open(p + ".bin", "r+b").truncate(20),
        r"c\.bin: 20 bytes, but .*c\.idx describes 28 bytes",
    ),
    "bin_too_long": (
        lambda p: open(p + ".bin", "ab").write(b"\x00" * 4),
        r"c\.bin: 32 bytes, but .*describes 28 bytes",
    ),
    "pointer": (
        lambda p: _corrupt(p + ".idx", 34 + 8 + 8, struct.pack("<q", 12)),
        r"c\.idx: corrupt index: sequence 1 points at byte 12",
    ),
    "doc_indices": (
        lambda p: _corrupt(p + ".idx", 34 + 8 + 16 + 16, struct.pack("<q", 5)),
        r"c\.idx: corrupt document indices",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_pair_gives_clear_error_naming_file(tmp_path, case):
    prefix = _good_pair(tmp_path)
    IndexedDataset(prefix)  # intact: opens
    damage, message = CORRUPTIONS[case]
    damage(prefix)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(prefix)


def test_missing_bin_names_the_file(tmp_path):
    prefix = _good_pair(tmp_path)
    (tmp_path / "c.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"c\.bin: no such file"):
        IndexedDataset(prefix)


def test_merge_tool_concatenates_in_order(tmp_path):
    a = write_documents(str(tmp_path / "a"), [np.array([1, 2]), np.array([3])])
    b = write_documents(str(tmp_path / "b"), [np.array([4, 5, 6])])
    out = str(tmp_path / "m")
    r = run_tool("merge_datasets.py", "--input", a, b, "--output-prefix", out)
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(out)
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4, 5, 6]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3]
    write_documents(str(tmp_path / "w"), [np.array([1])], np.int32)
    r = run_tool(
        "merge_datasets.py", "--input", a, str(tmp_path / "w"), "--output-prefix", out + "2"
    )
    assert r.returncode == 1 and "dtype int32 differs" in r.stderr
    assert not list(tmp_path.glob("m2*"))
