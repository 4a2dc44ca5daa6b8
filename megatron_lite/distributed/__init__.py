"""Data parallelism: our DDP wrapper (bucketed, overlapped gradient reduction), gradient finalization,
and the fork-based process-group harness tests and benchmarks use (`testing.py`)."""

from megatron_lite.distributed.ddp import (
    DistributedDataParallel,
    finish_param_gather,
    start_param_gather,
    wrap_model_chunks,
    zero_grad_buffers,
)
from megatron_lite.distributed.finalize import finalize_model_grads, grad_of

__all__ = [
    "DistributedDataParallel",
    "finalize_model_grads",
    "finish_param_gather",
    "grad_of",
    "start_param_gather",
    "wrap_model_chunks",
    "zero_grad_buffers",
]
