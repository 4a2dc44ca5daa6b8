"""Tokenizers trained here (no downloads): exact round trips, GPT-2 file formats, clear errors."""

import json
import os
import random
import types

import pytest
from data_util import TEXTS, corpus, run_tool, train_gpt2_tokenizer, write_jsonl

from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.tokenizer import (
    EOD_TOKEN,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
)


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    return train_gpt2_tokenizer(str(tmp_path_factory.mktemp("bpe")), vocab_size=400)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    src = write_jsonl(str(d / "c.jsonl"), TEXTS + corpus(200))
    r = run_tool(
        "train_tokenizer.py",
        "--input",
        src,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--vocab-size",
        "600",
        "--output-dir",
        str(d),
    )
    assert r.returncode == 0, r.stderr
    return str(d / "tokenizer.model")


def random_unicode(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0x0, 0x1F), (0xA0, 0x24F), (0x3040, 0x30FF), (0x4E00, 0x4FFF)]
    pools += [(0x1F300, 0x1F64F), (0x2000, 0x206F), (0x10000, 0x1003F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_gpt2_files_have_gpt2_format(gpt2_files):
    vocab_file, merge_file = gpt2_files
    vocab = json.load(open(vocab_file, encoding="utf-8"))
    assert len(vocab) == 400 and vocab[EOD_TOKEN] == 399
    assert sorted(vocab.values()) == list(range(400))
    lines = open(merge_file, encoding="utf-8").read().splitlines()
    assert lines[0].startswith("#version")
    for line in lines[1:]:
        a, b = line.split(" ")
        assert a in vocab and b in vocab and a + b in vocab
    assert "Ġthe" in vocab  # space is byte-mapped to Ġ, as GPT-2


def test_gpt2_round_trip_is_exact_on_any_utf8(gpt2_files):
    tok = GPT2BPETokenizer(*gpt2_files)
    rng = random.Random(0)
    samples = TEXTS + [random_unicode(rng, rng.randint(0, 200)) for _ in range(200)]
    for text in samples:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    assert tok.eod == 399 and tok.vocab_size == 400


def test_gpt2_merges_compress_and_cache_is_consistent(gpt2_files):
    tok = GPT2BPETokenizer(*gpt2_files)
    text = " ".join(TEXTS) * 3
    ids = tok.tokenize(text)
    assert len(ids) < 0.6 * len(text.encode("utf-8"))  # merges learned from this text apply
    assert tok.tokenize(text) == ids  # second pass comes from the word cache
    fresh = GPT2BPETokenizer(*gpt2_files)
    assert fresh.tokenize(text) == ids


def test_sentencepiece_round_trip_and_eod(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    assert tok.vocab_size == 600 and tok.eod == tok.sp.eos_id()
    for text in TEXTS[:4] + ["tabs\tand\nnewlines\n\n  two spaces"]:
        assert tok.detokenize(tok.tokenize(text)) == text


def test_null_tokenizer_is_megatrons():
    tok = NullTokenizer(100)
    assert tok.vocab_size == 101 and tok.eod == 100
    assert tok.tokenize("1 2  30") == [1, 2, 30]
    assert tok.detokenize([4, 5]) == "4 5"


def test_build_tokenizer_dispatches_on_type(gpt2_files, sp_model):
    ns = types.SimpleNamespace
    v, m = gpt2_files
    assert isinstance(
        build_tokenizer(ns(tokenizer_type="GPT2BPETokenizer", vocab_file=v, merge_file=m)),
        GPT2BPETokenizer,
    )
    assert isinstance(
        build_tokenizer(ns(tokenizer_type="SentencePieceTokenizer", tokenizer_model=sp_model)),
        SentencePieceTokenizer,
    )
    assert build_tokenizer(ns(tokenizer_type="NullTokenizer", vocab_size=7)).vocab_size == 8
    with pytest.raises(ValueError, match="--tokenizer-type 'Foo'"):
        build_tokenizer(ns(tokenizer_type="Foo"))


def test_missing_tokenizer_files_name_file_and_flag(tmp_path, gpt2_files):
    v, m = gpt2_files
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"--vocab-file .*nope\.json: no such file"):
        GPT2BPETokenizer(missing, m)
    with pytest.raises(FileNotFoundError, match=r"--merge-file .*nope\.json: no such file"):
        GPT2BPETokenizer(v, missing)
    with pytest.raises(FileNotFoundError, match=r"--tokenizer-model .*nope\.json: no such file"):
        SentencePieceTokenizer(missing)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"--tokenizer-model .*bad\.model: not a SentencePiece"):
        SentencePieceTokenizer(str(bad))


def test_train_tokenizer_tool_writes_usable_bpe(tmp_path):
    src = write_jsonl(str(tmp_path / "c.jsonl"), corpus(50))
    r = run_tool(
        "train_tokenizer.py",
        "--input",
        src,
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-size",
        "300",
        "--output-dir",
        str(tmp_path / "tok"),
    )
    assert r.returncode == 0, r.stderr
    tok = GPT2BPETokenizer(str(tmp_path / "tok/vocab.json"), str(tmp_path / "tok/merges.txt"))
    assert tok.vocab_size == 300
    assert tok.detokenize(tok.tokenize(corpus(3)[2])) == corpus(3)[2]


def test_huggingface_tokenizer_matches_ours_and_preprocesses(tmp_path, gpt2_files):
    """--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR: a tokenizer.json-only directory
    (as Llama 3 ships), made here by transformers from our GPT-2 files, tokenizes as ours and
    drives preprocess_data.py."""
    from transformers import GPT2TokenizerFast

    v, m = gpt2_files
    hf_dir = tmp_path / "hf_tok"
    GPT2TokenizerFast.from_pretrained(os.path.dirname(v)).save_pretrained(hf_dir)
    for name in ("vocab.json", "merges.txt"):  # leave only tokenizer.json + configs
        (hf_dir / name).unlink(missing_ok=True)
    ns = types.SimpleNamespace(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(hf_dir))
    hf, ours = build_tokenizer(ns), GPT2BPETokenizer(v, m)
    assert isinstance(hf, HuggingFaceTokenizer)
    assert (hf.vocab_size, hf.eod) == (ours.vocab_size, ours.eod)
    for text in TEXTS:
        assert hf.tokenize(text) == ours.tokenize(text)
        assert hf.detokenize(hf.tokenize(text)) == text
    src = write_jsonl(str(tmp_path / "c.jsonl"), TEXTS)
    out = str(tmp_path / "hfdata")
    r = run_tool(
        "preprocess_data.py", "--input", src, "--output-prefix", out, "--append-eod",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf_dir),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(out + "_text_document")
    assert ds[1].tolist() == ours.tokenize(TEXTS[1]) + [ours.eod]
    with pytest.raises(ValueError, match=r"--tokenizer-model .*nowhere: no HuggingFace tokenizer"):
        HuggingFaceTokenizer(str(tmp_path / "nowhere"))
