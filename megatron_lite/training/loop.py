"""train -> evaluate -> save: the loop of one pretraining run, read top to bottom.

`pretrain(cfg)` is what `python -m megatron_lite.pretrain_gpt` calls. Every rank runs the same code; a rank
only does the parts its pipeline stage owns (the first stage embeds tokens, the last computes the loss and
logs), and every decision that must be the same everywhere (stop now? save now?) is agreed with one small
all-reduce per iteration.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite import checkpointing, comm, device
from megatron_lite.config import Config
from megatron_lite.model.flops import model_flops_per_token
from megatron_lite.pipeline.abort import WATCHDOG
from megatron_lite.training.log import (
    Writers,
    format_log_line,
    perplexity,
    print_rank,
)
from megatron_lite.training.profiling import StepProfiler
from megatron_lite.training.setup import Run, build_data_iterators, setup
from megatron_lite.training.step import (
    averages_over_last_stage,
    evaluate,
    land_params,
    reported_names,
    train_step,
)


class _StopSignal:
    """Remembers a SIGTERM (what SLURM sends before the time limit) until the iteration boundary."""

    def __init__(self, enabled: bool):
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):  # noqa: ARG002
        self.received = True


def _agree(run: Run, *flags: bool) -> list[bool]:
    """One all-reduce so that every rank takes the same stop/save decision."""
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    comm.all_reduce(t, dist.group.WORLD)
    return [bool(v > 0) for v in t.tolist()]


def save(run: Run) -> None:
    cfg = run.cfg
    t0 = time.time()
    land_params(run)
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


def _log_interval(
    run: Run, writers: Writers, step: dict, elapsed: float, n_iters: int, loss_sum: torch.Tensor
) -> None:
    """The log line's collectives on every rank (mean loss, params norm, timers), then the line."""
    names = reported_names(run.cfg)
    means = averages_over_last_stage(run, loss_sum) or [float("nan")] * len(names)  # all nan
    mean_loss, metrics = means[0], dict(zip(names[1:], means[1:]))  # --dpo: margins, accuracy
    if run.cfg.logging.log_params_norm:
        step["params_norm"] = run.optimizer.params_norm()
    times = run.timers.gather(n_iters)
    if not run.is_logging_rank:
        return
    _log(run, writers, step, elapsed, n_iters, mean_loss, metrics)
    if times is not None:
        print_rank(run.timers.format(times))
        if run.cfg.logging.log_timers_to_tensorboard:  # Megatron's names: "<region>-time"
            scalars = {f"{n}-time": max(v) for n, v in times.items() if v}
            writers.add_scalars(scalars, run.iteration)


def _log(
    run: Run,
    writers: Writers,
    step: dict,
    elapsed: float,
    n_iters: int,
    loss: float,
    metrics: dict[str, float],
) -> None:
    cfg, ps = run.cfg, run.ps
    gbs = run.microbatches.get_current_global_batch_size()
    tokens = gbs * cfg.model.seq_length * n_iters
    tflops = model_flops_per_token(cfg, run.padded_vocab_size) * tokens / elapsed / 1e12
    tflops /= ps.world_size
    lr, loss_scale = run.optimizer.param_groups[0]["lr"], float(run.optimizer.get_loss_scale())
    peak = cfg.logging.peak_tflops
    if peak is None and cfg.optim.precision != "fp32":  # MFU against a known GPU's peak
        peak = device.peak_tflops(run.device)
    grad_norm = step["grad_norm"]
    moe_losses = step.get("moe_losses") or {}  # name -> MoE layer -> value
    averaged = {n: sum(v.values()) / len(v) for n, v in moe_losses.items() if v}
    line = format_log_line(
        iteration=run.iteration,
        train_iters=cfg.total_train_iters,
        consumed_samples=run.consumed_samples,
        elapsed_ms=1000 * elapsed / n_iters,
        lr=lr,
        global_batch_size=gbs,
        losses={"lm loss": loss, **metrics, **averaged},
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
        **metrics,
    }
    if grad_norm is not None:
        scalars["grad-norm"] = float(grad_norm)
    if step.get("params_norm") is not None:
        scalars["params-norm"] = step["params_norm"]
    for name, per_layer in moe_losses.items():  # Megatron's per-layer MoE logging
        scalars.update({f"moe/{name}_layer_{i}": v for i, v in per_layer.items()})
        if name in averaged:
            scalars[name] = averaged[name]
    writers.add_scalars(scalars, run.iteration)


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


def train(run: Run, train_iterators, valid_iterators, writers: Writers) -> str:
    """The loop. Returns why it stopped: 'done', 'signal', 'exit-interval' or 'exit-duration'."""
    cfg = run.cfg
    profiler = StepProfiler(cfg.logging, run.ps.rank, run.device)
    try:
        return _train(run, train_iterators, valid_iterators, writers, profiler)
    finally:
        profiler.stop()


def _train(
    run: Run, train_iterators, valid_iterators, writers: Writers, profiler: StepProfiler
) -> str:
    cfg = run.cfg
    stop = _StopSignal(cfg.train.exit_signal_handler)
    start, last_log, since_log = time.time(), time.time(), 0
    names = reported_names(cfg)
    loss_sum = torch.zeros(len(names) + 1, dtype=torch.float64)  # (loss, metrics..., count)
    while run.iteration < cfg.total_train_iters:
        profiler.before_iteration(run.iteration + 1)
        step = train_step(run, train_iterators)
        run.iteration += 1
        profiler.after_iteration(run.iteration)
        run.consumed_samples += run.microbatches.get_current_global_batch_size()
        since_log += 1
        loss = step["loss"]
        is_nan = loss is not None and not np.isfinite(loss)
        if not step["success"]:
            run.skipped_iters += 1
        elif loss is not None and not is_nan:
            values = [step["reported"][n] for n in names]
            loss_sum += torch.tensor([*values, 1.0], dtype=torch.float64)
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
            _log_interval(run, writers, step, time.time() - last_log, since_log, loss_sum)
            last_log, since_log = time.time(), 0
            loss_sum = torch.zeros_like(loss_sum)
        if cfg.train.eval_iters and run.iteration % cfg.train.eval_interval == 0:
            report_eval(run, valid_iterators, "validation", writers)
        if run.iteration % cfg.train.eval_interval == 0:
            _run_eval_hooks(run, writers)
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


def report_eval(run: Run, iterators, split: str, writers: Writers) -> float | None:
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
        writers.add_scalars({f"lm loss {split}": loss, f"lm loss {split} ppl": ppl}, run.iteration)
    return loss


def _run_eval_hooks(run: Run, writers: Writers) -> None:
    for hook in run.eval_hooks:
        hook(run, writers)


def pretrain(cfg: Config, eval_hooks: Sequence[Callable[[Run, Writers], object]] = ()) -> Run:
    """The whole job: setup, train, final validation and test evaluation, final checkpoint.
    `eval_hooks` (installed by the entry point, e.g. --eval-tasks scoring) run every
    --eval-interval and after the last iteration: see `Run.eval_hooks`."""
    run = setup(cfg)
    run.eval_hooks = list(eval_hooks)
    train_it, valid_it, test_it = build_data_iterators(
        cfg, run.tokenizer, run.ps, run.consumed_samples, num_chunks=len(run.model)
    )
    writers = Writers(cfg, run.is_logging_rank)
    reason = train(run, train_it, valid_it, writers)
    if reason == "done":
        if cfg.train.eval_iters:
            if run.iteration % cfg.train.eval_interval != 0:
                report_eval(run, valid_it, "validation", writers)
            report_eval(run, test_it, "test", writers)
        if run.iteration % cfg.train.eval_interval != 0:
            _run_eval_hooks(run, writers)
        last_saved = (
            cfg.checkpoint.save_interval and run.iteration % cfg.checkpoint.save_interval == 0
        )
        if cfg.checkpoint.save and not last_saved:
            save(run)
    if (
        checkpointing.finalize_async_save() and run.is_logging_rank
    ):  # --async-save: publish the last
        print_rank("  finalized the async checkpoint save")
    writers.close()
    dist.barrier()
    return run


def shutdown() -> None:
    """Stop the pipeline abort watchdog, then destroy the process group."""
    WATCHDOG.stop()
    if dist.is_initialized():
        dist.destroy_process_group()
