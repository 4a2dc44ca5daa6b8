"""Run the real entry point under torchrun and read its Megatron-format log lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from megatron_lite.parallel_state import free_port

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

LOSS_RE = re.compile(r" iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([0-9.]+E[+-]\d+) \|")
VALID_RE = re.compile(
    r" (validation|test) loss at iteration (\d+) \| lm loss value: ([0-9.]+E[+-]\d+)"
)

TINY_GPT = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
    "--lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 --clip-grad 1.0 "
    "--hidden-dropout 0 --attention-dropout 0 --seed 1234 --log-interval 1 "
    "--eval-interval 1000 --eval-iters 0 --distributed-timeout-minutes 1 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 500"
).split()


def layout_flags(tp: int, pp: int) -> list[str]:
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


def pretrain_command(nproc: int, flags: list[str], env: dict | None = None) -> tuple[list, dict]:
    """The torchrun command line (free port on 127.0.0.1) and the environment for it."""
    cmd = [
        TORCHRUN,
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "megatron_lite.pretrain_gpt",
        *flags,
    ]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}


def run_pretrain(
    nproc: int,
    flags: list[str],
    *,
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node=nproc -m megatron_lite.pretrain_gpt FLAGS; stdout+stderr in .stdout."""
    cmd, full_env = pretrain_command(nproc, flags, env)
    out = subprocess.run(
        cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    out.stdout = out.stdout + out.stderr
    if check and out.returncode != 0:
        raise AssertionError(f"pretrain failed (rc {out.returncode}):\n{out.stdout[-6000:]}")
    return out


def losses(output: str) -> dict[int, float]:
    """{iteration: lm loss} from the training log lines."""
    return {int(m.group(1)): float(m.group(2)) for m in LOSS_RE.finditer(output)}


def eval_losses(output: str) -> list[tuple[str, int, float]]:
    return [(m.group(1), int(m.group(2)), float(m.group(3))) for m in VALID_RE.finditer(output)]


def build_corpus(out: Path, tokenizer: str, vocab_size: int = 400, max_mb: float = 0.5) -> dict:
    """A small real corpus (the Python standard library: no download) -> a `tokenizer`
    (GPT2BPETokenizer or SentencePieceTokenizer) trained on it -> Megatron .bin/.idx, all with the
    repository's tools. {"data_path": prefix, and "vocab_file" + "merge_file" or "tokenizer_model"}."""

    def tool(*args) -> None:
        subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, check=True, capture_output=True)

    corpus, tok = out / "corpus.jsonl", out / tokenizer
    if not corpus.exists():
        tool("tools/make_demo_corpus.py", "--output", corpus, "--max-mb", max_mb)
    tool(
        "tools/train_tokenizer.py",
        *("--input", corpus, "--tokenizer-type", tokenizer),
        *("--vocab-size", vocab_size, "--output-dir", tok),
    )
    if tokenizer == "GPT2BPETokenizer":
        files = {"vocab_file": tok / "vocab.json", "merge_file": tok / "merges.txt"}
    else:
        files = {"tokenizer_model": tok / "tokenizer.model"}
    tool(
        "tools/preprocess_data.py",
        *("--input", corpus, "--json-keys", "text", "--output-prefix", out / tokenizer),
        *("--tokenizer-type", tokenizer, "--append-eod", "--workers", 1),
        *(a for k, v in files.items() for a in ("--" + k.replace("_", "-"), v)),
    )
    return {"data_path": out / f"{tokenizer}_text_document", **files}
