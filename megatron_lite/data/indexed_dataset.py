"""Megatron's `.bin/.idx` token files (megatron-core `MMIDIDX` format): a builder and a mmap reader.

`.idx`, little-endian: 9-byte magic `MMIDIDX\\x00\\x00`, `<Q` version (1), `<B` dtype code, `<Q` sequence
count, `<Q` document count (documents + 1), then int32 sequence lengths, int64 sequence byte pointers
into `.bin`, int64 document indices (0 first, the sequence count last). `.bin` is the tokens,
concatenated. Files written here are read by megatron-core and vice versa.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Sequence

import numpy as np

from megatron_lite.errors import DataError, UserFileNotFoundError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes
DTYPES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


class IndexedDatasetError(DataError):
    """A corrupt, truncated or mismatched `.bin/.idx` pair; the message names the file."""


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def token_dtype(vocab_size: int | None) -> type:
    """uint16 when every id fits comfortably (Megatron's rule: vocab < 65500), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def write_index(
    path: str,
    dtype: type,
    sequence_lengths: np.ndarray,
    document_indices: np.ndarray,
) -> None:
    """Write an `.idx` file; the byte pointers are derived from the lengths and the dtype."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", DTYPE_CODES[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.astype("<i4").tobytes(order="C"))
        f.write(pointers.astype("<i8").tobytes(order="C"))
        f.write(docs.astype("<i8").tobytes(order="C"))


class IndexedDatasetBuilder:
    """Appends sequences to a `.bin` file; `finalize(idx_path)` writes the matching `.idx`.

    One sequence per document is the usual GPT case (`add_document(tokens)`); `add_item` +
    `end_document` build documents of several sequences (sentences), as Megatron's builder does.
    """

    def __init__(self, bin_path: str, dtype: type = np.int32) -> None:
        if np.dtype(dtype) not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {dtype}; use one of {list(DTYPE_CODES)}")
        self.dtype = np.dtype(dtype).type
        self._file = open(bin_path, "wb")  # noqa: SIM115  (closed in finalize)
        self.bin_path = bin_path
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        array = np.asarray(tokens, dtype=self.dtype)
        self._file.write(array.tobytes(order="C"))
        self.sequence_lengths.append(array.size)

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(
        self, tokens: Sequence[int] | np.ndarray, lengths: Sequence[int] | None = None
    ):
        """Add one document: all of `tokens` as one sequence, or split by `lengths`."""
        array = np.asarray(tokens, dtype=self.dtype)
        self._file.write(array.tobytes(order="C"))
        self.sequence_lengths.extend([array.size] if lengths is None else list(lengths))
        self.end_document()

    def add_index(self, prefix: str) -> None:
        """Append a whole existing `.bin/.idx` pair (same dtype) after what was added so far."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{index_file_path(prefix)}: token dtype {np.dtype(other.dtype).name} differs from "
                f"the output's {np.dtype(self.dtype).name}; merge only files of one tokenizer"
            )
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(other.sequence_lengths.tolist())
        self.document_indices.extend((other.document_indices[1:] + offset).tolist())
        del other
        with open(data_file_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._file, length=16 << 20)

    def finalize(self, idx_path: str) -> None:
        self._file.close()
        write_index(idx_path, self.dtype, np.array(self.sequence_lengths), self.document_indices)


def _read_header(path: str, size: int) -> tuple[type, int, int]:
    if size < HEADER_SIZE:
        raise IndexedDatasetError(
            f"{path}: truncated index file ({size} bytes, the header alone is {HEADER_SIZE})"
        )
    with open(path, "rb") as f:
        header = f.read(HEADER_SIZE)
    if header[:9] != MAGIC:
        raise IndexedDatasetError(
            f"{path}: not a Megatron index file (magic {header[:9]!r}, expected {MAGIC!r})"
        )
    (version,) = struct.unpack("<Q", header[9:17])
    if version != VERSION:
        raise IndexedDatasetError(f"{path}: index version {version}, expected {VERSION}")
    code = header[17]
    if code not in DTYPES:
        raise IndexedDatasetError(
            f"{path}: unknown dtype code {code}, expected one of {sorted(DTYPES)}"
        )
    sequence_count, document_count = struct.unpack("<QQ", header[18:34])
    return DTYPES[code], sequence_count, document_count


class IndexedDataset:
    """Memory-mapped reader of a `.bin/.idx` pair; item i is sequence i as a numpy array.

    The header and the arrays are checked on open: magic, version, dtype code, that the index
    holds exactly the arrays its counts promise, that the document indices are monotone from 0 to
    the sequence count, and that the sequences fit in `.bin`. Anything wrong raises
    `IndexedDatasetError` naming the file.
    """

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise UserFileNotFoundError(
                    f"{p}: no such file (dataset prefix {path_prefix!r} needs both .bin and .idx)"
                )
        idx_size = os.path.getsize(idx_path)
        self.dtype, n_seq, n_doc = _read_header(idx_path, idx_size)
        expected = HEADER_SIZE + n_seq * 4 + n_seq * 8 + n_doc * 8
        if idx_size != expected:
            raise IndexedDatasetError(
                f"{idx_path}: {idx_size} bytes, but its header ({n_seq} sequences, {n_doc} "
                f"document indices) needs {expected}: the file is truncated or corrupt"
            )
        self._idx_mmap = np.memmap(idx_path, mode="r", dtype=np.uint8)
        buf = self._idx_mmap
        off = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(buf, dtype="<i4", count=n_seq, offset=off)
        off += n_seq * 4
        self.sequence_pointers = np.frombuffer(buf, dtype="<i8", count=n_seq, offset=off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=n_doc, offset=off)
        self._validate(idx_path, bin_path, n_seq, n_doc)
        bin_size = os.path.getsize(bin_path)
        # np.memmap refuses empty files; an empty dataset gets an empty array instead
        self._bin = (
            np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)
        )

    def _validate(self, idx_path: str, bin_path: str, n_seq: int, n_doc: int) -> None:
        docs, lengths = self.document_indices, self.sequence_lengths
        if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0):
            raise IndexedDatasetError(
                f"{idx_path}: corrupt document indices (must rise from 0 to the sequence count "
                f"{n_seq}; got first {docs[0] if n_doc else None}, last "
                f"{docs[-1] if n_doc else None})"
            )
        if n_seq == 0:
            return
        if lengths.min() < 0:
            raise IndexedDatasetError(f"{idx_path}: corrupt index (negative sequence length)")
        itemsize = np.dtype(self.dtype).itemsize
        ptrs = self.sequence_pointers
        expected_ptrs = np.concatenate(([0], np.cumsum(lengths[:-1], dtype=np.int64) * itemsize))
        if not np.array_equal(ptrs, expected_ptrs):
            bad = int(np.argmax(ptrs != expected_ptrs))
            raise IndexedDatasetError(
                f"{idx_path}: corrupt index: sequence {bad} points at byte {ptrs[bad]}, but the "
                f"lengths before it put it at byte {expected_ptrs[bad]}"
            )
        need = int(ptrs[-1]) + int(lengths[-1]) * itemsize
        have = os.path.getsize(bin_path)
        if have != need:
            raise IndexedDatasetError(
                f"{bin_path}: {have} bytes, but {idx_path} describes {need} bytes "
                f"({n_seq} sequences of {np.dtype(self.dtype).name}): the pair is truncated or "
                f"does not belong together"
            )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of sequence `idx` (to its end when length is None)."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        itemsize = np.dtype(self.dtype).itemsize
        start = int(self.sequence_pointers[idx]) + offset * itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> None:
    """Concatenate `.bin/.idx` pairs (same dtype) into one, in the given order."""
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    dtype = IndexedDataset(prefixes[0]).dtype
    builder = IndexedDatasetBuilder(data_file_path(output_prefix), dtype)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(index_file_path(output_prefix))
