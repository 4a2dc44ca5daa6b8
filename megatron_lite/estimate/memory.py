"""Exact per-rank bytes of parameters, gradient buffers and optimizer state, by formula.

Nothing is instantiated: the parameter list of a rank is written down from the same rules the model
follows (`model/gpt.py`, `model/transformer.py`, `tensor_parallel/layers.py`), and the buffers from
the rules of `distributed/grad_buffer.py`, `distributed/ddp.py` and `optim/optimizer.py`:

- DDP keeps one flat gradient buffer per (param dtype, grad dtype): fp32 gradients for bf16 models or
  under --accumulate-allreduce-grads-in-fp32, else the parameter dtype. Parameters are laid out in
  reverse registration order, cut into buckets of --ddp-bucket-size elements (default
  max(40M, 1M x dp)); a tied embedding/output weight (pp > 1) gets a bucket of its own.
- Under --use-distributed-optimizer every bucket is padded to a multiple of lcm(dp, 128) and the
  parameters move into a flat buffer of the same (padded) size; dp rank r updates shard r of each
  bucket, i.e. the parameter elements inside it.
- The optimizer keeps, per element it updates, Adam's exp_avg and exp_avg_sq (SGD: one momentum
  buffer, none when --sgd-momentum is 0) in fp32, plus an fp32 master copy under --bf16/--fp16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_lite.config import Config

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    numel: int
    shared_embedding: bool = False  # tied word embedding / output weight when pp > 1


def _layer_params(cfg: Config, i: int) -> list[ParamSpec]:
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    h, d = m.hidden_size, m.kv_channels
    bias = m.add_bias_linear
    qkv = d * (m.num_attention_heads + 2 * m.num_query_groups) // tp
    fc1 = m.ffn_hidden_size * (2 if m.swiglu else 1) // tp
    pre = f"decoder.layers.{i}."
    out = []

    def norm(name: str) -> None:
        out.append(ParamSpec(pre + name + ".weight", h))
        if m.normalization == "LayerNorm":
            out.append(ParamSpec(pre + name + ".bias", h))

    def linear(name: str, rows: int, cols: int, bias_numel: int) -> None:
        out.append(ParamSpec(pre + name + ".weight", rows * cols))
        if bias:
            out.append(ParamSpec(pre + name + ".bias", bias_numel))

    norm("input_layernorm")
    linear("self_attention.linear_qkv", qkv, h, qkv)
    linear("self_attention.linear_proj", h, m.num_attention_heads * d // tp, h)
    norm("pre_mlp_layernorm")
    linear("mlp.linear_fc1", fc1, h, fc1)
    linear("mlp.linear_fc2", h, m.ffn_hidden_size // tp, h)
    return out


def chunk_params(
    cfg: Config, padded_vocab: int, layers: range, pre_process: bool, post_process: bool
) -> list[ParamSpec]:
    """One model chunk's parameters on one tp rank, in registration order."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    h = m.hidden_size
    shared = m.tie_embeddings and pp > 1
    out = []
    if pre_process:
        out.append(ParamSpec("embedding.word_embeddings.weight", padded_vocab // tp * h, shared))
        if m.position_embedding_type == "learned_absolute":
            out.append(
                ParamSpec("embedding.position_embeddings.weight", m.max_position_embeddings * h)
            )
    for i in layers:
        out += _layer_params(cfg, i)
    if post_process:
        out.append(ParamSpec("decoder.final_layernorm.weight", h))
        if m.normalization == "LayerNorm":
            out.append(ParamSpec("decoder.final_layernorm.bias", h))
        if not (m.tie_embeddings and pre_process):
            out.append(ParamSpec("output_layer.weight", padded_vocab // tp * h, shared))
    return out


@dataclass(frozen=True)
class Bucket:
    offset: int
    data: int  # parameter elements
    numel: int  # with padding


def bucket_layout(cfg: Config, params: list[ParamSpec], dp: int) -> list[Bucket]:
    """DDP's buckets over one chunk's parameters (reverse registration order, padding for ZeRO-1)."""
    p = cfg.parallel
    size = p.ddp_bucket_size or max(40_000_000, 1_000_000 * dp)
    align = math.lcm(dp, 128) if p.use_distributed_optimizer else 1
    buckets: list[Bucket] = []
    start = offset = 0

    def close() -> None:
        nonlocal start, offset
        if offset > start:
            data = offset - start
            offset = -(-offset // align) * align
            buckets.append(Bucket(start, data, offset - start))
        start = offset

    for spec in reversed(params):
        if spec.shared_embedding:
            close()
        offset += spec.numel
        if spec.shared_embedding or offset - start >= size:
            close()
    close()
    return buckets


@dataclass
class StaticMemory:
    """Bytes one rank holds for the whole run (not counting activations)."""

    params: int
    grads: int
    optimizer: int
    num_params: int  # parameter elements (no padding)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def chunk_layouts(cfg: Config, pp_rank: int) -> list[tuple[range, bool, bool]]:
    """(layers, pre_process, post_process) of each virtual chunk of pipeline rank `pp_rank`."""
    from megatron_lite.model.gpt import chunk_layer_numbers

    pp = cfg.parallel.pipeline_model_parallel_size
    v = cfg.virtual_pipeline_size or 1
    return [
        (
            chunk_layer_numbers(cfg.model.num_layers, pp, pp_rank, v, c),
            pp_rank == 0 and c == 0,
            pp_rank == pp - 1 and c == v - 1,
        )
        for c in range(v)
    ]


def static_memory(cfg: Config, padded_vocab: int, pp_rank: int, dp_rank: int = 0) -> StaticMemory:
    """Parameters, gradient buffers and optimizer state of (pp_rank, any tp rank, dp_rank)."""
    dp = cfg.data_parallel_size or 1
    dtype = cfg.optim.precision
    pbytes = DTYPE_BYTES[dtype]
    fp32_grads = cfg.parallel.accumulate_allreduce_grads_in_fp32 or dtype == "bf16"
    gbytes = 4 if fp32_grads else pbytes
    zero = cfg.parallel.use_distributed_optimizer
    o = cfg.optim
    states = 2 if o.optimizer == "adam" else (1 if o.sgd_momentum != 0 else 0)
    per_elem_opt = 4 * states + (4 if dtype != "fp32" else 0)  # moments + fp32 master
    params = grads = updated = n = 0
    for layers, pre, post in chunk_layouts(cfg, pp_rank):
        specs = chunk_params(cfg, padded_vocab, layers, pre, post)
        buckets = bucket_layout(cfg, specs, dp)
        data = sum(s.numel for s in specs)
        padded = sum(b.numel for b in buckets)
        n += data
        grads += padded * gbytes
        params += (padded if zero else data) * pbytes  # ZeRO-1: params live in the padded buffer
        if zero:
            for b in buckets:  # this rank's shard, minus the bucket's tail padding
                shard = b.numel // dp
                updated += max(0, min(shard, b.data - dp_rank * shard))
        else:
            updated += data
    return StaticMemory(params, grads, updated * per_elem_opt, n)
