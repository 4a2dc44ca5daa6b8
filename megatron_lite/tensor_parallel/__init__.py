"""Tensor and sequence parallelism: communication, layers, cross entropy, RNG and recomputation."""

from megatron_lite.tensor_parallel.cross_entropy import (
    token_log_probs,
    vocab_parallel_cross_entropy,
)
from megatron_lite.tensor_parallel.layers import (
    ColumnParallelLinear,
    LinearWithGradAccumulationAndAsyncCommunication,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron_lite.tensor_parallel.random import (
    checkpoint,
    get_rng_states,
    get_rng_tracker,
    set_random_seed,
    set_rng_states,
)
from megatron_lite.tensor_parallel.utils import ParamTags, full_from_shards, shard_of, tags_of
from megatron_lite.tensor_parallel.weight_grad_store import WeightGradStore

__all__ = [
    "ParamTags",
    "tags_of",
    "ColumnParallelLinear",
    "LinearWithGradAccumulationAndAsyncCommunication",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "WeightGradStore",
    "checkpoint",
    "full_from_shards",
    "get_rng_states",
    "get_rng_tracker",
    "set_random_seed",
    "set_rng_states",
    "shard_of",
    "token_log_probs",
    "vocab_parallel_cross_entropy",
]
