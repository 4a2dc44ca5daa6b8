"""Pass 2, global: exact and near duplicates across every shard's keys, then the cleaned files.

One partition of keys at a time (rows / partitions in memory): rows sorted by (key, doc), each key
held by two or more documents is a group. Exact: every member after the first (input order) is
dropped when its signature equals the first's (a 64-bit key collision alone drops nothing); "first"
is input order (the order of --input, then line), so sharding does not change what is kept. Near:
a member is dropped when its estimated Jaccard similarity with one of the first 16 earlier members
that are not exact duplicates reaches the threshold; the earliest document of a cluster stays.
Flags live in memory-mapped files (one byte per surviving document), signatures are read through
memory maps, and the outputs are streamed from the shards' spill files: memory does not grow with
the corpus, beyond one partition.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator

import numpy as np

from megatron_lite.data.cleaning.minhash import jaccard_estimate
from megatron_lite.data.cleaning.report import RuleStats
from megatron_lite.data.cleaning.scan import DOC_BITS, ROW, shard_dir

KEEP, EXACT, NEAR = 0, 1, 2
MAX_ANCHORS = 16
_LOCAL = (1 << DOC_BITS) - 1


def load_manifests(work_dir: str) -> list[dict]:
    """Every shard's manifest, checked complete and consistent."""
    if not os.path.isdir(work_dir):
        raise FileNotFoundError(f"--work-dir {work_dir}: no such directory (run the scans first)")
    names = sorted(n for n in os.listdir(work_dir) if re.fullmatch(r"shard-\d{5}", n))  # no .tmp-*
    paths = [p for n in names if os.path.isfile(p := os.path.join(work_dir, n, "manifest.json"))]
    if not paths:
        raise FileNotFoundError(f"--work-dir {work_dir}: no shard-*/manifest.json (run the scans)")
    manifests = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            manifests.append(json.load(f))
    n = manifests[0]["num_shards"]
    missing = sorted(set(range(n)) - {m["shard"] for m in manifests})
    if missing:
        raise FileNotFoundError(
            f"--work-dir {work_dir}: shards {missing} of {n} have no manifest (not scanned, or "
            "their scan failed)"
        )
    for m in manifests:
        for key in ("num_shards", "lsh", "partitions"):
            if m[key] != manifests[0][key]:
                raise ValueError(f"shard {m['shard']} was scanned with another {key}: {m[key]}")
    return manifests


class Shards:
    """Read-only memory maps of the shards' signatures and (file, line) tables, and the flags."""

    def __init__(self, work_dir: str, manifests: list[dict], flag_dir: str) -> None:
        self.manifests = manifests
        p = manifests[0]["lsh"]["num_perm"]
        self.sigs, self.table, self.flags, self.match = [], [], [], []
        for m in manifests:
            d, n = shard_dir(work_dir, m["shard"]), m["docs"]
            self.sigs.append(_map(os.path.join(d, "signatures.u32"), np.uint32, (n, p)))
            self.table.append(_map(os.path.join(d, "docs.u32"), np.uint32, (n, 2)))
            flags = os.path.join(flag_dir, f"flags-{m['shard']:05d}.u8")
            self.flags.append(_map(flags, np.uint8, (n,), "w+"))
            match = os.path.join(flag_dir, f"match-{m['shard']:05d}.u64")
            self.match.append(_map(match, np.uint64, (n,), "w+"))

    def sig(self, doc: int) -> np.ndarray:
        return self.sigs[doc >> DOC_BITS][doc & _LOCAL]

    def flag(self, doc: int) -> int:
        return int(self.flags[doc >> DOC_BITS][doc & _LOCAL])

    def set(self, doc: int, flag: int, match: int) -> None:
        self.flags[doc >> DOC_BITS][doc & _LOCAL] = flag
        self.match[doc >> DOC_BITS][doc & _LOCAL] = match

    def rank(self, doc: int) -> int:
        """Input order (file index, then line), whatever the sharding."""
        file_index, line = self.table[doc >> DOC_BITS][doc & _LOCAL]
        return (int(file_index) << 32) | int(line)

    def where(self, doc: int) -> str:
        file_index, line = self.table[doc >> DOC_BITS][doc & _LOCAL]
        for m in self.manifests:
            for f in m["files"]:
                if f["index"] == file_index:
                    return f"{f['input']}:{line}"
        return f"file {file_index}:{line}"


def _map(path: str, dtype, shape: tuple, mode: str = "r") -> np.ndarray:
    if shape[0] == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)


def _groups(work_dir: str, manifests: list[dict], kind: str, p: int) -> Iterator[np.ndarray]:
    """Docs (ascending) of each key held by two or more documents, in partition `p` of `kind`."""
    chunks = []
    for m in manifests:
        path = os.path.join(shard_dir(work_dir, m["shard"]), f"{kind}-{p:03d}.bin")
        if os.path.exists(path):
            chunks.append(np.fromfile(path, dtype=ROW))
    if not chunks:
        return
    rows = np.concatenate(chunks)
    rows = rows[np.lexsort((rows["doc"], rows["key"]))]
    starts = np.flatnonzero(np.r_[True, rows["key"][1:] != rows["key"][:-1]])
    sizes = np.diff(np.r_[starts, len(rows)])
    docs = rows["doc"]
    for s, n in zip(starts[sizes > 1], sizes[sizes > 1]):
        yield np.unique(docs[s : s + n])


def find_duplicates(work_dir: str, shards: Shards, threshold: float) -> None:
    """Set every surviving document's flag to KEEP, EXACT or NEAR (and its match)."""
    parts = shards.manifests[0]["partitions"]
    for p in range(parts):
        for group in _groups(work_dir, shards.manifests, "exact", p):
            first, *rest = sorted(group.tolist(), key=shards.rank)
            for d in rest:
                if np.array_equal(shards.sig(d), shards.sig(first)):
                    shards.set(d, EXACT, first)
    for p in range(parts):
        for group in _groups(work_dir, shards.manifests, "lsh", p):
            members = sorted(group.tolist(), key=shards.rank)
            for i in range(1, len(members)):
                d = members[i]
                if shards.flag(d) != KEEP:
                    continue
                anchors = [e for e in members[:i] if shards.flag(e) != EXACT][:MAX_ANCHORS]
                if not anchors:
                    continue
                sim = jaccard_estimate(shards.sig(d), np.stack([shards.sig(e) for e in anchors]))
                best = int(np.argmax(sim))
                if sim[best] >= threshold:
                    shards.set(d, NEAR, anchors[best])


def output_name(output_dir: str, path: str) -> str:
    return os.path.join(output_dir, os.path.basename(path))


def write_outputs(
    work_dir: str, shards: Shards, output_dir: str, stats: RuleStats, text_key: str
) -> list[tuple[str, str]]:
    """Stream each input's surviving lines minus the duplicates to a temporary file beside its
    output; [(temporary, final)] for the caller to rename once everything succeeded."""
    renames = []
    names = {EXACT: "exact_duplicate", NEAR: "near_duplicate"}
    for s, m in enumerate(shards.manifests):
        local = 0
        for f in sorted(m["files"], key=lambda f: f["index"]):
            final = output_name(output_dir, f["input"])
            tmp = f"{final}.tmp-{os.getpid()}"
            renames.append((tmp, final))
            opener = gzip.open if final.endswith(".gz") else open
            with opener(tmp, "wt", encoding="utf-8", newline="") as out:
                if f["spill"] is None:
                    continue
                spill = os.path.join(shard_dir(work_dir, m["shard"]), f["spill"])
                with open(spill, encoding="utf-8", newline="") as src:
                    for entry in src:
                        lineno, line = entry.split("\t", 1)
                        flag = int(shards.flags[s][local])
                        if flag == KEEP:
                            out.write(line)
                            stats.kept += 1
                            stats.bytes_kept += len(line.encode("utf-8"))
                        else:
                            stats.dropped[names[flag]] += 1
                            if len(stats.examples.get(names[flag], [])) < stats.max_examples:
                                text = json.loads(line)[text_key]
                                anchor = shards.where(int(shards.match[s][local]))
                                where = f"{f['input']}:{lineno}"
                                stats.example(names[flag], where, text, duplicate_of=anchor)
                        local += 1
    return renames
