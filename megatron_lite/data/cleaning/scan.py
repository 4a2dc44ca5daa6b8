"""Pass 1, one shard of input files: stream every line through the filters (in `workers` processes)
and keep on disk only what pass 2 needs.

A shard's directory (`shard-00003/` under the work directory) holds the surviving lines in input
order (`spill-<file>.jsonl`, each prefixed by its input line number), their MinHash signatures
(`signatures.u32`, [docs, num_perm]), their (file, line) table, and the exact and LSH keys, as
(key, doc) rows split into `partitions` files by key (`exact-017.bin`, `lsh-017.bin`), so pass 2 sorts
one partition at a time. Memory holds a bounded window of batches in flight and ~1 MiB of key buffers
per shard, whatever the corpus size. The directory is built under a temporary name and renamed when
complete (its `manifest.json` then says what it holds); a failed shard leaves nothing behind.
"""

from __future__ import annotations

import gzip
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from megatron_lite.data.cleaning.documents import (
    DocumentFilter,
    FilterConfig,
    Result,
    filter_batch,
    init_worker,
)
from megatron_lite.data.cleaning.report import RuleStats, write_json
from megatron_lite.data.corpus import BadLineError, iter_lines

ROW = np.dtype([("key", "<u8"), ("doc", "<u8")])
DOC_BITS = 40  # doc id = shard << 40 | position in the shard
BATCH = 64  # lines per task sent to a worker
FLUSH_ROWS = 1 << 16  # buffered key rows before they go to the partition files


class CorpusError(ValueError):
    """An input that cannot be read (truncated or corrupt gzip, bad UTF-8); names the file."""


def shard_dir(work_dir: str, shard: int) -> str:
    return os.path.join(work_dir, f"shard-{shard:05d}")


def shard_files(inputs: list[str], shard: int, num_shards: int) -> list[tuple[int, str]]:
    """(input index, path) of the files shard `shard` cleans: every num_shards-th, from `shard`."""
    return [(k, p) for k, p in enumerate(inputs) if k % num_shards == shard]


def read_lines(path: str) -> Iterator[tuple[str, int, str]]:
    try:
        yield from iter_lines([path])
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CorpusError(f"{path}: truncated or corrupt gzip file ({e})") from None
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e})") from None


def _batches(lines: Iterable, size: int = BATCH) -> Iterator[list]:
    batch = []
    for item in lines:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def bounded_imap(pool, fn: Callable, tasks: Iterable, window: int) -> Iterator:
    """pool.imap's ordered results, but at most `window` tasks in flight (Pool.imap reads its
    whole input ahead, which would hold a corpus in memory)."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


class ShardWriter:
    """Appends one shard's surviving documents, signatures and key rows to its directory."""

    def __init__(self, path: str, shard: int, partitions: int, num_perm: int) -> None:
        self.path, self.shard, self.partitions = path, shard, partitions
        self.docs = 0
        self.sig = open(os.path.join(path, "signatures.u32"), "wb")
        self.table = open(os.path.join(path, "docs.u32"), "wb")  # (file index, line) per doc
        self.buffers: dict[str, list[np.ndarray]] = {"exact": [], "lsh": []}
        self.buffered = 0
        self.spill = None

    def open_file(self, index: int) -> str:
        if self.spill is not None:
            self.spill.close()
        name = f"spill-{index:05d}.jsonl"
        self.spill = open(os.path.join(self.path, name), "w", encoding="utf-8")
        return name

    def add(self, r: Result, file_index: int) -> None:
        doc = np.uint64((self.shard << DOC_BITS) | self.docs)
        self.docs += 1
        self.spill.write(f"{r.lineno}\t{r.line}")
        self.sig.write(r.signature.tobytes())
        self.table.write(np.array([file_index, r.lineno], dtype="<u4").tobytes())
        for kind, keys in (("exact", np.array([r.exact], np.uint64)), ("lsh", r.bands)):
            rows = np.empty(len(keys), ROW)
            rows["key"], rows["doc"] = keys, doc
            self.buffers[kind].append(rows)
        self.buffered += 1 + len(r.bands)
        if self.buffered >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        for kind, chunks in self.buffers.items():
            if not chunks:
                continue
            rows = np.concatenate(chunks)
            part = rows["key"] % np.uint64(self.partitions)
            order = np.argsort(part, kind="stable")
            rows, part = rows[order], part[order]
            bounds = np.searchsorted(part, np.arange(self.partitions + 1))
            for p in range(self.partitions):
                if bounds[p] < bounds[p + 1]:
                    with open(os.path.join(self.path, f"{kind}-{p:03d}.bin"), "ab") as f:
                        f.write(rows[bounds[p] : bounds[p + 1]].tobytes())
            chunks.clear()
        self.buffered = 0

    def close(self) -> None:
        self.flush()
        for f in (self.spill, self.sig, self.table):
            if f is not None:
                f.close()


def _results(lines: Iterable, cfg: FilterConfig, workers: int) -> Iterator[Result]:
    if workers == 1:
        doc_filter = DocumentFilter(cfg)
        for path, lineno, line in lines:
            yield doc_filter(path, lineno, line)
        return
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=(cfg,)) as pool:
        for batch in bounded_imap(pool, filter_batch, _batches(lines), window=4 * workers):
            yield from batch


def _account(r: Result, stats: RuleStats, skip_bad_lines: bool) -> bool:
    """Count a result in `stats`; True when the document survives pass 1."""
    stats.read += 1
    stats.bytes_read += r.nbytes
    where = f"{r.path}:{r.lineno}"
    if r.status == "bad":
        if not skip_bad_lines:
            raise BadLineError(r.path, r.lineno, r.rule)
        stats.bad_lines += 1
        print(f"skipping {where}: {r.rule}", file=sys.stderr)
        return False
    for reason, removed in r.removed_lines.items():
        stats.lines_removed[f"c4.line.{reason}"] += len(removed)
        stats.example(f"c4.line.{reason}", where, removed[0])
    if r.status == "drop":
        extra = {"overlapping_ngrams": r.overlaps} if r.overlaps else {}
        stats.drop(r.rule, where, r.text, **extra)
        return False
    return True


def scan_shard(
    inputs: list[str],
    shard: int,
    num_shards: int,
    work_dir: str,
    cfg: FilterConfig,
    *,
    workers: int = 1,
    partitions: int = 64,
    skip_bad_lines: bool = False,
    max_examples: int = 3,
) -> dict:
    """Pass 1 over shard `shard` of `inputs`; returns (and writes) the shard's manifest."""
    final = shard_dir(work_dir, shard)
    tmp = f"{final}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    start, stats, overlapping = time.time(), RuleStats(max_examples), 0
    writer = ShardWriter(tmp, shard, partitions, cfg.minhasher.num_perm)
    mine = shard_files(inputs, shard, num_shards)
    files = [{"index": k, "input": p, "spill": None, "docs": 0} for k, p in mine]
    by_path = {p: rec for rec, (_, p) in zip(files, mine)}
    lines = (item for _, path in mine for item in read_lines(path))
    current_path, current = None, None
    try:
        for r in _results(lines, cfg, workers):
            if r.path != current_path:
                current_path, current = r.path, by_path[r.path]
                current["spill"] = writer.open_file(current["index"])
            if _account(r, stats, skip_bad_lines):
                writer.add(r, current["index"])
                current["docs"] += 1
                overlapping += r.overlaps > 0
        writer.close()
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = {
        "shard": shard,
        "num_shards": num_shards,
        "docs": writer.docs,
        "files": files,
        "partitions": partitions,
        "lsh": cfg.lsh(),
        "text_key": cfg.text_key,
        "stats": stats.to_dict(),
        "decontamination": None,
        "seconds": time.time() - start,
    }
    if cfg.decontaminator is not None:
        manifest["decontamination"] = {
            **cfg.decontaminator.describe(),
            "action": cfg.decontaminate_action,
            "documents_overlapping": overlapping + stats.dropped["decontamination"],
        }
    write_json(os.path.join(tmp, "manifest.json"), manifest)
    if os.path.exists(final):  # a rerun of this task (e.g. a requeued array task) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    return manifest
