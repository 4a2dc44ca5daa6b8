"""Data-pipeline throughput, on the demo corpus (Python's own stdlib sources; no download).

    .venv/bin/python bench/bench_data.py [--corpus-mb 8]

Prints: tokenizer encode MB/s (GPT-2 byte-level BPE, SentencePiece BPE, both trained here at 8k),
tools/preprocess_data.py MB/s with 1 and 2 workers (and the ratio), and build_sample_idx on 100M
tokens, C++ extension vs the numpy fallback (and the ratio). Figures vary with machine load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

import numpy as np  # noqa: E402

from megatron_lite import _extensions  # noqa: E402
from megatron_lite.data import helpers  # noqa: E402
from megatron_lite.data.corpus import iter_documents  # noqa: E402
from megatron_lite.data.tokenizer import GPT2BPETokenizer, SentencePieceTokenizer  # noqa: E402


def tool(name: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", name), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout + out.stderr


def encode_mb_per_s(tok, texts: list[str]) -> float:
    size = sum(len(t.encode("utf-8")) for t in texts)
    t0 = time.perf_counter()
    for t in texts:
        tok.tokenize(t)
    return size / 2**20 / (time.perf_counter() - t0)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--corpus-mb", type=float, default=8.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        corpus = os.path.join(d, "demo.jsonl")
        tool("make_demo_corpus.py", "--output", corpus, "--max-mb", str(args.corpus_mb))
        texts = list(iter_documents([corpus]))
        mb = sum(len(t.encode("utf-8")) for t in texts) / 2**20
        print(f"corpus: {len(texts)} documents, {mb:.1f} MiB of text")
        common = ["--input", corpus, "--vocab-size", "8192"]
        out = tool("train_tokenizer.py", *common, "--tokenizer-type", "GPT2BPETokenizer",
                   "--output-dir", os.path.join(d, "bpe"))  # fmt: skip
        print("BPE training:", out.strip().split(":")[0])
        tool("train_tokenizer.py", *common, "--tokenizer-type", "SentencePieceTokenizer",
             "--output-dir", os.path.join(d, "sp"))  # fmt: skip
        vocab, merges = os.path.join(d, "bpe/vocab.json"), os.path.join(d, "bpe/merges.txt")
        gpt2 = GPT2BPETokenizer(vocab, merges)
        print(
            f"tokenizer GPT2BPETokenizer encode: {encode_mb_per_s(gpt2, texts):.2f} MB/s (cold cache)"
        )
        print(
            f"tokenizer GPT2BPETokenizer encode: {encode_mb_per_s(gpt2, texts):.2f} MB/s (warm cache)"
        )
        sp = SentencePieceTokenizer(os.path.join(d, "sp/tokenizer.model"))
        print(f"tokenizer SentencePieceTokenizer encode: {encode_mb_per_s(sp, texts):.2f} MB/s")

        rates = {}
        for workers in (1, 2):
            t0 = time.perf_counter()
            tool("preprocess_data.py", "--input", corpus, "--output-prefix", os.path.join(d, f"w{workers}"),
                 "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
                 "--append-eod", "--workers", str(workers), "--log-interval", "100000")  # fmt: skip
            rates[workers] = os.path.getsize(corpus) / 2**20 / (time.perf_counter() - t0)
            print(
                f"preprocess_data --workers {workers}: {rates[workers]:.2f} MB/s (wall, incl. start-up)"
            )
        print(f"preprocess_data 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 2048, size=100_000_000 // 1024, dtype=np.int32)
    doc_idx = rng.permutation(len(sizes)).astype(np.int32)
    tokens = int(sizes.sum())
    args_ = (2048, 1, tokens, True, 1)
    ext = _extensions.load("_helpers")
    t_np = best_of(lambda: helpers.build_sample_idx_numpy(sizes, doc_idx, *args_))
    print(f"build_sample_idx on {tokens / 1e6:.0f}M tokens, seq 2048: numpy {t_np * 1e3:.1f} ms")
    if ext is not None:
        t_cpp = best_of(lambda: ext.build_sample_idx(sizes, doc_idx, *args_))
        print(f"build_sample_idx C++ {t_cpp * 1e3:.1f} ms: C++ is {t_np / t_cpp:.1f}x numpy")
        sizes_s = rng.integers(1, 64, size=100_000_000 // 32, dtype=np.int32)  # short documents
        doc_s = rng.permutation(len(sizes_s)).astype(np.int32)
        a2 = (128, 1, int(sizes_s.sum()), True, 1)
        t_np2 = best_of(lambda: helpers.build_sample_idx_numpy(sizes_s, doc_s, *a2))
        t_cpp2 = best_of(lambda: ext.build_sample_idx(sizes_s, doc_s, *a2))
        print(f"build_sample_idx 100M tokens in 3.1M short docs, seq 128: numpy {t_np2 * 1e3:.0f} ms, "
              f"C++ {t_cpp2 * 1e3:.0f} ms ({t_np2 / t_cpp2:.1f}x)")  # fmt: skip
    else:
        print("build_sample_idx C++: extension not built (make build)")


if __name__ == "__main__":
    main()
