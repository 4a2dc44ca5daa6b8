"""Tokenize a JSONL corpus into Megatron `.bin/.idx` files (Megatron-LM's flags).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file tok/vocab.json --merge-file tok/merges.txt \\
        --append-eod --workers 2        # -> data/corpus_text_document.bin / .idx

Worker processes tokenize in parallel and results are written in input order. Output is written
under temporary names and renamed only when everything succeeded, so a failed run leaves no
half-written dataset. A malformed line, or one without a --json-keys key, stops the run with its
file and line number, unless --skip-bad-lines (then they are counted and skipped). Optional
cleaning: --dedup exact drops a document whose normalized text (lower case, whitespace collapsed)
was seen before; --filter-keywords FILE drops documents containing any listed word (one per line,
'#' starts a comment; whole words, case-insensitive).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import multiprocessing
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron_lite.config import TOKENIZER_TYPES  # noqa: E402
from megatron_lite.data.corpus import BadLineError, iter_lines, parse_json_line  # noqa: E402
from megatron_lite.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    merge_datasets,
    token_dtype,
)
from megatron_lite.data.tokenizer import build_tokenizer  # noqa: E402
from megatron_lite.errors import DataError  # noqa: E402


class Encoder:
    """Per-process state: the tokenizer and the keyword filter (built once per worker)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tokenizer = build_tokenizer(args)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.keywords = _keyword_regex(args.filter_keywords) if args.filter_keywords else None

    def encode(self, item: tuple[str, int, str]):
        """(path, lineno, bytes, status, payload): status ok / bad / keyword."""
        path, lineno, line = item
        nbytes = len(line.encode("utf-8", "surrogateescape"))
        try:
            fields = parse_json_line(line, self.args.json_keys, path, lineno)
        except BadLineError as e:
            return path, lineno, nbytes, "bad", e.reason
        if self.keywords is not None and any(self.keywords.search(t) for t in fields.values()):
            return path, lineno, nbytes, "keyword", None
        digest = None
        if self.args.dedup == "exact":
            normalized = " ".join("\n".join(fields.values()).lower().split())
            digest = hashlib.md5(normalized.encode("utf-8")).digest()
        ids = {}
        for key, text in fields.items():
            tokens = self.tokenizer.tokenize(text)
            if tokens and self.args.append_eod:
                tokens.append(self.tokenizer.eod)
            ids[key] = np.asarray(tokens, dtype=self.dtype)
        return path, lineno, nbytes, "ok", (ids, digest)


_encoder: Encoder | None = None


def _init_worker(args: argparse.Namespace) -> None:
    global _encoder
    _encoder = Encoder(args)


def _encode(item):
    return _encoder.encode(item)


def _keyword_regex(path: str) -> re.Pattern:
    with open(path, encoding="utf-8") as f:
        words = [w.strip() for w in f if w.strip() and not w.lstrip().startswith("#")]
    if not words:
        raise ValueError(f"--filter-keywords {path}: no keywords in the file")
    return re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)


class Stats:
    def __init__(self) -> None:
        self.start = time.time()
        self.read = self.written = self.bad = self.dups = self.filtered = 0
        self.bytes = self.tokens = 0

    def rates(self) -> str:
        dt = max(time.time() - self.start, 1e-9)
        return f"{self.read / dt:.1f} docs/s, {self.bytes / dt / 2**20:.2f} MB/s"


def _process(args, encoder: Encoder, items, outputs: dict[str, str], stats: Stats, seen: set):
    """Tokenize `items` into one builder per key at the `outputs` prefixes (temporary names)."""
    builders = {
        k: IndexedDatasetBuilder(data_file_path(p), encoder.dtype) for k, p in outputs.items()
    }
    pool = None
    if args.workers > 1:
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(args,))
        results = pool.imap(_encode, items, chunksize=32)
    else:
        results = map(encoder.encode, items)
    try:
        for path, lineno, nbytes, status, payload in results:
            stats.read += 1
            stats.bytes += nbytes
            if status == "bad":
                if not args.skip_bad_lines:
                    raise BadLineError(path, lineno, payload)
                stats.bad += 1
                print(f"skipping {path}:{lineno}: {payload}", file=sys.stderr)
            elif status == "keyword":
                stats.filtered += 1
            else:
                ids, digest = payload
                if digest is not None and digest in seen:
                    stats.dups += 1
                else:
                    if digest is not None:
                        seen.add(digest)
                    for key, tokens in ids.items():
                        builders[key].add_document(tokens, [len(tokens)] if len(tokens) else [])
                        stats.tokens += len(tokens)
                    stats.written += 1
            if stats.read % args.log_interval == 0:
                print(f"processed {stats.read} documents ({stats.rates()})", file=sys.stderr)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for key, builder in builders.items():
            builder.finalize(index_file_path(outputs[key]))


_TEMP_RE = re.compile(r"\.tmp-(\d+)(?:\.part\d+)?\.(?:bin|idx)")


def _partitions(paths: list[str], count: int):
    """`count` contiguous runs of the input lines (partition p, then p + 1, ... keep the order)."""
    if count == 1:
        return [iter_lines(paths)]
    total = sum(1 for _ in iter_lines(paths))
    bounds = [total * p // count for p in range(count + 1)]
    return [itertools.islice(iter_lines(paths), b0, b1) for b0, b1 in zip(bounds, bounds[1:])]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(finals: list[str]) -> list[str]:
    """Delete the `{final}.tmp-PID[.partN].bin/.idx` files that a killed run left (its PID is not
    alive on this machine; a live run's files are left alone); returns the paths removed."""
    removed = []
    for final in finals:
        for path in glob.glob(glob.escape(final) + ".tmp-*"):
            m = _TEMP_RE.fullmatch(path[len(final) :])
            if m and not _pid_alive(int(m.group(1))):
                os.unlink(path)
                removed.append(path)
                print(f"removed {path}: left by an earlier run (pid {m.group(1)}) that was killed")
    return removed


def run(args: argparse.Namespace) -> Stats:
    encoder = Encoder(args)
    finals = {k: f"{args.output_prefix}_{k}_document" for k in args.json_keys}
    remove_stale_temps(list(finals.values()))
    tmp = f".tmp-{os.getpid()}"
    temps: list[str] = []
    stats, seen = Stats(), set()
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    try:
        parts = []
        for p, items in enumerate(_partitions(args.input, args.partitions)):
            outputs = {k: f"{f}{tmp}.part{p}" for k, f in finals.items()}
            temps += [fn(o) for o in outputs.values() for fn in (data_file_path, index_file_path)]
            _process(args, encoder, items, outputs, stats, seen)
            parts.append(outputs)
        if len(parts) > 1:
            merged = {k: f"{f}{tmp}" for k, f in finals.items()}
            temps += [fn(o) for o in merged.values() for fn in (data_file_path, index_file_path)]
            for k, out in merged.items():
                merge_datasets([part[k] for part in parts], out)
        else:
            merged = parts[0]
        for k, final in finals.items():
            for fn in (data_file_path, index_file_path):
                os.replace(fn(merged[k]), fn(final))
    finally:
        for t in temps:
            if os.path.exists(t):
                os.unlink(t)
    return stats


def add_tokenizer_args(p: argparse.ArgumentParser):
    """The tokenizer flags (Megatron's) shared by the tokenizing tools; returns their group."""
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument(
        "--tokenizer-model", help="SentencePiece model, or HuggingFace tokenizer directory"
    )
    g.add_argument("--vocab-size", type=int, help="NullTokenizer vocabulary size")
    return g


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help=".jsonl or .jsonl.gz file(s)")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize")
    g = add_tokenizer_args(p)
    g.add_argument("--append-eod", action="store_true", help="End each document with eod")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="Writes {prefix}_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="Tokenizer processes")
    g.add_argument("--partitions", type=int, default=1, help="Process the input in N parts")
    g.add_argument(
        "--log-interval", type=int, default=1000, help="Documents between progress lines"
    )
    g.add_argument("--skip-bad-lines", action="store_true", help="Count and skip bad lines")
    g.add_argument("--dedup", choices=["none", "exact"], default="none")
    g.add_argument("--filter-keywords", help="File of words; drop documents containing any")
    args = p.parse_args(argv)
    for name in ("workers", "partitions", "log_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for path in args.input + ([args.filter_keywords] if args.filter_keywords else []):
        if not os.path.isfile(path):
            p.error(f"no such file: {path}")
    try:
        build_tokenizer(args)  # fail here, with the flag named, not inside a worker
        if args.filter_keywords:
            _keyword_regex(args.filter_keywords)
    except (OSError, ValueError) as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    try:
        stats = run(args)
    except BadLineError as e:
        print(
            f"error: {e}; no output written (fix the line, or pass --skip-bad-lines to skip such "
            "lines)",
            file=sys.stderr,
        )
        return 1
    except DataError as e:  # a truncated .gz, say
        print(f"error: {e}; no output written", file=sys.stderr)
        return 1
    dt = time.time() - stats.start
    print(
        f"done: {stats.read} documents read, {stats.written} written, {stats.tokens} tokens, "
        f"{stats.bad} bad lines skipped, {stats.dups} exact duplicates dropped, {stats.filtered} "
        f"dropped by keywords; {dt:.2f} s ({stats.rates()}); output "
        + ", ".join(f"{args.output_prefix}_{k}_document" for k in args.json_keys)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
