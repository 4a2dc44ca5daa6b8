"""What a training run prints and records: Megatron's log line, model FLOPs, and the scalars that go
to TensorBoard and Weights & Biases (`Writers`, on the logging rank). The model FLOPs formula lives
in model/flops.py, beside the model it counts (estimate/ uses it too)."""

from __future__ import annotations

import math
import os
import sys

from megatron_lite.config import Config, ConfigError


def format_log_line(
    *,
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    elapsed_ms: float,
    lr: float,
    global_batch_size: int,
    losses: dict[str, float],
    loss_scale: float,
    grad_norm: float | None,
    skipped: int,
    nans: int,
    tokens_per_sec: float,
    tflops_per_device: float,
    mfu: float | None,
    params_norm: float | None = None,
) -> str:
    """Megatron's training log line (existing log parsers read it), plus throughput fields."""
    line = f" iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {consumed_samples:12d} |"
    line += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    line += f" throughput per GPU (TFLOP/s/GPU): {tflops_per_device:.3f} |"
    if mfu is not None:
        line += f" MFU: {100 * mfu:.1f}% |"
    line += f" tokens per second: {tokens_per_sec:.1f} |"
    line += f" learning rate: {lr:.6E} |"
    line += f" global batch size: {global_batch_size:5d} |"
    for name, value in losses.items():
        line += f" {name}: {value:.6E} |"
    line += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    if params_norm is not None:
        line += f" params norm: {params_norm:.3f} |"
    line += f" number of skipped iterations: {skipped:3d} |"
    line += f" number of nan iterations: {nans:3d} |"
    return line


def perplexity(loss: float) -> float:
    return math.exp(min(20.0, loss))


def print_rank(message: str, *, flush: bool = True) -> None:
    print(message, file=sys.stdout, flush=flush)


class TensorBoard:
    """A SummaryWriter on the logging rank; a no-op elsewhere or without --tensorboard-dir."""

    def __init__(self, log_dir: str | None, enabled: bool):
        self.writer = None
        if log_dir and enabled:
            # optional dependency (tensorboard), only with --tensorboard-dir
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir, max_queue=100)

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandB:
    """A Weights & Biases run on the logging rank (--wandb-project), with the TensorBoard scalars.
    WANDB_MODE=offline keeps it on disk (`wandb sync` uploads it later)."""

    def __init__(self, cfg: Config, enabled: bool):
        self.run = None
        lg = cfg.logging
        if not (enabled and lg.wandb_project):
            return
        try:
            import wandb  # optional dependency, only with --wandb-project
        except ImportError as e:
            raise ConfigError("--wandb-project needs the wandb package (pip install wandb)") from e
        save_dir = lg.wandb_save_dir or os.path.join(os.getcwd(), "wandb")
        os.makedirs(save_dir, exist_ok=True)
        self.run = wandb.init(
            project=lg.wandb_project, name=lg.wandb_exp_name, dir=save_dir, config=cfg.to_dict()
        )

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(scalars, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class Writers:
    """Every scalar sink of the run (TensorBoard, W&B): one call writes to each."""

    def __init__(self, cfg: Config, enabled: bool):
        self.sinks = [TensorBoard(cfg.logging.tensorboard_dir, enabled), WandB(cfg, enabled)]

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        for s in self.sinks:
            s.add_scalars(scalars, step)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def close(self) -> None:
        for s in self.sinks:
            s.close()
