"""Parallel layout and data-parallel communication (--tensor-model-parallel-size, ZeRO-1, buckets)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config.flags import flag, positive, require


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = flag(1, "Tensor-parallel degree.", type=int)
    pipeline_model_parallel_size: int = flag(1, "Pipeline-parallel degree.", type=int)
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
