"""Tokenizers selected by --tokenizer-type: GPT-2 byte-level BPE, SentencePiece, a HuggingFace
tokenizer (through `transformers`, e.g. Llama 3's tokenizer.json), and a null one.

Each exposes `vocab_size`, `tokenize(text) -> list[int]`, `detokenize(ids) -> str` and `eod` (the
end-of-document id that `--append-eod` adds and `--eod-mask-loss` masks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache

import regex

from megatron_lite.config import TOKENIZER_TYPES
from megatron_lite.errors import TokenizerError, UserFileNotFoundError

# GPT-2's pre-tokenization: contractions, letter runs, digit runs, other symbols, whitespace.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOD_TOKEN = "<|endoftext|>"


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (vocab.json keys are in this alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _require_file(path: str | None, flag: str, tokenizer: str) -> str:
    if path is None:
        raise TokenizerError(f"--tokenizer-type {tokenizer} needs {flag}")
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"{flag} {path}: no such file (needed by {tokenizer})")
    return path


def _read_text_lines(path: str, flag: str) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TokenizerError(
            f"{flag} {path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset "
            f"{e.start}); is this the right file?"
        ) from None
    return text.split("\n")


def _read_vocab(vocab_file: str) -> dict[str, int]:
    try:
        encoder = json.loads("\n".join(_read_text_lines(vocab_file, "--vocab-file")))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"--vocab-file {vocab_file}: not valid JSON ({e})") from None
    if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
        raise TokenizerError(f"--vocab-file {vocab_file}: expected a JSON object of token -> id")
    return encoder


def _read_merges(merge_file: str, encoder: dict[str, int], vocab_file: str) -> list[tuple]:
    """The merge pairs, each checked now: two symbols, both and their merge in the vocabulary
    (a merge that is not would fail much later, in the middle of encoding)."""
    merges = []
    for lineno, ln in enumerate(_read_text_lines(merge_file, "--merge-file"), 1):
        ln = ln.rstrip("\r")
        if not ln or ln.startswith("#version"):
            continue
        parts = ln.split(" ")
        if len(parts) != 2:
            raise TokenizerError(
                f"--merge-file {merge_file}:{lineno}: expected two space-separated symbols, "
                f"got {ln!r}"
            )
        missing = [s for s in (parts[0], parts[1], parts[0] + parts[1]) if s not in encoder]
        if missing:
            raise TokenizerError(
                f"--merge-file {merge_file}:{lineno}: merge {ln!r} uses {missing[0]!r}, which is "
                f"not in --vocab-file {vocab_file}: the two files do not belong together"
            )
        merges.append(tuple(parts))
    return merges


class GPT2BPETokenizer:
    """Byte-level BPE from GPT-2's `vocab.json` + `merges.txt`; exact round trip on any UTF-8 text.

    Words (pre-tokenized by GPT2_PATTERN) are merged once and cached: corpora repeat words so
    often that the cache makes encoding several times faster.
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        _require_file(vocab_file, "--vocab-file", "GPT2BPETokenizer")
        _require_file(merge_file, "--merge-file", "GPT2BPETokenizer")
        self.encoder: dict[str, int] = _read_vocab(vocab_file)
        self.decoder = {v: k for k, v in self.encoder.items()}
        merges = _read_merges(merge_file, self.encoder, vocab_file)
        self.bpe_ranks = {pair: i for i, pair in enumerate(merges)}
        if EOD_TOKEN not in self.encoder:
            raise TokenizerError(f"--vocab-file {vocab_file}: has no {EOD_TOKEN} entry")
        self.eod = self.encoder[EOD_TOKEN]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._pattern = regex.compile(GPT2_PATTERN)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> list[str]:
        """Merge the lowest-ranked adjacent pair until no listed pair remains (GPT-2's rule)."""
        symbols = list(word)
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            merged, out, i = best[0] + best[1], [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        return symbols

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids = [self.encoder[s] for s in self._bpe(mapped)]
            if len(self._cache) < 500_000:  # bound memory on pathological inputs
                self._cache[word] = ids
        return ids

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self._pattern.findall(text):
            ids.extend(self._encode_word(word))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        data = bytearray(self.byte_decoder[c] for i in ids for c in self.decoder[int(i)])
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model (--tokenizer-model). End of document: the `<EOD>` piece if the model
    has one (Megatron's convention), else the model's `</s>` (eos) id."""

    def __init__(self, model_file: str) -> None:
        import sentencepiece

        _require_file(model_file, "--tokenizer-model", "SentencePieceTokenizer")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(
                f"--tokenizer-model {model_file}: not a SentencePiece model ({e})"
            ) from None
        eod = self.sp.piece_to_id("<EOD>")
        if eod == self.sp.unk_id() or eod < 0:
            eod = self.sp.eos_id()
        if eod < 0:
            raise TokenizerError(
                f"--tokenizer-model {model_file}: has neither an <EOD> piece nor an eos id"
            )
        self.eod = int(eod)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
    """Any tokenizer `transformers.AutoTokenizer` loads from --tokenizer-model (a directory, or a hub
    name where the network allows). As Megatron's: `tokenize` adds the tokenizer's own special
    tokens (Llama's BOS, say); end of document is its eos token."""

    def __init__(self, name_or_path: str) -> None:
        if name_or_path is None:
            raise TokenizerError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError(
                "--tokenizer-type HuggingFaceTokenizer needs transformers (pip install transformers)"
            ) from None
        local = os.path.isdir(name_or_path)
        try:
            self.hf = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
        except (OSError, ValueError) as e:
            where = "directory" if local else "name (not a local directory)"
            raise TokenizerError(
                f"--tokenizer-model {name_or_path}: no HuggingFace tokenizer at this {where}: {e}"
            ) from None
        if self.hf.eos_token_id is None:
            raise TokenizerError(
                f"--tokenizer-model {name_or_path}: the tokenizer has no eos token"
            )
        self.eod = int(self.hf.eos_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def tokenize(self, text: str) -> list[int]:
        return list(self.hf(text)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids])


class NullTokenizer:
    """Text is space-separated ids; `eod` is `--vocab-size` itself, so vocab_size = that + 1 (as
    Megatron's null tokenizer)."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) <= 0:
            raise TokenizerError(
                f"--tokenizer-type NullTokenizer needs a positive --vocab-size, got {vocab_size}"
            )
        self._vocab_size_without_eod = int(vocab_size)
        self.eod = self._vocab_size_without_eod

    @property
    def vocab_size(self) -> int:
        return self._vocab_size_without_eod + 1

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


Tokenizer = GPT2BPETokenizer | SentencePieceTokenizer | HuggingFaceTokenizer | NullTokenizer


def build_tokenizer(data_cfg) -> Tokenizer:
    """The tokenizer named by `data_cfg.tokenizer_type` (a DataConfig or an argparse namespace)."""
    kind = getattr(data_cfg, "tokenizer_type", None)
    if kind is None and getattr(data_cfg, "mock_data", False):
        # mock data needs only ids and an eod: a null tokenizer (default 1023 ids + eod)
        return NullTokenizer(getattr(data_cfg, "vocab_size", None) or 1023)
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(data_cfg.vocab_file, data_cfg.merge_file)
    if kind == "SentencePieceTokenizer":
        return SentencePieceTokenizer(data_cfg.tokenizer_model)
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(data_cfg.tokenizer_model)
    if kind == "NullTokenizer":
        return NullTokenizer(data_cfg.vocab_size)
    raise TokenizerError(f"--tokenizer-type {kind!r} is not one of {', '.join(TOKENIZER_TYPES)}")
