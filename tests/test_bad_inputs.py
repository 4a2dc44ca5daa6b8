"""Bad input, tried as a new user would: each case ends in one clear line naming the file, line, flag
or value, and leaves what was there before byte for byte as it was.

The tools run in this process (their `main(argv)`), so a case costs milliseconds, not a Python start;
the launch cases (several ranks under torchrun) are in test_launch_faults.py.
"""

import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_util import TOOLS, train_gpt2_tokenizer, write_documents, write_jsonl
from factory import tiny_config

from megatron_lite.checkpointing import CheckpointError, CheckpointReader, save_checkpoint
from megatron_lite.checkpointing.hf_export import export_hf
from megatron_lite.checkpointing.save import retain_checkpoints
from megatron_lite.config import CheckpointConfig, Config, ConfigError, DataConfig
from megatron_lite.data.gpt_dataset import GPTDataset
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.tokenizer import GPT2BPETokenizer, NullTokenizer
from megatron_lite.errors import DataError, TokenizerError
from megatron_lite.inference.generation import build_generation_tokenizer, load_model
from megatron_lite.model import build_model_chunks
from megatron_lite.parallel_state import ParallelState


def _tool(path: str):
    """A tool script as a module (its `main(argv)` returns the exit code)."""
    name = "tool_" + Path(path).stem
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert, generate_tool = _tool("checkpoint/convert.py"), _tool("generate.py")
preprocess, train_tokenizer = _tool("preprocess_data.py"), _tool("train_tokenizer.py")


def snapshot(root) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _error_line(capsys) -> str:
    """stderr must be exactly one `error: ...` line; returns it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _save_tiny(path: str, iteration: int = 1, data: DataConfig | None = None, **ck) -> Config:
    cfg = tiny_config(data=data) if data else tiny_config(vocab_size=99)
    for k, v in ck.items():
        setattr(cfg.checkpoint, k, v)
    cfg.finalize(1)
    ps = ParallelState.single()
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(100))
    save_checkpoint(path, iteration, chunks, None, None, cfg, ps, 0, vocab_size=100)
    return cfg


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt")
    _save_tiny(path)
    return path


# ---------------------------------------------------------------------------------------------------
# Checkpoints: truncated, zero-byte, garbage, plain pickle; in training (test_launch_faults),
# generate.py and convert.py alike


def _corrupt(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    else:  # a plain pickle (torch.save's legacy format is a pickle too)
        path.write_bytes(pickle.dumps({"model": [1, 2, 3]}))


CORRUPT = {
    "truncated": "is corrupt or truncated",
    "zero-byte": "is empty (0 bytes)",
    "garbage": "is not a torch.save archive",
    "plain-pickle": "is a plain pickle",
}


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_a_corrupt_checkpoint_file_is_named_by_generate_and_convert(ckpt, tmp_path, kind, capsys):
    src = tmp_path / "ckpt"
    subprocess.run(["cp", "-r", ckpt, str(src)], check=True)
    bad = src / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    _corrupt(bad, kind)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {bad} {CORRUPT[kind]}")):
        CheckpointReader(str(src))
    assert generate_tool.main(["--load", str(src), "--prompt", "1 2"]) == 2
    assert f"error: checkpoint file {bad} {CORRUPT[kind]}" in _error_line(capsys)
    out = tmp_path / "converted"
    assert convert.main(["--load-dir", str(src), "--save-dir", str(out)]) == 2
    assert f"error: checkpoint file {bad} {CORRUPT[kind]}" in _error_line(capsys)
    assert snapshot(tmp_path) == before and not out.exists()


def test_convert_names_a_missing_load_dir_and_a_missing_safetensors(ckpt, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert convert.main(["--load-dir", str(missing), "--save-dir", str(tmp_path / "o")]) == 2
    assert _error_line(capsys) == f"error: --load-dir {missing}: no such directory"
    before = snapshot(ckpt)
    saved = sys.modules.get("safetensors.torch")
    sys.modules["safetensors.torch"] = None  # what `import safetensors.torch` meets without it
    try:
        out = tmp_path / "hf"
        assert convert.main(["--saver", "hf", "--load-dir", ckpt, "--save-dir", str(out)]) == 2
    finally:
        sys.modules.pop("safetensors.torch")
        if saved is not None:
            sys.modules["safetensors.torch"] = saved
    assert "needs the safetensors package (pip install safetensors)" in _error_line(capsys)
    assert not out.exists() and snapshot(ckpt) == before  # no empty save dir left


# ---------------------------------------------------------------------------------------------------
# Checkpoint retention and the tokenizer paths a checkpoint stores


def test_save_retain_keeps_the_newest_n_and_never_the_latest(tmp_path):
    root = str(tmp_path)
    for it in (1, 2, 3, 4):
        _save_tiny(root, it, save_retain=2)
        kept = sorted(p.name for p in tmp_path.glob("iter_*"))
        assert kept == [f"iter_{i:07d}" for i in range(max(1, it - 1), it + 1)]
    before = snapshot(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3\n")  # say a resume from 3
    for it in (5, 6):
        os.makedirs(tmp_path / f"iter_{it:07d}")
    assert retain_checkpoints(root, 2) == [4]  # 3 is named by the latest file: kept
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == [
        "iter_0000003",
        "iter_0000005",
        "iter_0000006",
    ]
    assert {k: v for k, v in before.items() if k.startswith("iter_0000003")} == {
        k: v for k, v in snapshot(tmp_path).items() if k.startswith("iter_0000003")
    }
    with pytest.raises(ConfigError, match=r"--save-retain must be at least 1.*got 0"):
        CheckpointConfig(save_retain=0)


def test_tokenizer_paths_in_a_checkpoint_resolve_from_any_working_directory(tmp_path, monkeypatch):
    tok = tmp_path / "run" / "tok"
    tok.mkdir(parents=True)
    train_gpt2_tokenizer(str(tok), vocab_size=300)
    monkeypatch.chdir(tmp_path / "run")  # the run names its tokenizer relative to its directory
    data = DataConfig(
        tokenizer_type="GPT2BPETokenizer", vocab_file="tok/vocab.json", merge_file="tok/merges.txt"
    )
    _save_tiny("ckpt", data=data)
    monkeypatch.chdir(tmp_path)  # elsewhere: generate, export and --use-checkpoint-args
    lm = load_model("run/ckpt", dtype=torch.float32, device=torch.device("cpu"))
    assert lm.data_config["vocab_file"] == str(tok / "vocab.json")
    want = GPT2BPETokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"))
    assert build_generation_tokenizer(lm).tokenize("hello there") == want.tokenize("hello there")
    export_hf(CheckpointReader("run/ckpt"), "hf", log=lambda s: None)
    assert (tmp_path / "hf" / "merges.txt").read_bytes() == (tok / "merges.txt").read_bytes()


# ---------------------------------------------------------------------------------------------------
# Tokenizer files


def test_a_binary_merges_file_is_named_with_its_line(tmp_path):
    vocab, merges = train_gpt2_tokenizer(str(tmp_path), vocab_size=300)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"#version: 0.2\nh e\n\xff\xfe\x00garbage\n")
    with pytest.raises(TokenizerError, match=rf"--merge-file {binary}:3: not UTF-8 text"):
        GPT2BPETokenizer(vocab, str(binary))


def test_a_merge_whose_symbols_are_not_in_the_vocab_fails_at_load(tmp_path):
    vocab, merges = train_gpt2_tokenizer(str(tmp_path), vocab_size=300)
    lines = Path(merges).read_text(encoding="utf-8").splitlines()
    lines.insert(3, "zq xj")  # neither symbol (nor their merge) is in vocab.json
    other = tmp_path / "other_merges.txt"
    other.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=rf"--merge-file {other}:4: merge 'zq xj' uses 'zq'"):
        GPT2BPETokenizer(vocab, str(other))


def test_a_sentencepiece_vocab_too_small_for_the_characters_names_the_minimum(tmp_path, capsys):
    text = "hello world " + "".join(chr(c) for c in range(0x100, 0x180))  # 128 distinct letters
    src = write_jsonl(str(tmp_path / "c.jsonl"), [text] * 5)
    out = tmp_path / "sp"
    args = ["--input", src, "--tokenizer-type", "SentencePieceTokenizer", "--output-dir", str(out)]
    with pytest.raises(TokenizerError) as e:
        train_tokenizer.main([*args, "--vocab-size", "300"])
    assert "--vocab-size 300 is too small for this corpus" in str(e.value)
    assert "character_coverage" not in str(e.value)
    needed = int(str(e.value).rsplit("use --vocab-size ", 1)[1].split()[0])
    assert train_tokenizer.main([*args, "--vocab-size", str(needed)]) == 0
    before = snapshot(out)  # a failing run leaves the model trained earlier as it was
    with pytest.raises(TokenizerError):
        train_tokenizer.main([*args, "--vocab-size", "300"])
    assert snapshot(out) == before and "tokenizer.model" in before


# ---------------------------------------------------------------------------------------------------
# Training data


def _gpt_dataset(prefix: str, tokenizer, cache_dir=None, num_samples=8) -> GPTDataset:
    ds = IndexedDataset(prefix)
    ids = np.arange(len(ds), dtype=np.int32)
    return GPTDataset(
        ds, prefix, ids, num_samples, "train", seq_length=8, seed=1, tokenizer=tokenizer,
        split="1,0,0", cache_dir=cache_dir,
    )  # fmt: skip


def _train_datasets(prefix: str):
    from megatron_lite.data import build_train_valid_test_datasets

    cfg = tiny_config(1, num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8,
                      data_path=[prefix], split="1,0,0")  # fmt: skip
    return build_train_valid_test_datasets(cfg, NullTokenizer(99), [8, 0, 0])


def test_an_empty_dataset_says_there_is_nothing_to_train_on(tmp_path):
    prefix = write_documents(str(tmp_path / "empty"), [])
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=rf"train split of {prefix} no documents \(0 in the"):
        _train_datasets(prefix)
    assert snapshot(tmp_path) == before


def test_token_ids_beyond_the_vocabulary_are_named_with_their_sample(tmp_path):
    doc = np.array([1, 2, 3, 4, 5000, 6, 7, 8, 9, 10, 11, 12], dtype=np.uint16)
    prefix = write_documents(str(tmp_path / "big"), [doc])
    ds = _gpt_dataset(prefix, NullTokenizer(99), str(tmp_path / "cache"))
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=r"sample 0 \(documents \[0\]\) holds token id 5000, out"):
        ds[0]
    assert snapshot(tmp_path) == before


def test_a_truncated_index_cache_file_is_named_and_left_for_the_user(tmp_path):
    docs = [np.arange(1, 30, dtype=np.uint16) for _ in range(4)]
    prefix = write_documents(str(tmp_path / "d"), docs)
    cache = tmp_path / "cache"
    _gpt_dataset(prefix, NullTokenizer(99), str(cache))
    victim = next(cache.glob("*sample_index.npy"))
    victim.write_bytes(victim.read_bytes()[:100])
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=rf"index cache file {victim} is truncated or corrupt"):
        _gpt_dataset(prefix, NullTokenizer(99), str(cache))
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# preprocess_data.py


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_gpt2_tokenizer(str(tmp_path_factory.mktemp("bpe")), vocab_size=300)


def _preprocess(bpe, src, prefix, *extra) -> int:
    v, m = bpe
    return preprocess.main(
        ["--input", str(src), "--output-prefix", str(prefix), "--tokenizer-type",
         "GPT2BPETokenizer", "--vocab-file", v, "--merge-file", m, *extra]
    )  # fmt: skip


def _earlier_output(bpe, tmp_path) -> dict[str, str]:
    """A good run's output at tmp_path/out (what a failing rerun must leave as it was)."""
    good = write_jsonl(str(tmp_path / "good.jsonl"), ["an earlier run", "of two documents"])
    assert _preprocess(bpe, good, tmp_path / "out") == 0
    return snapshot(tmp_path)


def test_preprocess_names_the_line_with_invalid_utf8_and_can_skip_it(bpe, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
    before = _earlier_output(bpe, tmp_path)
    capsys.readouterr()
    assert _preprocess(bpe, src, tmp_path / "out") == 1
    assert f"{src}:2: not valid UTF-8 (byte 0xe9 at character 14)" in _error_line(capsys)
    assert snapshot(tmp_path) == before  # nothing written, the earlier output untouched
    assert _preprocess(bpe, src, tmp_path / "out", "--skip-bad-lines") == 0
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == 2


def test_preprocess_names_a_truncated_gzip_file(bpe, tmp_path, capsys):
    src = tmp_path / "c.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        for i in range(2000):
            f.write(json.dumps({"text": f"document {i} " * 20}) + "\n")
    src.write_bytes(src.read_bytes()[:3000])
    before = _earlier_output(bpe, tmp_path)
    capsys.readouterr()
    assert _preprocess(bpe, src, tmp_path / "out") == 1
    line = _error_line(capsys)
    assert f"error: {src}: truncated or corrupt gzip file, after line" in line
    assert snapshot(tmp_path) == before


def test_preprocess_removes_the_temp_files_a_killed_run_left(bpe, tmp_path, capsys):
    src = write_jsonl(str(tmp_path / "c.jsonl"), ["one doc", "two docs"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no process has now
    prefix = tmp_path / "out_text_document"
    stale = [f"{prefix}.tmp-{dead.pid}.part0.bin", f"{prefix}.tmp-{dead.pid}.part0.idx"]
    live = f"{prefix}.tmp-{os.getppid()}.part0.bin"  # a live pid: a run still going, not touched
    for p in [*stale, live]:
        Path(p).write_bytes(b"partial")
    assert _preprocess(bpe, src, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert all(f"removed {p}: left by an earlier run (pid {dead.pid})" in out for p in stale)
    assert not any(os.path.exists(p) for p in stale) and Path(live).read_bytes() == b"partial"
    assert len(IndexedDataset(str(prefix))) == 2


def _save_pp2(path: str) -> None:
    """Rank body: a tiny checkpoint saved by 2 pipeline stages (one file each)."""
    cfg = tiny_config(2, vocab_size=99, pp=2)
    ps = ParallelState.build(1, 2)
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(100))
    save_checkpoint(path, 1, chunks, None, None, cfg, ps, 0, vocab_size=100)


def test_convert_leaves_no_half_written_target_when_a_later_source_file_is_corrupt(
    tmp_path, capsys
):
    from megatron_lite.distributed.testing import run_distributed

    src, out = tmp_path / "pp2", tmp_path / "out"
    run_distributed(_save_pp2, 2, str(src), timeout=60)
    bad = src / "iter_0000001" / "mp_rank_00_001" / "model_optim_rng.pt"
    bad.write_bytes(bad.read_bytes()[:3000])  # the second stage: read after the first is written
    before = snapshot(tmp_path)
    assert convert.main(["--load-dir", str(src), "--save-dir", str(out)]) == 2
    assert f"error: checkpoint file {bad} is corrupt or truncated" in _error_line(capsys)
    assert snapshot(tmp_path) == before and not out.exists()


def test_a_user_error_from_a_dataloader_worker_is_still_one_line(capsys):
    from torch._utils import ExceptionWrapper

    from megatron_lite.cli import report_user_error

    try:
        raise DataError("d.bin: sample 3 holds token id 9")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as e:
        wrapped.reraise()  # what a DataLoader with --num-workers > 0 raises in the main process
    assert report_user_error(e.value) == 2
    assert _error_line(capsys) == "error: d.bin: sample 3 holds token id 9"
