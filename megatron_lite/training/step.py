"""One training iteration and one evaluation pass, across every pipeline stage of this rank.

The DDP lifecycle of a step is driven from here and nowhere else, in Megatron's order:
zero the gradient buffers -> forward/backward over the microbatches (the pipeline schedule) ->
finalize the gradients (dp reduction, sequence-parallel and tied-embedding all-reduces) -> land the
previous step's parameter all-gathers -> optimizer step -> start this step's parameter all-gathers.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from megatron_lite import comm
from megatron_lite.distributed import (
    DistributedDataParallel,
    finalize_model_grads,
    finish_param_gather,
    start_param_gather,
    zero_grad_buffers,
)
from megatron_lite.model import moe
from megatron_lite.optim import MegatronOptimizer
from megatron_lite.pipeline import get_forward_backward_func
from megatron_lite.timers import NO_TIMERS, Timers
from megatron_lite.training.dpo import DPO_METRICS, dpo_loss_func, flatten_pairs
from megatron_lite.training.setup import Run


def _to_device(batch: dict, dev: torch.device) -> dict:
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_step(
    data_iterator,
    model: torch.nn.Module,
    poison_loss: bool = False,
    timers: Timers = NO_TIMERS,
    dpo_beta: float | None = None,
    cp_group: comm.Group = None,
):
    """Megatron's forward step: one microbatch through this chunk; the loss function on the last.
    `poison_loss` makes the loss nan (the fault tests' injected nan); `dpo_beta` (--dpo) makes it
    the DPO loss of preference pairs (training/dpo.py). `cp_group`: the ranks holding the other
    chunks of these sequences (context parallelism), over which the loss is summed."""
    with timers("batch-generator", 2):
        batch = _to_device(next(data_iterator), next(model.parameters()).device)
    if dpo_beta is not None:  # --dpo: [b, 2, s] pairs run as [2b, s] rows
        batch = flatten_pairs(batch)
    output = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"]
    )
    if dpo_beta is not None:
        return output, dpo_loss_func(batch, dpo_beta, poison_loss)
    loss_mask = batch["loss_mask"].float()

    def loss_func(per_token_loss: torch.Tensor):
        loss, reported = cp_loss((per_token_loss.float() * loss_mask).sum(), loss_mask, cp_group)
        if poison_loss:
            loss, reported = loss * float("nan"), reported * float("nan")
        return loss, {"lm loss": reported}

    return output, loss_func


def cp_loss(
    local_sum: torch.Tensor, loss_mask: torch.Tensor, cp_group: comm.Group
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, loss to report) of a microbatch whose tokens are split over the cp
    group: each rank's share of the sum over all its tokens, over the count of all of them. The
    backward loss is cp x that share, because DDP averages gradients over dp x cp: the cp ranks'
    gradients then add up to the gradient of the whole sequence's mean."""
    count = loss_mask.sum()
    cp = comm.group_size(cp_group)
    if cp == 1:
        loss = local_sum / count.clamp(min=1)
        return loss, loss.detach()
    count = count.detach().clone()
    comm.all_reduce(count, cp_group)
    total = local_sum.detach().clone()
    comm.all_reduce(total, cp_group)
    count = count.clamp(min=1)
    return local_sum * cp / count, total / count


def _mean_reported(losses: list[dict], key: str = "lm loss") -> float | None:
    if not losses:
        return None
    return float(torch.stack([d[key].float() for d in losses]).mean())


def reported_names(cfg) -> tuple[str, ...]:
    """What a step reports (and the log averages): the loss, and under --dpo its metrics."""
    return ("lm loss", *DPO_METRICS) if cfg.data.dpo else ("lm loss",)


def step_settings(cfg) -> tuple[dict, int]:
    """(forward_step's extra arguments, rows per microbatch) for this kind of training: a DPO
    microbatch of b pairs is 2b rows through the pipeline."""
    if cfg.data.dpo:
        return {"dpo_beta": cfg.train.dpo_beta}, 2 * cfg.train.micro_batch_size
    return {}, cfg.train.micro_batch_size


def train_step(run: Run, data_iterators) -> dict:
    """Forward and backward over all microbatches, gradient sync, one optimizer step."""
    cfg, iteration = run.cfg, run.iteration + 1
    run.microbatches.update(run.consumed_samples)
    run.faults.raise_if_due(iteration, run.ps.rank)
    zero_grad_buffers(run.model)
    forward_backward = get_forward_backward_func(cfg, run.ps)
    extra, rows = step_settings(cfg)
    num_microbatches = run.microbatches.get()
    if cfg.moe.enabled:  # dense steps skip the MoE records entirely
        moe.start_step(run.optimizer.get_loss_scale(), num_microbatches)
    with run.timers("forward-backward", 1):
        losses = forward_backward(
            forward_step_func=functools.partial(
                forward_step,
                poison_loss=run.faults.nan_loss_at(iteration),
                timers=run.timers,
                cp_group=run.ps.cp_group,
                **extra,
            ),
            data_iterator=data_iterators,
            model=run.model,
            num_microbatches=num_microbatches,
            seq_length=cfg.model.seq_length // run.ps.cp_size,  # this rank's part of a sequence
            micro_batch_size=rows,
            forward_only=False,
            grad_scale_func=run.optimizer.scale_loss,
            timers=run.timers,
        )
    with run.timers("all-grads-sync", 1):
        finalize_model_grads(run.model, run.ps)
    success, grad_norm = optimizer_step(run.model, run.optimizer, run.timers)
    if success:
        run.scheduler.step(run.microbatches.get_current_global_batch_size())  # counts samples
    reported = {n: _mean_reported(losses, n) for n in reported_names(cfg)}
    out = {"loss": reported["lm loss"], "reported": reported, "success": success}
    out["grad_norm"] = grad_norm
    if cfg.moe.enabled:  # per layer, averaged over microbatches and dp (collective)
        out["moe_losses"] = moe.step_aux_losses(cfg, num_microbatches, run.ps)
    return out


def optimizer_step(
    model: list[DistributedDataParallel], optimizer: MegatronOptimizer, timers: Timers = NO_TIMERS
) -> tuple[bool, float | None]:
    """Land the last step's parameter all-gathers, step, start this step's (ZeRO-1).
    -> (stepped, grad norm), as `MegatronOptimizer.step`."""
    with timers("params-all-gather", 1):
        finish_param_gather(model)
    with timers("optimizer", 1):
        success, grad_norm = optimizer.step()
    if success:
        with timers("params-all-gather", 1):
            start_param_gather(model)
    return success, grad_norm


def land_params(run: Run) -> None:
    """Before anything reads the parameters outside a forward (a save): land the all-gathers
    `train_step` left in flight under --overlap-param-gather."""
    finish_param_gather(run.model)


@torch.no_grad()
def evaluate(run: Run, data_iterators, num_batches: int) -> float | None:
    """Average lm loss over `num_batches` global batches (forward only); valid on every rank."""
    cfg = run.cfg
    forward_only = get_forward_backward_func(cfg, run.ps)
    extra, rows = step_settings(cfg)
    for chunk in run.model:
        chunk.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for _ in range(num_batches):
        losses = forward_only(
            forward_step_func=functools.partial(forward_step, cp_group=run.ps.cp_group, **extra),
            data_iterator=data_iterators,
            model=run.model,
            num_microbatches=cfg.num_microbatches,
            seq_length=cfg.model.seq_length // run.ps.cp_size,
            micro_batch_size=rows,
            forward_only=True,
        )
        if losses:
            total += torch.tensor([_mean_reported(losses), 1.0], dtype=torch.float64)
    for chunk in run.model:
        chunk.train()
    return average_over_last_stage(run, total)


def average_over_last_stage(run: Run, total: torch.Tensor) -> float | None:
    """Sum (value, count) over the world; only last-stage ranks contribute (tp ranks agree)."""
    means = averages_over_last_stage(run, total)
    return None if means is None else means[0]


def averages_over_last_stage(run: Run, total: torch.Tensor) -> list[float] | None:
    """Sum (values..., count) over the world (one all-reduce): each value's mean, or None."""
    if not (run.ps.is_last_stage and run.ps.tp_rank == 0):
        total = torch.zeros_like(total)
    comm.all_reduce(total, dist.group.WORLD)
    return (total[:-1] / total[-1]).tolist() if total[-1] > 0 else None
