"""Shared helpers of the fine-tuning tests: a synthetic instruction task on NullTokenizer ids, its
JSONL files, and the real training entry point run in-process on forked ranks."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re

from data_util import run_tool

from megatron_lite.arguments import parse_args

VOCAB = 60  # NullTokenizer ids 0..59, eod 60
LETTERS = range(10, 40)
LOSS_RE = re.compile(r" iteration\s+(\d+)/\s*\d+ \|.*? lm loss: (-?[0-9.]+E[+-]\d+) \|")

TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 8 "
    "--lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 2 --clip-grad 1.0 "
    "--hidden-dropout 0 --attention-dropout 0 --seed 1234 --log-interval 1 --no-log-memory "
    "--eval-interval 1000 --eval-iters 0 --distributed-timeout-minutes 1 --split 1,0,0 "
    f"--tokenizer-type NullTokenizer --vocab-size {VOCAB}"
).split()


def reverse_task(n: int, seed: int) -> list[dict]:
    """'reverse these 3 letters': prompt `a b c`, response `c b a` (letters as ids)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        letters = [str(rng.choice(LETTERS)) for _ in range(3)]
        out.append({"prompt": " ".join(letters), "response": " ".join(reversed(letters))})
    return out


def addition_task(n: int, seed: int, top: int = 4) -> list[dict]:
    """'what is A+B': prompt `A B`, response their sum, numbers k written as id 10 + k."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, top), rng.randint(0, top)
        out.append({"prompt": f"{10 + a} {10 + b}", "response": str(10 + a + b)})
    return out


def write_records(path, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def preprocess(jsonl: str, prefix: str, task: str = "sft", *extra: str) -> str:
    """tools/preprocess_sft_data.py on `jsonl`; the --data-path prefix it wrote."""
    r = run_tool(
        "preprocess_sft_data.py",
        *("--input", jsonl, "--output-prefix", prefix, "--task", task),
        *("--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), *extra),
    )
    assert r.returncode == 0, r.stderr
    return f"{prefix}_{task}_document"


def train(flags: list[str]) -> str:
    """The training entry point's loop on this rank (forked by run_distributed); its log."""
    from megatron_lite import training

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        training.pretrain(parse_args(flags))
    return out.getvalue()


def losses(log: str, name: str = "lm loss") -> dict[int, float]:
    pattern = LOSS_RE.pattern.replace("lm loss", re.escape(name))
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(pattern, log)}
