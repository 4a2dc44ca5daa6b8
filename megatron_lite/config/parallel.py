"""Parallel layout and data-parallel communication (--tensor-model-parallel-size, ZeRO-1, buckets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_lite.config.flags import flag, positive, require


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = flag(1, "Tensor-parallel degree.", type=int)
    pipeline_model_parallel_size: int = flag(1, "Pipeline-parallel degree.", type=int)
    context_parallel_size: int = flag(
        1, "Context-parallel degree: ranks sharing each sequence (ring attention).", type=int
    )
    num_layers_per_virtual_pipeline_stage: int | None = flag(
        None, "Layers per virtual stage (interleaved 1F1B).", type=int
    )
    pipeline_schedule: str = flag(
        "1f1b",
        "Pipeline schedule (1F1B becomes interleaved when virtual stages are set).",
        choices=["1f1b", "zero-bubble"],
    )
    sequence_parallel: bool = flag(
        False,
        "Shard LayerNorm/dropout activations along the sequence over tensor-parallel ranks.",
        action="store_true",
    )
    distributed_backend: str | None = flag(
        None,
        "Process-group backend (default: nccl with CUDA, else gloo).",
        choices=["gloo", "nccl"],
    )
    distributed_timeout_minutes: float = flag(
        10.0,
        "Timeout of collectives; a dead rank ends the job after at most this long.",
        type=float,
    )
    use_distributed_optimizer: bool = flag(
        False, "Shard optimizer state over data-parallel ranks (ZeRO-1).", action="store_true"
    )
    overlap_grad_reduce: bool = flag(
        False, "Start each bucket's gradient reduction during backward.", action="store_true"
    )
    overlap_param_gather: bool = flag(
        False,
        "Distributed optimizer: all-gather the updated parameters during the next forward.",
        action="store_true",
    )
    ddp_bucket_size: int | None = flag(
        None, "Elements per gradient bucket (default: max(40M, 1M x dp)).", type=int
    )
    accumulate_allreduce_grads_in_fp32: bool = flag(
        False, "Accumulate and reduce gradients in fp32.", action="store_true"
    )

    def __post_init__(self) -> None:
        positive(
            self,
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "num_layers_per_virtual_pipeline_stage",
            "distributed_timeout_minutes",
            "ddp_bucket_size",
        )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # nothing to shard over, as Megatron does
        require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "--overlap-param-gather needs --use-distributed-optimizer (only its parameters are "
            "all-gathered)",
        )


def check_world_size(world_size: int, tp: int, pp: int, cp: int = 1) -> None:
    """The model-parallel ranks (tp x pp, x cp when set) must tile the world; the rest is dp."""
    what = f"--tensor-model-parallel-size ({tp}) x --pipeline-model-parallel-size ({pp})"
    if cp > 1:
        what += f" x --context-parallel-size ({cp})"
    require(
        world_size % (tp * pp * cp) == 0,
        f"world size ({world_size}) must be divisible by {what} = {tp * pp * cp}",
    )


def check_context_parallel(model: Any, parallel: ParallelConfig, data: Any, train: Any) -> None:
    """What ring attention needs (called from Config): 2cp equal chunks of every sequence (each
    split again over tp under sequence parallelism), a causal mask it can compute per block, and
    an attention core that returns the log-sum-exp of its block."""
    cp, tp = parallel.context_parallel_size, parallel.tensor_model_parallel_size
    if cp == 1:
        return
    s = model.seq_length
    chunks = 2 * cp * (tp if parallel.sequence_parallel else 1)
    require(
        s % chunks == 0,
        f"--seq-length ({s}) must be divisible by 2 x --context-parallel-size ({cp})"
        + (
            f" x --tensor-model-parallel-size ({tp}) under --sequence-parallel"
            if chunks > 2 * cp
            else ""
        )
        + f" = {chunks}",
    )
    require(
        model.attention_backend != "fused",
        f"--context-parallel-size {cp} does not support --attention-backend fused (the fused "
        "softmax kernel returns no log-sum-exp to merge ring blocks with): use sdpa, unfused or auto",
    )
    require(
        model.attention_dropout == 0,
        f"--context-parallel-size {cp} needs --attention-dropout 0 (got "
        f"{model.attention_dropout}): ring attention has no attention dropout",
    )
    for name in ("sft", "dpo"):
        require(
            not getattr(data, name),
            f"--context-parallel-size {cp} does not support --{name} (its samples carry "
            "per-conversation attention masks)",
        )
    require(
        not data.reset_attention_mask,
        f"--context-parallel-size {cp} does not support --reset-attention-mask (ring attention "
        "is causal over the whole sequence)",
    )
    require(
        not train.eval_tasks,
        f"--context-parallel-size {cp} does not support --eval-tasks (their requests run whole "
        "sequences): evaluate the checkpoint at cp 1 with tools/evaluate.py",
    )
    require(
        getattr(model, "window_size", None) is None,
        f"--context-parallel-size {cp} does not support --window-size (sliding-window attention)",
    )
