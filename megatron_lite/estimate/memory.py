"""Exact per-rank bytes of parameters, gradient buffers and optimizer state, read off the real model.

Nothing is allocated and no rule is written twice:

- Each virtual chunk of a pipeline rank is the real `GPTModel` built on the meta device
  (`model.gpt.build_meta_chunk`: full shapes, shard tags, the tied embedding's `shared_embedding`),
  cut to one tp rank's shapes by its tags (`partition_dim` split tp ways, as `shard_of` cuts).
- Its parameters, in the model dtype (`device.params_dtype`), go into the real
  `DistributedDataParallel`, whose buffers (meta tensors too) are the buckets training gets: one
  buffer per (param dtype, grad dtype), the default bucket size, the ZeRO-1 padding, the tied
  embedding's bucket of its own. Under --use-distributed-optimizer the parameters live in the padded
  param buffer and dp rank r updates the pieces `param_shard_ranges(r)` lists.
- The optimizer keeps, per element it updates, Adam's exp_avg and exp_avg_sq (SGD: one momentum
  buffer, none when --sgd-momentum is 0) in fp32, plus an fp32 master copy under --bf16/--fp16.

Building on meta takes milliseconds, but `--search` asks for hundreds of layouts: a chunk's shard
shapes are cached by (model shape, tp, pp, vpp, stage, chunk, vocabulary), a stage's buffers by the
config sections they read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_lite.checkpointing.experts import EXPERT_NAME, is_expert
from megatron_lite.config import Config
from megatron_lite.device import params_dtype
from megatron_lite.distributed.ddp import DistributedDataParallel
from megatron_lite.distributed.grad_buffer import ParamAndGradBuffer
from megatron_lite.model.gpt import build_meta_chunk
from megatron_lite.parallel_state import ParallelState

_CACHE_LIMIT = 4096
_shards_cache: dict[tuple, list[tuple[torch.Size, bool]]] = {}
_buffers_cache: dict[tuple, list[ParamAndGradBuffer]] = {}


@dataclass(frozen=True)
class StaticMemory:
    """Bytes one rank holds for the whole run (not counting activations)."""

    params: int
    grads: int
    optimizer: int
    num_params: int  # parameter elements (no padding)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def _fields(section) -> tuple:
    return tuple(vars(section).items())  # a config section's values, cheaply hashable


def _model_key(cfg: Config) -> tuple:
    """The model settings that shape parameters (recomputation changes none, and --search varies it)."""
    return tuple(kv for kv in _fields(cfg.model) if not kv[0].startswith("recompute_"))


def _shard_shape(w: torch.Tensor, tp: int) -> torch.Size:
    """A tp rank's shape of full tensor `w`: its `partition_dim` split tp ways (`shard_of`'s shape)."""
    if not w.tensor_model_parallel or tp == 1:
        return w.shape
    shape = list(w.shape)
    shape[w.partition_dim] //= tp
    return torch.Size(shape)


def _cached(cache: dict, key: tuple, make):
    if key not in cache:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[key] = make()
    return cache[key]


def chunk_shards(
    cfg: Config, padded_vocab: int, pp_rank: int, chunk: int = 0
) -> list[tuple[torch.Size, bool, bool]]:
    """(shape on one tp rank, shared_embedding, expert) of a chunk's parameters, in registration
    order; of the MoE experts only ep rank 0's share (every ep rank holds as many)."""
    p = cfg.parallel
    tp = p.tensor_model_parallel_size
    key = (
        _model_key(cfg),
        _fields(cfg.moe),
        tp,
        p.pipeline_model_parallel_size,
        cfg.virtual_pipeline_size,
        pp_rank,
        chunk,
        padded_vocab,
    )

    per_rank = (cfg.moe.num_experts or 1) // cfg.moe.expert_model_parallel_size

    def mine(name: str) -> bool:  # an expert of ep rank 0, or no expert
        return not is_expert(name) or int(name.split(EXPERT_NAME)[1].split(".")[0]) < per_rank

    def make() -> list[tuple[torch.Size, bool, bool]]:
        model = build_meta_chunk(cfg, pp_rank, padded_vocab, chunk)
        return [
            (_shard_shape(w, tp), w.shared_embedding, w.expert_parallel)
            for n, w in model.named_parameters()
            if mine(n)
        ]

    return _cached(_shards_cache, key, make)


def chunk_ddp(
    cfg: Config, padded_vocab: int, pp_rank: int, chunk: int = 0
) -> DistributedDataParallel:
    """The DDP wrapper of one chunk on one tp rank, on meta parameters: its buffers and buckets."""
    dtype = params_dtype(cfg.optim)
    params = []
    for shape, shared, expert in chunk_shards(cfg, padded_vocab, pp_rank, chunk):
        w = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))
        w.shared_embedding, w.expert_parallel = shared, expert
        params.append(w)
    dp = cfg.data_parallel_size or 1
    edp = max(1, dp // cfg.moe.expert_model_parallel_size)  # experts shard over edp
    ps = dataclasses.replace(ParallelState.single(), dp_size=dp, edp_size=edp)
    return DistributedDataParallel(torch.nn.ParameterList(params), cfg, ps)


def _optimizer_bytes_per_element(cfg: Config) -> int:
    o = cfg.optim
    states = 2 if o.optimizer == "adam" else (1 if o.sgd_momentum != 0 else 0)
    return 4 * states + (4 if o.precision != "fp32" else 0)  # fp32 moments + fp32 master


def stage_buffers(cfg: Config, padded_vocab: int, pp_rank: int) -> list[ParamAndGradBuffer]:
    """DDP's buffers (meta) over every chunk of pipeline rank `pp_rank` on one tp rank."""
    key = (
        _model_key(cfg),
        _fields(cfg.moe),
        _fields(cfg.parallel),
        _fields(cfg.optim),
        cfg.data_parallel_size,
        padded_vocab,
        pp_rank,
    )
    chunks = range(cfg.virtual_pipeline_size or 1)
    return _cached(
        _buffers_cache,
        key,
        lambda: [b for c in chunks for b in chunk_ddp(cfg, padded_vocab, pp_rank, c).buffers],
    )


def static_memory(cfg: Config, padded_vocab: int, pp_rank: int, dp_rank: int = 0) -> StaticMemory:
    """Parameters, gradient buffers and optimizer state of (pp_rank, any tp rank, dp_rank)."""
    params = grads = updated = n = 0
    for buf in stage_buffers(cfg, padded_vocab, pp_rank):
        data = sum(w.numel() for w in buf.params)
        n += data
        grads += buf.grad_data.numel() * buf.grad_data.element_size()
        item = buf.params[0].element_size()
        if buf.param_data is not None:  # ZeRO-1: the params live in the padded buffer
            params += buf.param_data.numel() * item
            updated += sum(e - s for _, s, e, _ in buf.param_shard_ranges(dp_rank))
        else:
            params += data * item
            updated += data
    return StaticMemory(params, grads, updated * _optimizer_bytes_per_element(cfg), n)
