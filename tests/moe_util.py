"""A tiny MoE GPT trained with the library's own step (`training.train_step`) on synthetic batches,
in any layout: what tests/test_moe.py compares against one process."""

from __future__ import annotations

import torch
from factory import NO_DROPOUT, tiny_config

from megatron_lite import checkpointing
from megatron_lite.config import Config
from megatron_lite.distributed import DistributedDataParallel
from megatron_lite.model import build_model_chunks
from megatron_lite.model.moe import router
from megatron_lite.optim import (
    build_lr_scheduler,
    build_num_microbatches_calculator,
    build_optimizer,
)
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training import train_step
from megatron_lite.training.setup import Run
from megatron_lite.training.step import average_over_last_stage

VOCAB, SEQ, MBS, GBS = 100, 16, 2, 8


def make_cfg(world: int, tp=1, pp=1, ep=1, dist_opt=False, sp=False, **moe) -> Config:
    moe = {"num_experts": 4, "moe_aux_loss_coeff": 1e-2, "moe_z_loss_coeff": 1e-3, **moe}
    return tiny_config(
        world, num_layers=4, seq_length=SEQ, max_position_embeddings=SEQ, **NO_DROPOUT,
        tp=tp, pp=pp, use_distributed_optimizer=dist_opt, sp=sp, vocab_size=VOCAB,
        lr=1e-2, clip_grad=1.0, lr_warmup_iters=1,
        micro_batch_size=MBS, global_batch_size=GBS, train_iters=20, seed=5, ep=ep, **moe,
    )  # fmt: skip


def build_run(cfg: Config, ps: ParallelState) -> Run:
    padded = cfg.padded_vocab_size(VOCAB)
    chunks = build_model_chunks(cfg, ps, padded, vocab_size=VOCAB)
    model = [DistributedDataParallel(c, cfg, ps) for c in chunks]
    opt = build_optimizer(cfg, model, ps)
    sched = build_lr_scheduler(cfg, opt)
    mb = build_num_microbatches_calculator(cfg)
    return Run(cfg, ps, torch.device("cpu"), None, padded, model, opt, sched, mb)


def sample(i: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (SEQ + 1,), generator=torch.Generator().manual_seed(1000 + i))


def batches(step: int, ps: ParallelState, cfg: Config):
    """This dp rank's microbatches of global batch `step` (the real sampler's order: microbatch j
    of dp rank r holds samples j * mbs * dp + r * mbs ...)."""
    dp, m = ps.dp_size, cfg.num_microbatches
    for j in range(m):
        first = step * GBS + j * MBS * dp + ps.dp_rank * MBS
        tokens = torch.stack([sample(first + k) for k in range(MBS)])
        yield {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(MBS, SEQ),
            "position_ids": torch.arange(SEQ)[None].expand(MBS, SEQ),
        }


class DropCounter:
    """Counts the routing slots capacity dropping removes on this rank (wraps the router's cut)."""

    def __init__(self):
        self.dropped = 0
        self._cut = router.keep_within_capacity

    def __enter__(self):
        def counting(probs, routing_map, cap, policy):
            kept = self._cut(probs, routing_map, cap, policy)
            self.dropped += int(routing_map.sum() - kept.sum())
            return kept

        router.keep_within_capacity = counting
        return self

    def __exit__(self, *exc):
        router.keep_within_capacity = self._cut


def train(run: Run, steps: range) -> list[dict]:
    """lm loss, per-layer aux losses and dropped slots (summed over this rank) per step."""
    out = []
    for step in steps:
        with DropCounter() as drops:
            result = train_step(run, batches(step, run.ps, run.cfg))
        run.iteration += 1
        run.consumed_samples += GBS
        loss = result["loss"]  # this dp rank's, on the last stage: averaged like the log's
        mine = torch.tensor([loss or 0.0, float(loss is not None)], dtype=torch.float64)
        result["loss"] = average_over_last_stage(run, mine)
        out.append({**result, "dropped": drops.dropped})
    return out


def save(run: Run, path: str) -> None:
    checkpointing.save_checkpoint(
        path,
        run.iteration,
        run.model,
        run.optimizer,
        run.scheduler,
        run.cfg,
        run.ps,
        run.consumed_samples,
        vocab_size=VOCAB,
    )


def load(run: Run, path: str) -> None:
    state = checkpointing.load_checkpoint(
        path, run.model, run.optimizer, run.scheduler, run.cfg, run.ps, vocab_size=VOCAB
    )
    run.iteration, run.consumed_samples = state["iteration"], state["consumed_samples"]
