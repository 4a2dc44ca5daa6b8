"""Train a tokenizer from JSONL or text files: GPT-2-style byte-level BPE or SentencePiece.

    python tools/train_tokenizer.py --input corpus.jsonl --tokenizer-type GPT2BPETokenizer \\
        --vocab-size 8192 --output-dir tok/          # writes tok/vocab.json + tok/merges.txt
    python tools/train_tokenizer.py --input corpus.jsonl --tokenizer-type SentencePieceTokenizer \\
        --vocab-size 8192 --output-dir tok/          # writes tok/tokenizer.model

The BPE trainer is the textbook algorithm (Sennrich et al. 2016, byte-level as GPT-2): words from
GPT-2's pre-tokenization regex are counted once, then the most frequent adjacent pair is merged
repeatedly. Pair counts are updated incrementally, only in the words that contain the merged pair,
and the best pair comes from a lazily updated heap, so a merge costs time proportional to where
the pair occurs, not to the corpus.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import regex  # noqa: E402

from megatron_lite.cli import run_main  # noqa: E402
from megatron_lite.data.corpus import iter_documents  # noqa: E402
from megatron_lite.data.tokenizer import EOD_TOKEN, GPT2_PATTERN, bytes_to_unicode  # noqa: E402
from megatron_lite.errors import TokenizerError  # noqa: E402


def count_words(texts: Iterable[str]) -> Counter:
    pattern = regex.compile(GPT2_PATTERN)
    counts: Counter = Counter()
    for text in texts:
        counts.update(pattern.findall(text))
    return counts


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab: token string -> id, merges in order) with `vocab_size` entries including EOD_TOKEN.

    Ids 0-255 are the bytes (in GPT-2's printable-character alphabet), then one id per new token
    in merge order, then `<|endoftext|>`.
    """
    if vocab_size < 257:
        raise ValueError(f"--vocab-size must be at least 257 (256 bytes + eod), got {vocab_size}")
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[b] for b in sorted(byte_chars, key=lambda b: ord(byte_chars[b]))]
    byte_id = {b: tokens.index(byte_chars[b]) for b in range(256)}
    token_id = {t: i for i, t in enumerate(tokens)}

    word_counts = count_words(texts)
    words = [[byte_id[b] for b in w.encode("utf-8")] for w in word_counts]
    freqs = list(word_counts.values())

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            where[pair].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(tokens) < vocab_size - 1 and heap:
        neg, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if -neg != count:  # stale entry: the count changed since it was pushed
            continue
        if count < min_frequency:
            break
        merged = tokens[a] + tokens[b]
        new_id = token_id.get(merged)
        if new_id is None:  # a string can be reached by two merge paths; keep one id
            new_id = len(tokens)
            tokens.append(merged)
            token_id[merged] = new_id
        merges.append((tokens[a], tokens[b]))
        changed: dict[tuple[int, int], int] = defaultdict(int)
        for wi in where.pop((a, b), ()):
            w = words[wi]
            out, i, hit = [], 0, False
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(new_id)
                    i += 2
                    hit = True
                else:
                    out.append(w[i])
                    i += 1
            if not hit:
                continue
            f = freqs[wi]
            for pair in zip(w, w[1:]):
                changed[pair] -= f
            for pair in zip(out, out[1:]):
                changed[pair] += f
                where[pair].add(wi)
            words[wi] = out
        for pair, delta in changed.items():
            if delta:
                pair_counts[pair] += delta
                if pair_counts[pair] > 0:
                    heapq.heappush(heap, (-pair_counts[pair], *pair))
        pair_counts.pop((a, b), None)
    tokens.append(EOD_TOKEN)
    return {t: i for i, t in enumerate(tokens)}, merges


def write_gpt2_files(vocab: dict[str, int], merges: list[tuple[str, str]], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_prefix: str) -> str:
    """A BPE SentencePiece model that reproduces text exactly (identity normalization, bytes)."""
    import sentencepiece

    def lines():  # SentencePiece trains on lines; documents are split at newlines
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line[:4000]

    try:
        _sentencepiece_train(sentencepiece, lines(), model_prefix, vocab_size)
    except RuntimeError as e:
        raise _sentencepiece_error(str(e), vocab_size) from None
    return model_prefix + ".model"


def _sentencepiece_error(message: str, vocab_size: int) -> Exception:
    """SentencePiece's vocabulary-size complaints in our flags' terms (it names options of its own
    trainer, such as --character_coverage, that this tool does not have); other errors as they are."""
    small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if small:
        return TokenizerError(
            f"--vocab-size {vocab_size} is too small for this corpus: SentencePiece needs at least "
            f"{small.group(2)} pieces (one per distinct character, plus the byte-fallback and "
            f"special pieces); use --vocab-size {small.group(2)} or more"
        )
    high = re.search(
        r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message
    )
    if high:
        return TokenizerError(
            f"--vocab-size {vocab_size} is too large for this corpus: it yields at most "
            f"{high.group(2)} pieces; use a smaller --vocab-size or more text"
        )
    return RuntimeError(message)


def _sentencepiece_train(sentencepiece, lines, model_prefix: str, vocab_size: int) -> None:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"],
        minloglevel=2,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help=".jsonl[.gz] or plain text files")
    p.add_argument("--json-key", default="text", help="JSON field holding the text")
    p.add_argument(
        "--tokenizer-type",
        required=True,
        choices=["GPT2BPETokenizer", "SentencePieceTokenizer"],
    )
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--min-frequency", type=int, default=2, help="BPE: rarest pair still merged")
    args = p.parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            p.error(f"--input {path}: no such file")
    t0 = time.time()
    texts = iter_documents(args.input, args.json_key)
    if args.tokenizer_type == "GPT2BPETokenizer":
        vocab, merges = train_bpe(texts, args.vocab_size, args.min_frequency)
        write_gpt2_files(vocab, merges, args.output_dir)
        out = f"{args.output_dir}/vocab.json and merges.txt ({len(vocab)} tokens)"
    else:
        os.makedirs(args.output_dir, exist_ok=True)
        out = train_sentencepiece(
            texts, args.vocab_size, os.path.join(args.output_dir, "tokenizer")
        )
    print(f"trained {args.tokenizer_type} in {time.time() - t0:.1f} s: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
