"""Data parallelism: our DDP wrapper (bucketed, overlapped gradient reduction) and grad finalization."""

from megatron_lite.distributed.ddp import DistributedDataParallel, wrap_model_chunks
from megatron_lite.distributed.finalize import finalize_model_grads

__all__ = ["DistributedDataParallel", "finalize_model_grads", "wrap_model_chunks"]
