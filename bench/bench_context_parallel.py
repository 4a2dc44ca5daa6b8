"""Ring attention (context parallelism) on gloo: attention forward + backward time per rank at
cp = 1, 2, 4, with the K/V exchange overlapped with the block compute and without (send, wait,
then compute), and the bytes each rank sends per call.

    .venv/bin/python bench/bench_context_parallel.py [--seq 2048 --heads 8 --groups 2 --dim 64]

One sequence of --seq tokens (batch 1), fp32, split over the cp ranks as training does (2cp chunks,
load-balanced); each rank runs one thread. Median of --steps calls after one warm-up call. On a
machine with fewer cores than cp ranks the ranks share cores, so per-rank times overstate cp > 1;
nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_lite import comm  # noqa: E402
from megatron_lite.distributed.testing import run_distributed  # noqa: E402
from megatron_lite.model.context_parallel import ring_attention  # noqa: E402


def _time_attention(seq: int, heads: int, groups: int, dim: int, steps: int) -> dict:
    """(median fwd+bwd seconds with overlap, without, bytes sent per call) on this rank."""
    cp = dist.get_world_size()
    group = dist.new_group(list(range(cp))) if cp > 1 else None
    g = torch.Generator().manual_seed(dist.get_rank())
    s = seq // cp
    q = torch.randn(1, heads, s, dim, generator=g, requires_grad=True)
    k, v = (torch.randn(1, groups, s, dim, generator=g, requires_grad=True) for _ in range(2))
    dout = torch.randn(1, heads, s, dim, generator=g)
    out = {}
    for overlap in (True, False):
        times = []
        for i in range(steps + 1):
            dist.barrier()
            comm.stats.reset()
            t0 = time.perf_counter()
            ring_attention(q, k, v, group, dim**-0.5, overlap=overlap).backward(dout)
            times.append(time.perf_counter() - t0)
            if i == 0:
                times.clear()  # warm-up
        out["overlap" if overlap else "serial"] = statistics.median(times)
        out["bytes"] = comm.stats.bytes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    print(
        f"ring attention fwd+bwd, seq {args.seq}, {args.heads} heads / {args.groups} kv groups "
        f"x {args.dim}, fp32, {os.cpu_count()} cores"
    )
    print(f"{'cp':>3} {'overlap ms':>11} {'serial ms':>10} {'overlap gain':>13} {'MiB sent':>9}")
    base = None
    for cp in args.cp:
        ranks = run_distributed(
            _time_attention, cp, args.seq, args.heads, args.groups, args.dim, args.steps,
            timeout=600,
        )  # fmt: skip
        over = max(r["overlap"] for r in ranks)  # the slowest rank sets the pace
        serial = max(r["serial"] for r in ranks)
        base = base or over
        print(
            f"{cp:>3} {1e3 * over:>11.1f} {1e3 * serial:>10.1f} {serial / over:>12.2f}x "
            f"{ranks[0]['bytes'] / 2**20:>9.2f}   ({base / over:.2f}x faster than cp{args.cp[0]})"
        )


if __name__ == "__main__":
    main()
