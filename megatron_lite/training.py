"""setup -> train_step -> evaluate -> train: one pretraining run, read top to bottom.

`pretrain(cfg)` is what `python -m megatron_lite.pretrain_gpt` calls. Every rank runs the same code; a rank
only does the parts its pipeline stage owns (the first stage embeds tokens, the last computes the loss and
logs), and every decision that must be the same everywhere (stop now? save now?) is agreed with one small
all-reduce per iteration.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite import checkpointing, device
from megatron_lite.config import Config
from megatron_lite.data import (
    build_pretraining_data_loader,
    build_tokenizer,
    build_train_valid_test_datasets,
    train_valid_test_num_samples,
)
from megatron_lite.data.sampler import cyclic_iter
from megatron_lite.distributed import DistributedDataParallel, finalize_model_grads
from megatron_lite.model import build_model_chunks
from megatron_lite.optim import (
    build_lr_scheduler,
    build_num_microbatches_calculator,
    build_optimizer,
)
from megatron_lite.parallel_state import ParallelState, init_distributed
from megatron_lite.pipeline import get_forward_backward_func
from megatron_lite.tensor_parallel import set_random_seed
from megatron_lite.train_logging import (
    TensorBoard,
    format_log_line,
    model_flops_per_token,
    perplexity,
    print_rank,
)


@dataclass
class Run:
    """Everything one rank holds during training."""

    cfg: Config
    ps: ParallelState
    device: torch.device
    tokenizer: object
    padded_vocab_size: int
    model: list  # this rank's model chunks, each wrapped in our DDP
    optimizer: object
    scheduler: object
    microbatches: object  # NumMicroBatchesCalculator: constant, or growing with --rampup-batch-size
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iters: int = 0
    nan_iters: int = 0

    @property
    def is_logging_rank(self) -> bool:
        """The last rank: last pipeline stage, last tp and dp rank (Megatron's choice)."""
        return self.ps.rank == self.ps.world_size - 1


FAULT_ENV = "MEGATRON_LITE_FAULT"


def _fault(kind: str, iteration: int, rank: int) -> bool:
    """Test hook for the fault-handling tests: MEGATRON_LITE_FAULT=raise:RANK:ITER (that rank raises
    at that iteration) or nan:ITER (that iteration's loss is nan on every rank)."""
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if spec[0] != kind:
        return False
    if kind == "raise":
        return (int(spec[1]), int(spec[2])) == (rank, iteration)
    return int(spec[1]) == iteration


class _StopSignal:
    """Remembers a SIGTERM (what SLURM sends before the time limit) until the iteration boundary."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):  # noqa: ARG002
        self.received = True


def set_seeds(seed: int, ps: ParallelState) -> None:
    """Python and numpy get `seed`; torch and the tp tracker get Megatron's per-stage/per-tp streams."""
    random.seed(seed)
    np.random.seed(seed)
    set_random_seed(seed, ps.tp_rank, ps.pp_rank)


def setup(cfg: Config) -> Run:
    """Process groups, model chunks for this stage, DDP, optimizer, scheduler; loads --load if given."""
    init_distributed(cfg.parallel.distributed_backend, cfg.parallel.distributed_timeout_minutes)
    cfg.finalize(dist.get_world_size())
    ps = ParallelState.build(
        cfg.parallel.tensor_model_parallel_size,
        cfg.parallel.pipeline_model_parallel_size,
        cfg.virtual_pipeline_size,
    )
    dev = device.get_device()
    device.set_device(dev)
    set_seeds(cfg.train.seed, ps)
    tokenizer = build_tokenizer(cfg.data)
    padded = cfg.padded_vocab_size(tokenizer.vocab_size)
    chunks = build_model_chunks(cfg, ps, padded)
    dtype = torch.bfloat16 if cfg.optim.bf16 else torch.float16 if cfg.optim.fp16 else None
    model = []
    for c in chunks:
        c.to(dev)
        if dtype is not None:
            c.to(dtype)
        model.append(DistributedDataParallel(c, cfg, ps))
    optimizer = build_optimizer(cfg, model, ps)
    scheduler = build_lr_scheduler(cfg, optimizer)
    microbatches = build_num_microbatches_calculator(cfg)
    run = Run(cfg, ps, dev, tokenizer, padded, model, optimizer, scheduler, microbatches)
    if cfg.checkpoint.load:
        state = checkpointing.load_checkpoint(
            cfg.checkpoint.load,
            model,
            optimizer,
            scheduler,
            cfg,
            ps,
            load_optim=not (cfg.checkpoint.no_load_optim or cfg.checkpoint.finetune),
            load_rng=not (cfg.checkpoint.no_load_rng or cfg.checkpoint.finetune),
            finetune=cfg.checkpoint.finetune,
            vocab_size=tokenizer.vocab_size,
        )
        if state["loaded"]:
            run.iteration, run.consumed_samples = state["iteration"], state["consumed_samples"]
            if run.is_logging_rank:
                print_rank(
                    f"> loaded checkpoint from {cfg.checkpoint.load} at iteration "
                    f"{run.iteration} (consumed samples {run.consumed_samples})"
                )
        elif cfg.checkpoint.exit_on_missing_checkpoint:
            raise FileNotFoundError(
                f"--load {cfg.checkpoint.load}: no checkpoint there (no "
                f"{checkpointing.LATEST_FILE}) and --exit-on-missing-checkpoint is set"
            )
        elif run.is_logging_rank:
            print_rank(f"> no checkpoint in {cfg.checkpoint.load}: training from scratch")
    if run.is_logging_rank:
        n_params = sum(p.numel() for c in chunks for p in c.parameters())
        print_rank(
            f"> megatron_lite: world {ps.world_size} = tp {ps.tp_size} x pp {ps.pp_size} x dp "
            f"{ps.dp_size}, {cfg.num_microbatches} microbatches of {cfg.train.micro_batch_size}, "
            f"padded vocab {padded}, {n_params:,} parameters on the last rank, backend {ps.backend}"
        )
    return run


def build_data_iterators(
    cfg: Config, tokenizer, ps: ParallelState, consumed_samples: int, num_chunks: int
) -> tuple:
    """(train, valid, test) iterators; one per model chunk (the interleaved schedule reads each
    microbatch once per chunk), or None for a split that --split leaves empty."""
    datasets = build_train_valid_test_datasets(cfg, tokenizer, train_valid_test_num_samples(cfg))
    mbs = cfg.train.micro_batch_size
    iterators = []
    for ds, consumed, forever in zip(datasets, (consumed_samples, 0, 0), (False, True, True)):
        if ds is None:
            iterators.append(None)
            continue
        per_chunk = []
        for _ in range(num_chunks):
            loader = build_pretraining_data_loader(
                ds, consumed, mbs, ps.dp_rank, ps.dp_size, cfg.data.num_workers
            )
            per_chunk.append(cyclic_iter(loader) if forever else iter(loader))
        iterators.append(per_chunk if num_chunks > 1 else per_chunk[0])
    return tuple(iterators)


def _to_device(batch: dict, dev: torch.device) -> dict:
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_step(data_iterator, model, iteration: int | None = None):
    """Megatron's forward step: one microbatch through this chunk; the loss function on the last."""
    batch = _to_device(next(data_iterator), next(model.parameters()).device)
    output = model(
        batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"]
    )
    loss_mask = batch["loss_mask"].float()

    def loss_func(per_token_loss: torch.Tensor):
        loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)
        if iteration is not None and _fault("nan", iteration, -1):
            loss = loss * float("nan")
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def _mean_reported(losses: list[dict], key: str = "lm loss") -> float | None:
    if not losses:
        return None
    return float(torch.stack([d[key].float() for d in losses]).mean())


def train_step(run: Run, data_iterators) -> dict:
    """Forward and backward over all microbatches, gradient sync, one optimizer step."""
    cfg = run.cfg
    run.microbatches.update(run.consumed_samples)
    if _fault("raise", run.iteration + 1, run.ps.rank):
        raise RuntimeError(f"injected fault on rank {run.ps.rank} ({FAULT_ENV})")
    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    forward_backward = get_forward_backward_func(cfg, run.ps)
    losses = forward_backward(
        forward_step_func=functools.partial(forward_step, iteration=run.iteration + 1),
        data_iterator=data_iterators,
        model=run.model,
        num_microbatches=run.microbatches.get(),
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=False,
        grad_scale_func=run.optimizer.scale_loss,
    )
    finalize_model_grads(run.model, run.ps)
    success, grad_norm = run.optimizer.step()
    if success:  # the schedule counts samples, as Megatron's
        run.scheduler.step(run.microbatches.get_current_global_batch_size())
    return {"loss": _mean_reported(losses), "success": success, "grad_norm": grad_norm}


@torch.no_grad()
def evaluate(run: Run, data_iterators, num_batches: int) -> float | None:
    """Average lm loss over `num_batches` global batches (forward only); valid on every rank."""
    cfg = run.cfg
    forward_only = get_forward_backward_func(cfg, run.ps)
    for chunk in run.model:
        chunk.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for _ in range(num_batches):
        losses = forward_only(
            forward_step_func=forward_step,
            data_iterator=data_iterators,
            model=run.model,
            num_microbatches=cfg.num_microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=True,
        )
        if losses:
            total += torch.tensor([_mean_reported(losses), 1.0], dtype=torch.float64)
    for chunk in run.model:
        chunk.train()
    return _average_over_last_stage(run, total)


def _average_over_last_stage(run: Run, total: torch.Tensor) -> float | None:
    """Sum (value, count) over the world; only last-stage ranks contribute (tp ranks agree)."""
    if not (run.ps.is_last_stage and run.ps.tp_rank == 0):
        total = torch.zeros_like(total)
    dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] > 0 else None


def _agree(run: Run, *flags: bool) -> list[bool]:
    """One all-reduce so that every rank takes the same stop/save decision."""
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    dist.all_reduce(t)
    return [bool(v > 0) for v in t.tolist()]


def save(run: Run) -> None:
    cfg = run.cfg
    t0 = time.time()
    checkpointing.save_checkpoint(
        cfg.checkpoint.save,
        run.iteration,
        run.model,
        run.optimizer,
        run.scheduler,
        cfg,
        run.ps,
        run.consumed_samples,
        vocab_size=run.tokenizer.vocab_size,
    )
    if run.is_logging_rank:
        print_rank(
            f"  saved checkpoint at iteration {run.iteration:7d} to {cfg.checkpoint.save} "
            f"in {time.time() - t0:.2f} s"
        )


def _log(run: Run, tb: TensorBoard, step: dict, elapsed: float, n_iters: int, loss: float) -> None:
    cfg, ps = run.cfg, run.ps
    gbs = run.microbatches.get_current_global_batch_size()
    tokens = gbs * cfg.model.seq_length * n_iters
    tflops = model_flops_per_token(cfg, run.padded_vocab_size) * tokens / elapsed / 1e12
    tflops /= ps.world_size
    lr, loss_scale = run.optimizer.param_groups[0]["lr"], float(run.optimizer.get_loss_scale())
    peak = cfg.logging.peak_tflops
    if peak is None and (cfg.optim.bf16 or cfg.optim.fp16):  # MFU against a known GPU's peak
        peak = device.peak_tflops(run.device)
    grad_norm = step["grad_norm"]
    line = format_log_line(
        iteration=run.iteration,
        train_iters=cfg.total_train_iters,
        consumed_samples=run.consumed_samples,
        elapsed_ms=1000 * elapsed / n_iters,
        lr=lr,
        global_batch_size=gbs,
        losses={"lm loss": loss},
        loss_scale=loss_scale,
        grad_norm=None if grad_norm is None else float(grad_norm),
        params_norm=step.get("params_norm"),
        skipped=run.skipped_iters,
        nans=run.nan_iters,
        tokens_per_sec=tokens / elapsed,
        tflops_per_device=tflops,
        mfu=tflops / peak if peak else None,
    )
    print_rank(line)
    scalars = {
        "lm loss": loss,
        "learning-rate": lr,
        "loss-scale": loss_scale,
        "batch-size": gbs,
        "throughput/tokens-per-sec": tokens / elapsed,
        "throughput/tflops-per-device": tflops,
    }
    if grad_norm is not None:
        scalars["grad-norm"] = float(grad_norm)
    if step.get("params_norm") is not None:
        scalars["params-norm"] = step["params_norm"]
    tb.add_scalars(scalars, run.iteration)


def _report_memory(run: Run) -> None:
    if run.ps.dp_rank == 0:
        stats = device.memory_stats(run.device)
        text = " | ".join(f"{k}: {v:.1f}" for k, v in stats.items())
        print_rank(
            f"[rank {run.ps.rank} tp {run.ps.tp_rank} pp {run.ps.pp_rank}] memory (MiB) | {text}"
        )


def _stop_reason(cfg: Config, iteration: int, signal_any: bool, duration_any: bool) -> str | None:
    """Why the run stops after `iteration` (a checkpoint is saved first), or None to go on."""
    if signal_any:
        return "signal"
    if cfg.train.exit_interval and iteration % cfg.train.exit_interval == 0:
        return "exit-interval"
    return "exit-duration" if duration_any else None


def train(run: Run, train_iterators, valid_iterators, tb: TensorBoard) -> str:
    """The loop. Returns why it stopped: 'done', 'signal', 'exit-interval' or 'exit-duration'."""
    cfg = run.cfg
    stop = _StopSignal(cfg.train.exit_signal_handler)
    start, last_log, since_log = time.time(), time.time(), 0
    loss_sum = torch.zeros(2, dtype=torch.float64)
    while run.iteration < cfg.total_train_iters:
        step = train_step(run, train_iterators)
        run.iteration += 1
        run.consumed_samples += run.microbatches.get_current_global_batch_size()
        since_log += 1
        loss = step["loss"]
        is_nan = loss is not None and not np.isfinite(loss)
        if not step["success"]:
            run.skipped_iters += 1
        elif loss is not None and not is_nan:
            loss_sum += torch.tensor([loss, 1.0], dtype=torch.float64)
        if run.iteration == 1 and cfg.logging.log_memory:
            _report_memory(run)
        duration_up = (
            cfg.train.exit_duration_in_mins is not None
            and time.time() - start > 60 * cfg.train.exit_duration_in_mins
        )
        nan_any, signal_any, duration_any = _agree(run, is_nan, stop.received, duration_up)
        if nan_any:
            run.nan_iters += 1
            if cfg.train.check_for_nan_in_loss:
                raise RuntimeError(
                    f"lm loss is nan/inf at iteration {run.iteration} "
                    "(--check-for-nan-in-loss); lower --lr or use --bf16/--fp16 loss scaling"
                )
        if run.iteration % cfg.logging.log_interval == 0:
            mean_loss = _average_over_last_stage(run, loss_sum)
            mean_loss = float("nan") if mean_loss is None else mean_loss  # every iteration nan
            if cfg.logging.log_params_norm:  # a collective: every rank, before the log rank's line
                step["params_norm"] = run.optimizer.params_norm()
            if run.is_logging_rank:
                _log(run, tb, step, time.time() - last_log, since_log, mean_loss)
            last_log, since_log, loss_sum = time.time(), 0, torch.zeros(2, dtype=torch.float64)
        if cfg.train.eval_iters and run.iteration % cfg.train.eval_interval == 0:
            report_eval(run, valid_iterators, "validation", tb)
        save_due = (
            bool(cfg.checkpoint.save_interval) and run.iteration % cfg.checkpoint.save_interval == 0
        )
        reason = _stop_reason(cfg, run.iteration, signal_any, duration_any)
        if cfg.checkpoint.save and (save_due or reason):
            save(run)
        if reason:
            if run.is_logging_rank:
                print_rank(f"exiting at iteration {run.iteration} ({reason})")
            return reason
    return "done"


def report_eval(run: Run, iterators, split: str, tb: TensorBoard) -> float | None:
    if iterators is None:  # --split gives this split no documents
        return None
    loss = evaluate(run, iterators, run.cfg.train.eval_iters)
    if run.is_logging_rank and loss is not None:
        ppl = perplexity(loss)
        bar = "-" * 100
        print_rank(
            f"{bar}\n {split} loss at iteration {run.iteration} | lm loss value: {loss:.6E} | "
            f"lm loss PPL: {ppl:.6E} |\n{bar}"
        )
        tb.add_scalars({f"lm loss {split}": loss, f"lm loss {split} ppl": ppl}, run.iteration)
    return loss


def pretrain(cfg: Config) -> Run:
    """The whole job: setup, train, final validation and test evaluation, final checkpoint."""
    run = setup(cfg)
    train_it, valid_it, test_it = build_data_iterators(
        cfg, run.tokenizer, run.ps, run.consumed_samples, num_chunks=len(run.model)
    )
    tb = TensorBoard(cfg.logging.tensorboard_dir, run.is_logging_rank)
    reason = train(run, train_it, valid_it, tb)
    if reason == "done":
        if cfg.train.eval_iters:
            if run.iteration % cfg.train.eval_interval != 0:
                report_eval(run, valid_it, "validation", tb)
            report_eval(run, test_it, "test", tb)
        last_saved = (
            cfg.checkpoint.save_interval and run.iteration % cfg.checkpoint.save_interval == 0
        )
        if cfg.checkpoint.save and not last_saved:
            save(run)
    tb.close()
    dist.barrier()
    return run


def shutdown() -> None:
    from megatron_lite.pipeline.p2p import stop_watchdog

    stop_watchdog()
    if dist.is_initialized():
        dist.destroy_process_group()
