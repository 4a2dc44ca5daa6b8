"""Shared helpers of the data tests: tiny corpora, tokenizers trained on the spot, token files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

from megatron_lite.data.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!\n\tIndented line 2.",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 😀🚀, Ελληνικά, русский.",
    "def f(x):\n    return x ** 2  # squares\n\n\nprint(f(12345))",
    "   leading and trailing spaces   ",
    "",
    "numbers 0 1 22 333 4444 55555 and symbols @#$%^&*()_+-=[]{}|;':\",./<>?",
]


def corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    """Deterministic documents of varying length built from TEXTS and random words."""
    rng = np.random.default_rng(seed)
    words = " ".join(TEXTS).split()
    docs = []
    for i in range(n_docs):
        k = int(rng.integers(1, 80))
        docs.append(f"doc {i}: " + " ".join(rng.choice(words, size=k)) + TEXTS[i % len(TEXTS)])
    return docs


def write_jsonl(path: str, texts: list[str], key: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "meta": len(t)}, ensure_ascii=False) + "\n")
    return path


def train_gpt2_tokenizer(out_dir: str, vocab_size: int = 400) -> tuple[str, str]:
    from train_tokenizer import train_bpe, write_gpt2_files

    vocab, merges = train_bpe(TEXTS + corpus(), vocab_size)
    write_gpt2_files(vocab, merges, out_dir)
    return os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(TOOLS, name), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def write_documents(prefix: str, docs: list[np.ndarray], dtype=np.uint16) -> str:
    """A `.bin/.idx` pair holding `docs`, one sequence per document."""
    builder = IndexedDatasetBuilder(data_file_path(prefix), dtype)
    for d in docs:
        builder.add_document(d)
    builder.finalize(index_file_path(prefix))
    return prefix


def labelled_documents(n_docs: int, seed: int = 0, eod: int = 0, max_len: int = 40):
    """Documents whose tokens name their document: doc i holds 1 + i (then an eod), so a sample's
    tokens tell which documents it came from."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, size=n_docs)
    return [np.append(np.full(n - 1, 1 + i), eod).astype(np.uint16) for i, n in enumerate(lengths)]
