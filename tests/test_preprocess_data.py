"""tools/preprocess_data.py: output equals direct tokenization in input order (1 or 2 workers,
partitions, gzip), bad lines stop the run cleanly or are skipped, cleaning counts."""

import gzip
import json

import pytest
from data_util import corpus, run_tool, train_gpt2_tokenizer, write_jsonl

from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.tokenizer import GPT2BPETokenizer


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory):
    return train_gpt2_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=350)


def preprocess(tok_files, src, prefix, *extra):
    v, m = tok_files
    args = ["--input", *([src] if isinstance(src, str) else src), "--output-prefix", prefix]
    args += ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", v, "--merge-file", m]
    return run_tool("preprocess_data.py", *args, *extra)


def read_documents(prefix):
    ds = IndexedDataset(prefix)
    docs = ds.document_indices
    return [
        [t for s in range(docs[i], docs[i + 1]) for t in ds[s].tolist()]
        for i in range(len(docs) - 1)
    ]


@pytest.mark.parametrize(
    "extra",
    [["--workers", "1"], ["--workers", "2"], ["--workers", "2", "--partitions", "3"]],
    ids=["1worker", "2workers", "2workers_3partitions"],
)
def test_output_equals_direct_tokenization_in_order(tmp_path, tok_files, extra):
    texts = corpus(150) + [""]
    src = write_jsonl(str(tmp_path / "in.jsonl"), texts)
    r = preprocess(
        tok_files, src, str(tmp_path / "out"), "--append-eod", "--log-interval", "50", *extra
    )
    assert r.returncode == 0, r.stderr
    tok = GPT2BPETokenizer(*tok_files)
    want = [tok.tokenize(t) + [tok.eod] if t else [] for t in texts]
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert ds.dtype.__name__ == "uint16"
    assert read_documents(str(tmp_path / "out_text_document")) == want
    assert "processed 150 documents" in r.stderr and "docs/s" in r.stderr and "MB/s" in r.stderr
    assert "151 documents read, 151 written" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl",
        "out_text_document.bin",
        "out_text_document.idx",
    ]


def test_gzip_input_and_several_keys(tmp_path, tok_files):
    src = str(tmp_path / "in.jsonl.gz")
    rows = [{"text": t, "title": f"title {i}"} for i, t in enumerate(corpus(20))]
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    r = preprocess(tok_files, src, str(tmp_path / "o"), "--json-keys", "text", "title")
    assert r.returncode == 0, r.stderr
    tok = GPT2BPETokenizer(*tok_files)
    assert read_documents(str(tmp_path / "o_text_document")) == [
        tok.tokenize(x["text"]) for x in rows
    ]
    assert read_documents(str(tmp_path / "o_title_document")) == [
        tok.tokenize(x["title"]) for x in rows
    ]


BAD_LINES = ['{"text": "ok one"}', '{"text": broken', '{"body": "no key"}', '{"text": "ok two"}']


@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_line_stops_with_file_and_line_and_writes_nothing(tmp_path, tok_files, workers):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(BAD_LINES) + "\n")
    r = preprocess(tok_files, str(src), str(tmp_path / "o"), "--workers", workers)
    assert r.returncode == 1
    assert f"{src}:2: malformed JSON" in r.stderr and "--skip-bad-lines" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]  # no output, no temp files


def test_missing_key_is_reported_with_line(tmp_path, tok_files):
    src = tmp_path / "k.jsonl"
    src.write_text("\n".join([BAD_LINES[0], BAD_LINES[2]]) + "\n")
    r = preprocess(tok_files, str(src), str(tmp_path / "o"))
    assert r.returncode == 1 and f"{src}:2: no key 'text'" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["k.jsonl"]


def test_skip_bad_lines_counts_and_skips(tmp_path, tok_files):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(BAD_LINES) + "\n")
    r = preprocess(tok_files, str(src), str(tmp_path / "o"), "--skip-bad-lines", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "2 bad lines skipped" in r.stdout
    tok = GPT2BPETokenizer(*tok_files)
    assert read_documents(str(tmp_path / "o_text_document")) == [
        tok.tokenize("ok one"),
        tok.tokenize("ok two"),
    ]


def test_dedup_and_keyword_filter_counts(tmp_path, tok_files):
    texts = ["Hello  World", "hello world", "a spam message", "keep me", "Keep   ME", "Spammy ok"]
    src = write_jsonl(str(tmp_path / "in.jsonl"), texts)
    kw = tmp_path / "kw.txt"
    kw.write_text("# words to drop\nspam\n")
    r = preprocess(
        tok_files, src, str(tmp_path / "o"), "--dedup", "exact", "--filter-keywords", str(kw)
    )
    assert r.returncode == 0, r.stderr
    assert "2 exact duplicates dropped, 1 dropped by keywords" in r.stdout
    tok = GPT2BPETokenizer(*tok_files)
    want = [tok.tokenize(t) for t in ("Hello  World", "keep me", "Spammy ok")]
    assert read_documents(str(tmp_path / "o_text_document")) == want


def test_missing_tokenizer_file_is_a_flag_error(tmp_path, tok_files):
    src = write_jsonl(str(tmp_path / "in.jsonl"), ["x"])
    r = run_tool(
        "preprocess_data.py",
        *["--input", src, "--output-prefix", str(tmp_path / "o")],
        *["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tmp_path / "v.json")],
        *["--merge-file", tok_files[1]],
    )
    assert r.returncode == 2 and "--vocab-file" in r.stderr and "v.json: no such file" in r.stderr
