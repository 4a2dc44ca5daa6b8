"""Checkpoint save and load time and size for a ~100M-parameter GPT (single process, CPU).

    .venv/bin/python bench/bench_checkpoint.py [--layers 8 --hidden 768 --dir /tmp/ckpt_bench]

Builds the real GPT (GPT-2 vocabulary, 8 x 768 layers: ~97M parameters) with DDP and AdamW, takes one
optimizer step so the Adam moments are real, then times `save_checkpoint` (fsync included) and
`load_checkpoint` (model + optimizer + scheduler + RNG) and reports the file size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_lite import checkpointing as ckpt  # noqa: E402
from megatron_lite.config import (  # noqa: E402
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from megatron_lite.distributed import wrap_model_chunks  # noqa: E402
from megatron_lite.model.gpt import build_model_chunks  # noqa: E402
from megatron_lite.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from megatron_lite.parallel_state import ParallelState  # noqa: E402
from megatron_lite.training import optimizer_step  # noqa: E402

VOCAB = 50257


def build(args, seed: int):
    cfg = Config(
        model=ModelConfig(
            num_layers=args.layers,
            hidden_size=args.hidden,
            num_attention_heads=args.hidden // 64,
            seq_length=1024,
        ),
        data=DataConfig(tokenizer_type="NullTokenizer", vocab_size=VOCAB),
        optim=OptimConfig(lr=1e-4),
        train=TrainConfig(train_iters=100, seed=seed),
    ).finalize(1)
    ps = ParallelState.single()
    chunks = wrap_model_chunks(cfg, build_model_chunks(cfg, ps, cfg.padded_vocab_size(VOCAB)), ps)
    opt = build_optimizer(cfg, chunks, ps)
    return cfg, ps, chunks, opt, build_lr_scheduler(cfg, opt)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--dir", default="/tmp/megatron_lite_ckpt_bench")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    shutil.rmtree(args.dir, ignore_errors=True)

    cfg, ps, chunks, opt, sched = build(args, seed=1)
    n_params = sum(p.numel() for c in chunks for p in c.module.parameters())
    for c in chunks:  # one real step: Adam moments become non-zero
        for p in c.module.parameters():
            p.main_grad.normal_(0, 1e-3)
    optimizer_step(chunks, opt)
    sched.step(cfg.train.global_batch_size)
    print(
        f"model: {args.layers} layers x hidden {args.hidden}, vocab {VOCAB}: "
        f"{n_params / 1e6:.1f}M parameters (fp32, AdamW)"
    )

    saves, loads = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(args.dir, 1 + r, chunks, opt, sched, cfg, ps, 1000)
        saves.append(time.perf_counter() - t0)
    size = dir_bytes(path)

    cfg2, ps2, chunks2, opt2, sched2 = build(args, seed=2)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ckpt.load_checkpoint(args.dir, chunks2, opt2, sched2, cfg2, ps2)
        loads.append(time.perf_counter() - t0)
    for (n, a), b in zip(chunks[0].module.named_parameters(), chunks2[0].module.parameters()):
        assert torch.equal(a, b), n

    t0 = time.perf_counter()
    n_full = 0
    for _, t in ckpt.iter_full_state(args.dir):  # touch every value: mmap reads lazily
        n_full += t.numel()
        t.sum()
    stream = time.perf_counter() - t0

    gib = size / 2**30
    print(
        f"checkpoint size: {size / 2**20:.0f} MiB ({size / n_params:.1f} bytes/parameter: "
        "weights + exp_avg + exp_avg_sq in fp32)"
    )
    print(f"save (incl. fsync): best {min(saves):.2f} s  ({gib / min(saves):.2f} GiB/s)")
    print(f"load (model + optimizer): best {min(loads):.2f} s  ({gib / min(loads):.2f} GiB/s)")
    print(f"stream every full tensor (iter_full_state, {n_full / 1e6:.1f}M values): {stream:.2f} s")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
