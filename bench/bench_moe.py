"""Mixture-of-experts benchmarks (CPU unless CUDA is present; nothing asserted, ratios printed):

1. tokens/s of a dense GPT against an MoE GPT of equal *active* parameters: the dense MLP is
   k x f wide, the MoE has E experts of width f and routes each token to k of them (top-k);
2. alltoall against allgather token dispatch at ep 2 (two ranks of a gloo process group, or
   one per GPU with NCCL when there are two).

    .venv/bin/python bench/bench_moe.py             # both parts; --steps N, --smoke (tiny)

Each figure is the median over steps of forward + backward of one microbatch (no optimizer);
steps of the compared models alternate so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from megatron_lite import device as dev
from megatron_lite.config import Config, ModelConfig, MoEConfig, TrainConfig
from megatron_lite.model import build_model_chunks
from megatron_lite.parallel_state import ParallelState

SIZES = {"layers": 4, "hidden": 256, "heads": 4, "seq": 256, "batch": 8, "vocab": 8192, "ffn": 512}
SMOKE = {"layers": 1, "hidden": 32, "heads": 2, "seq": 32, "batch": 2, "vocab": 512, "ffn": 64}
EXPERTS, TOPK = 8, 2


def make_cfg(z: dict, moe: dict | None, ep: int = 1) -> Config:
    ffn = z["ffn"] if moe else TOPK * z["ffn"]  # the dense MLP as wide as k experts
    model = ModelConfig(
        num_layers=z["layers"],
        hidden_size=z["hidden"],
        num_attention_heads=z["heads"],
        ffn_hidden_size=ffn,
        seq_length=z["seq"],
        max_position_embeddings=z["seq"],
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    experts = MoEConfig(
        num_experts=EXPERTS, moe_router_topk=TOPK, expert_model_parallel_size=ep, **moe
    ) if moe else MoEConfig()  # fmt: skip
    return Config(model=model, moe=experts, train=TrainConfig(micro_batch_size=z["batch"]))


def step_fn(cfg: Config, ps: ParallelState, z: dict, device: torch.device):
    model = build_model_chunks(cfg, ps, z["vocab"], device)[0]
    g = torch.Generator().manual_seed(ps.rank)
    tokens = torch.randint(0, z["vocab"], (z["batch"], z["seq"] + 1), generator=g).to(device)

    def step() -> float:
        dev.synchronize(device)
        t = time.perf_counter()
        model(tokens[:, :-1], None, None, tokens[:, 1:]).mean().backward()
        dev.synchronize(device)
        return time.perf_counter() - t

    return step


def race(steps: dict, n: int) -> dict[str, float]:
    """Median seconds per step of each, run alternately after one warm-up each."""
    times = {name: [] for name in steps}
    for fn in steps.values():
        fn()
    for _ in range(n):
        for name, fn in steps.items():
            times[name].append(fn())
    return {name: statistics.median(t) for name, t in times.items()}


def dense_vs_moe(z: dict, n: int, device: torch.device) -> None:
    single = ParallelState.single()
    steps = {
        "dense": step_fn(make_cfg(z, None), single, z, device),
        "moe": step_fn(make_cfg(z, {}), single, z, device),
    }
    t = race(steps, n)
    tokens = z["batch"] * z["seq"]
    print(f"dense (ffn {TOPK * z['ffn']}) vs MoE ({EXPERTS} experts of ffn {z['ffn']}, top-{TOPK}), "
          f"{device.type}, forward + backward, median of {n}")  # fmt: skip
    for name, s in t.items():
        print(f"  {name:6s} {tokens / s:12,.0f} tokens/s")
    print(f"  ratio moe / dense tokens/s: {t['dense'] / t['moe']:.2f}")


def _dispatch_race(z: dict, n: int) -> dict[str, float]:
    torch.set_num_threads(1)
    ps = ParallelState.build(ep=2)
    device = dev.get_device()
    dev.set_device(device)
    steps = {
        kind: step_fn(make_cfg(z, {"moe_token_dispatcher_type": kind}, ep=2), ps, z, device)
        for kind in ("alltoall", "allgather")
    }
    t = race(steps, n)
    worst = torch.tensor([t["alltoall"], t["allgather"]])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank does
    return {"alltoall": float(worst[0]), "allgather": float(worst[1])}


def alltoall_vs_allgather(z: dict, n: int) -> None:
    from megatron_lite.distributed.testing import run_distributed

    backend = "nccl" if dev.device_count() >= 2 else "gloo"
    t = run_distributed(_dispatch_race, 2, z, n, backend=backend, timeout=600)[0]
    tokens = 2 * z["batch"] * z["seq"]
    print(f"token dispatch at ep 2 ({backend}), {EXPERTS} experts top-{TOPK}, median of {n}")
    for name, s in t.items():
        print(f"  {name:9s} {tokens / s:12,.0f} tokens/s")
    print(f"  ratio alltoall / allgather tokens/s: {t['allgather'] / t['alltoall']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (figures mean nothing)")
    parser.add_argument("--part", choices=["all", "dense", "dispatch"], default="all")
    args = parser.parse_args()
    z = SMOKE if args.smoke else SIZES
    if args.part in ("all", "dense"):
        dense_vs_moe(z, args.steps, dev.get_device())
    if args.part in ("all", "dispatch"):
        alltoall_vs_allgather(z, args.steps)


if __name__ == "__main__":
    main()
