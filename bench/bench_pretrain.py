"""Pretraining throughput of the demo model through the real entry point, per layout.

    python bench/bench_pretrain.py [--iters 30] [--layouts 1x1x1,2x2x1]

Runs `torchrun -m megatron_lite.pretrain_gpt` on mock data (the demo's model shape: 4 layers, hidden 128,
4 heads, seq 128, vocab 4096, micro batch 4, global batch 16) for each tp x pp x dp layout, and prints the
median tokens/s of the logged iterations after the first five, with the ratio to the first layout.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_lite.parallel_state import free_port  # noqa: E402

DEMO_MODEL = (
    "--num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 "
    "--max-position-embeddings 128 --micro-batch-size 4 --global-batch-size 16 --lr 1e-3 "
    "--hidden-dropout 0 --attention-dropout 0 --log-interval 1 --eval-iters 0 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 4096"
).split()
TOKENS_RE = re.compile(r" iteration\s+(\d+)/.*? tokens per second: ([0-9.]+) \|")


def run(tp: int, pp: int, dp: int, iters: int) -> float:
    nproc = tp * pp * dp
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"),
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "megatron_lite.pretrain_gpt",
        *DEMO_MODEL,
        "--train-iters",
        str(iters),
        "--tensor-model-parallel-size",
        str(tp),
        "--pipeline-model-parallel-size",
        str(pp),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    rates = [float(r) for it, r in TOKENS_RE.findall(out.stdout) if int(it) > 5]
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--layouts", default="1x1x1,2x2x1", help="tp x pp x dp, comma separated")
    args = ap.parse_args()
    base = None
    print(f"demo model, mock data, {args.iters} iterations, CPU, {os.cpu_count()} cores")
    for layout in args.layouts.split(","):
        tp, pp, dp = (int(x) for x in layout.split("x"))
        rate = run(tp, pp, dp, args.iters)
        base = base or rate
        print(
            f"  tp{tp} x pp{pp} x dp{dp}: {rate:9.0f} tokens/s  ({rate / base:.2f}x of the first)"
        )


if __name__ == "__main__":
    main()
