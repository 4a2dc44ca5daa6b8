"""Run the real entry point under torchrun and read its Megatron-format log lines."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
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


def load_tool(relpath: str, name: str | None = None):
    """Import a script under tools/ (e.g. "checkpoint/convert.py") as a module."""
    path = ROOT / "tools" / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem + "_tool", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


def launch(nproc: int, flags: list[str], env: dict | None = None) -> tuple:
    """torchrun in its own session; its output collects in the returned list of lines."""
    cmd, full_env = pretrain_command(nproc, flags, env)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=full_env,
    )
    lines: list[str] = []
    # proc.reader ends when every writer of the pipe (agent and ranks) has gone: join it to read all
    proc.reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    proc.reader.start()
    return proc, lines


def wait_for(lines, text, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in line for line in list(lines)):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    kill_job(proc)
    raise AssertionError(f"{text!r} never appeared:\n{''.join(lines)[-4000:]}")


def workers(proc) -> list[int]:
    """The torchrun agent's child processes (the ranks)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == proc.pid:
            kids.append(int(stat.parent.name))
    return kids


def kill_job(proc) -> None:
    """SIGKILL the ranks (torchrun starts each in its own session) and then the agent."""
    for pid in workers(proc):
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
