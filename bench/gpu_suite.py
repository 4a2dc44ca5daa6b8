"""The measurements of bench/gpu_suite.sh, for the day a GPU is lent (the shell script first builds the
CUDA extension and runs the `gpu` tests; this script then measures and prints one table).

    python bench/gpu_suite.py            # on a CUDA machine: the figures below
    python bench/gpu_suite.py --dry-run  # anywhere (CPU, gloo): every step at tiny sizes

Measured:
- training throughput (tokens/s per GPU and MFU from `pretrain_gpt`'s own log line) of a GPT of about
  1.3B parameters (24 layers, hidden 2048, 16 heads, seq 2048, vocab 50257) in bf16 on one GPU, with
  the SDPA attention path (flash) and the fused softmax kernel path; the optimizer is apex's fused
  Adam when importable, else torch's AdamW(fused=True);
- NCCL all-reduce bus bandwidth (nccl-tests' definition: bytes x 2(n-1)/n / time) over every GPU of
  the machine, when it has two or more.
Each figure is the median over the timed steps after WARMUP; the command behind it is printed with it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3
GPT_1_3B = (
    "--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 "
    "--max-position-embeddings 2048 --micro-batch-size 4 --global-batch-size 8 --bf16 "
    "--vocab-size 50257 --train-iters 12"
).split()
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 "
    "--vocab-size 512 --train-iters 5"
).split()
COMMON = (
    "--mock-data --tokenizer-type NullTokenizer --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine "
    "--hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-iters 0 --eval-interval 1000 "
    "--seed 1234"
).split()
LINE_RE = re.compile(
    r" iteration\s+(\d+)/.*?(?:MFU: ([0-9.]+)% \|)? tokens per second: ([0-9.]+) \|"
)


def torchrun(nproc: int) -> list[str]:
    from megatron_lite.parallel_state import free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}"]  # fmt: skip


def run(cmd: list[str], timeout: float) -> str:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(
            f"error: {' '.join(cmd)} failed (rc {out.returncode}):\n{(out.stdout + out.stderr)[-4000:]}"
        )
    return out.stdout


def training(backend: str, dry: bool) -> tuple[str, str, str]:
    """(tokens/s per GPU, MFU, command) of pretrain_gpt with --attention-backend `backend`."""
    flags = [*(TINY if dry else GPT_1_3B), *COMMON, "--attention-backend", backend]
    cmd = [*torchrun(1), "-m", "megatron_lite.pretrain_gpt", *flags]
    rows = [m.groups() for m in LINE_RE.finditer(run(cmd, 120 if dry else 300))]
    timed = [r for r in rows if int(r[0]) > WARMUP] or rows
    if not timed:
        raise SystemExit(f"error: no training log lines from {' '.join(cmd)}")
    tokens = statistics.median(float(r[2]) for r in timed)
    mfus = [float(r[1]) for r in timed if r[1] is not None]
    mfu = f"{statistics.median(mfus):.1f}%" if mfus else "n/a (peak unknown)"
    return (
        f"{tokens:,.0f}",
        mfu,
        " ".join(["torchrun --nproc_per_node=1 -m megatron_lite.pretrain_gpt", *flags]),
    )


def allreduce_worker(size_mb: float, iters: int) -> None:
    """One rank of the all-reduce measurement (started by torchrun from allreduce())."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    x = torch.ones(int(size_mb * 2**20) // 4, device="cuda" if cuda else "cpu")
    times = []
    for i in range(WARMUP + iters):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - t)
    busbw = x.numel() * 4 * 2 * (n - 1) / n / statistics.median(times) / 1e9
    if rank == 0:
        print(f"busbw GB/s: {busbw:.2f}", flush=True)
    dist.destroy_process_group()


def allreduce(dry: bool) -> tuple[str, str]:
    import torch

    n = 2 if dry else torch.cuda.device_count()
    if n < 2:
        return f"n/a ({n} GPU: needs two or more)", "-"
    size, iters = (1, 3) if dry else (256, 20)
    cmd = [*torchrun(n), "bench/gpu_suite.py", "--allreduce-worker", str(size), str(iters)]
    m = re.search(r"busbw GB/s: ([0-9.]+)", run(cmd, 120))
    if not m:
        raise SystemExit(f"error: no bandwidth line from {' '.join(cmd)}")
    return f"{float(m.group(1)):.1f} GB/s ({n} ranks, {size} MiB)", " ".join(["torchrun", *cmd[3:]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on CPU (gloo): check the steps"
    )
    p.add_argument("--allreduce-worker", nargs=2, type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.allreduce_worker:
        allreduce_worker(args.allreduce_worker[0], int(args.allreduce_worker[1]))
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run to check the steps on CPU)", file=sys.stderr)
        return 2
    where = "dry run, CPU, tiny model" if args.dry_run else torch.cuda.get_device_name()
    rows = []
    for backend in ("sdpa", "fused"):
        tokens, mfu, cmd = training(backend, args.dry_run)
        rows.append(
            (
                f"train GPT {'tiny fp32' if args.dry_run else '1.3B bf16'}, {backend} attention",
                f"{tokens} tokens/s/GPU, MFU {mfu}",
                cmd,
            )
        )
    bw, cmd = allreduce(args.dry_run)
    rows.append(("all-reduce bus bandwidth", bw, cmd))
    print(f"\n## GPU suite: {where} (torch {torch.__version__})\n")
    print("| measurement | figure | command |\n| --- | --- | --- |")
    for name, figure, cmd in rows:
        print(f"| {name} | {figure} | `{cmd}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
