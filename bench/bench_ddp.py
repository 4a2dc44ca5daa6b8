"""Data parallelism and the optimizer on gloo: optimizer memory, collectives per step, overlap.

    .venv/bin/python bench/bench_ddp.py [--layers 4 --hidden 256 --vocab 8192 --steps 7]

Prints, for the real GPT under our DDP (forked gloo ranks, one thread each):
1. optimizer-state bytes per rank (Adam moments + fp32 masters when separate) for dp = 1, 2, 4, with
   and without the distributed optimizer, fp32 and bf16 weights, and the ratio to dp = 1;
2. collectives and bytes reduced per step at dp = 2 with 4 microbatches, for several bucket sizes
   (gradient accumulation must not multiply them: one reduction per bucket per step);
3. one training step's time at dp = 2 under the distributed optimizer: no overlap,
   --overlap-grad-reduce, and that plus --overlap-param-gather (median of --steps after a warm-up
   step), with the ratios. Timings on 2 shared cores are noisy; the counts are exact.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_lite import comm  # noqa: E402
from megatron_lite.config import (  # noqa: E402
    Config,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from megatron_lite.device import params_dtype  # noqa: E402
from megatron_lite.distributed import (  # noqa: E402
    finalize_model_grads,
    wrap_model_chunks,
    zero_grad_buffers,  # noqa: E402
)
from megatron_lite.distributed.testing import run_distributed  # noqa: E402
from megatron_lite.model import build_model_chunks  # noqa: E402
from megatron_lite.optim import build_optimizer  # noqa: E402
from megatron_lite.parallel_state import ParallelState  # noqa: E402
from megatron_lite.pipeline import get_forward_backward_func  # noqa: E402
from megatron_lite.training import optimizer_step  # noqa: E402

SEQ, MBS, MICRO = 128, 2, 4


def make_cfg(args, **par) -> Config:
    bf16 = par.pop("bf16", False)
    return Config(
        model=ModelConfig(
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_attention_heads=max(1, args.hidden // 64),
            seq_length=SEQ,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        ),
        parallel=ParallelConfig(**par),
        optim=OptimConfig(lr=1e-4, bf16=bf16),
        train=TrainConfig(micro_batch_size=MBS),
    )


def forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    out = model(tokens, None, None, labels)
    return out, lambda o: (o.mean(), {"lm loss": o.mean().detach()})


def _setup(args, **par):
    ps = ParallelState.build(1, 1)
    cfg = make_cfg(args, **par)
    cfg.finalize(ps.world_size)
    chunks = [
        c.to(params_dtype(cfg.optim))
        for c in build_model_chunks(cfg, ps, cfg.padded_vocab_size(args.vocab))
    ]
    model = wrap_model_chunks(cfg, chunks, ps)
    return ps, cfg, model, build_optimizer(cfg, model, ps)


def _step(args, ps, model, opt, fb, step: int) -> tuple[float, int, int]:
    """One training step; -> (seconds, collectives, bytes) of the gradient reduction."""
    g = torch.Generator().manual_seed(step * 100 + ps.dp_rank)
    data = [
        (t[:, :-1], t[:, 1:])
        for t in torch.randint(0, args.vocab, (MICRO, MBS, SEQ + 1), generator=g)
    ]
    torch.distributed.barrier()
    start = time.perf_counter()
    zero_grad_buffers(model)
    comm.stats.reset()
    fb(forward_step, iter(data), model, MICRO, SEQ, MBS)
    finalize_model_grads(model, ps)
    calls, nbytes = comm.stats.calls, comm.stats.bytes
    optimizer_step(model, opt)
    return time.perf_counter() - start, calls, nbytes


def _memory(args, dist_opt: bool, bf16: bool):
    ps, cfg, model, opt = _setup(args, use_distributed_optimizer=dist_opt, bf16=bf16)
    _step(args, ps, model, opt, get_forward_backward_func(cfg, ps), 0)  # creates the Adam state
    n_params = sum(p.numel() for c in model for p in c.parameters())
    return opt.optimizer_state_bytes(), n_params


def _collectives(args, bucket: int | None):
    ps, cfg, model, opt = _setup(args, ddp_bucket_size=bucket, overlap_grad_reduce=True)
    fb = get_forward_backward_func(cfg, ps)
    out = [_step(args, ps, model, opt, fb, s)[1:] for s in range(2)]
    return out, sum(len(b.buckets) for c in model for b in c.buffers)


TIMED = {  # label -> (--overlap-grad-reduce, --overlap-param-gather)
    "no overlap": (False, False),
    "overlap grad reduce": (True, False),
    "overlap grad reduce + param gather": (True, True),
}


def _timing(args, label: str):
    grad, param = TIMED[label]
    ps, cfg, model, opt = _setup(
        args,
        overlap_grad_reduce=grad,
        overlap_param_gather=param,
        ddp_bucket_size=args.bucket,
        use_distributed_optimizer=True,
    )
    fb = get_forward_backward_func(cfg, ps)
    times = [_step(args, ps, model, opt, fb, s)[0] for s in range(args.steps + 1)]
    return times[1:]  # the first step learns the gradient order (and warms up)


def _print_memory(args) -> None:
    print("\n1. optimizer-state bytes per rank (Adam moments + separate fp32 masters)")
    for bf16 in (False, True):
        base = None
        for dp in (1, 2, 4):
            for dist_opt in (False, True):
                res = run_distributed(_memory, dp, args, dist_opt, bf16, timeout=600)
                per_rank, n = max(r[0] for r in res), res[0][1]
                base = base or per_rank
                print(
                    f"   {'bf16' if bf16 else 'fp32'} dp={dp} distributed_optimizer={dist_opt!s:5}: "
                    f"{per_rank / 2**20:8.2f} MiB/rank = {per_rank / n:5.2f} B/param "
                    f"({per_rank / base:.3f} of dp=1)"
                )


def _print_collectives(args) -> None:
    print(f"\n2. gradient collectives per step at dp=2, {MICRO} microbatches (overlap on)")
    for bucket in (None, 1_000_000, 250_000):
        res, n_buckets = run_distributed(_collectives, 2, args, bucket, timeout=600)[0]
        (c0, b0), (c1, b1) = res
        print(
            f"   bucket {bucket or 'default':>9}: {n_buckets} buckets; step 1: {c0} collectives, "
            f"{b0 / 2**20:.2f} MiB; step 2: {c1} collectives, {b1 / 2**20:.2f} MiB"
        )


def _print_timing(args) -> None:
    print(
        f"\n3. step time at dp=2, distributed optimizer, bucket {args.bucket} (median of {args.steps})"
    )
    med = {}
    for label in TIMED:
        times = run_distributed(_timing, 2, args, label, timeout=600)
        per_step = [max(ts) for ts in zip(*times)]  # a step ends when the slowest rank ends
        med[label] = statistics.median(per_step)
        ratio = med["no overlap"] / med[label]
        print(f"   {label:>34}: {med[label] * 1e3:8.1f} ms   ratio no overlap / this {ratio:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--bucket", type=int, default=500_000, help="bucket size for the timing")
    ap.add_argument("--sections", default="1,2,3", help="which of the three figures to print")
    args = ap.parse_args()
    torch.set_num_threads(1)

    print(f"GPT {args.layers} x {args.hidden}, vocab {args.vocab}, seq {SEQ}, micro batch {MBS}")
    sections = {int(x) for x in args.sections.split(",")}
    if 1 in sections:
        _print_memory(args)
    if 2 in sections:
        _print_collectives(args)
    if 3 in sections:
        _print_timing(args)


if __name__ == "__main__":
    main()
