"""What a training run prints and records: Megatron's log line, model FLOPs, TensorBoard scalars."""

from __future__ import annotations

import math
import sys

from megatron_lite.config import Config


def model_flops_per_token(cfg: Config, padded_vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward), counting matrix multiplies only.

    Per layer and token, forward: QKV projection 2*h*(q + 2*kv) with q = heads*head_dim and kv =
    groups*head_dim; attention scores and weighted values 2 * 2*s*q (the full s x s square, as Megatron
    counts it, although half is masked); output projection 2*q*h; MLP 2*2*h*f (3 matrices for SwiGLU: 2*3*h*f).
    The output layer adds 2*h*V. Backward costs twice the forward; full recomputation adds one more
    forward of the layers.
    """
    m = cfg.model
    h, s, f = m.hidden_size, m.seq_length, m.ffn_hidden_size
    q = m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    per_layer = (
        2 * h * (q + 2 * kv) + 2 * 2 * s * q + 2 * q * h + 2 * (3 if m.swiglu else 2) * h * f
    )
    layers_fwd = m.num_layers * per_layer
    logits_fwd = 2 * h * padded_vocab_size
    recompute = layers_fwd if m.recompute_granularity == "full" else 0.0
    return 3.0 * (layers_fwd + logits_fwd) + recompute


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
