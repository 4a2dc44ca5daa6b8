"""One transformer layer split over tensor-parallel ranks (Megatron-LM, section 3), in the order it
runs: norms, rotary embedding, attention (with GQA), MLP, the layer, and the stack of this stage's
layers. Activations are [s, b, h] ([s/tp, b, h] between layers under sequence parallelism).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.comm import Group, group_rank, group_size
from megatron_lite.config import Config
from megatron_lite.config.moe import moe_layer_pattern
from megatron_lite.model.context_parallel import cp_chunk_positions, ring_attention
from megatron_lite.model.fused_softmax import FusedScaleMaskSoftmax, with_window
from megatron_lite.model.mlp import MLP
from megatron_lite.model.moe import MoELayer
from megatron_lite.model.rope import apply_rotary, rotary_cos_sin
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_lite.tensor_parallel.random import checkpoint, get_rng_tracker
from megatron_lite.tensor_parallel.utils import set_default_attributes

# torch >= 2.5: SDPA shares each kv head across its query group itself (no repeated K/V copies)
SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _norm_tags(module: nn.Module, sequence_parallel: bool) -> None:
    for name, p in module.named_parameters():
        p.sequence_parallel = sequence_parallel
        p.init_std = "ones" if name == "weight" else "zeros"
        set_default_attributes(p)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def build_norm(cfg: Config) -> nn.Module:
    m = cfg.model
    if m.normalization == "RMSNorm":
        norm = RMSNorm(m.hidden_size, m.layernorm_epsilon)
    else:
        norm = nn.LayerNorm(m.hidden_size, eps=m.layernorm_epsilon)
    _norm_tags(norm, cfg.parallel.sequence_parallel)
    return norm


def resolve_attention_backend(backend: str, masked_softmax_fusion: bool, device_type: str) -> str:
    """'auto' -> the fastest measured (bench/bench_model.py): SDPA on both CPU and CUDA."""
    if backend == "auto":
        backend = "sdpa"
    if backend == "fused" and not masked_softmax_fusion:
        backend = "unfused"
    return backend


class InferenceParams:
    """Key/value cache for incremental decoding (generation), passed through the model's forward.

    Each attention layer keeps its keys and values [max_len, b, ng, d] here, keyed by the layer
    itself. `sequence_len_offset` counts the tokens already cached; the caller advances it after
    each forward (Megatron's convention), so all layers of one step see the same offset.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int):
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.sequence_len_offset = 0
        self.key_value_memory: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v [s, b, ng, d] and return every cached one, [offset + s, b, ng, d]."""
        s, b = k.shape[:2]
        start, end = self.sequence_len_offset, self.sequence_len_offset + s
        if end > self.max_sequence_length or b > self.max_batch_size:
            raise ValueError(
                f"KV cache holds {self.max_sequence_length} tokens x {self.max_batch_size} "
                f"sequences; this step needs {end} x {b}"
            )
        if layer not in self.key_value_memory:
            shape = (self.max_sequence_length, self.max_batch_size, *k.shape[2:])
            self.key_value_memory[layer] = (k.new_empty(shape), v.new_empty(shape))
        k_cache, v_cache = self.key_value_memory[layer]
        k_cache[start:end, :b] = k
        v_cache[start:end, :b] = v
        return k_cache[:end, :b], v_cache[:end, :b]

    def position_ids(self, s: int, device: torch.device | None = None) -> torch.Tensor:
        """Positions [1, s] of this step's tokens: they continue the cached sequence."""
        off = self.sequence_len_offset
        return torch.arange(off, off + s, device=device)[None]

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor, s: int):
        """This step's rows [s, 1, 1, d] of the rotary tables [max_len, 1, 1, d]."""
        off = self.sequence_len_offset
        return cos[off : off + s], sin[off : off + s]

    def causal_mask(self, s: int, device: torch.device) -> torch.Tensor:
        """[1, 1, s, offset + s], True = masked: query i (at position offset + i) sees keys <= it."""
        off = self.sequence_len_offset
        return torch.ones(s, off + s, dtype=torch.bool, device=device).triu_(off + 1)[None, None]


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v for this rank's heads; q [b, np, s, d], k/v [b, ng, s, d].
    Under context parallelism (a `cp_group` of more than one rank): ring attention over the group."""

    def __init__(self, cfg: Config, cp_group: Group = None):
        super().__init__()
        m = cfg.model
        self.cp_group = cp_group if group_size(cp_group) > 1 else None
        self.backend = m.attention_backend
        self.fusion = m.masked_softmax_fusion
        self.dropout_p = m.attention_dropout
        self.scale = 1.0 / math.sqrt(m.kv_channels)
        self.window_left = m.window_left
        self.softmax = FusedScaleMaskSoftmax("causal", fusion=self.fusion, scale=self.scale)

    def forward(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        if self.cp_group is not None:  # causal only (Config refuses masks, dropout, fused)
            if mask is not None:
                raise ValueError("context parallelism runs causal attention only: got a mask")
            return ring_attention(q, k, v, self.cp_group, self.scale)
        b, np_, sq, d = q.shape
        p = self.dropout_p if self.training else 0.0
        backend = resolve_attention_backend(self.backend, self.fusion, q.device.type)
        gqa = k.shape[1] != np_  # grouped-query attention: each kv head serves np/ng query heads
        if gqa and not (backend == "sdpa" and SDPA_HAS_GQA):  # else SDPA shares kv heads itself
            k = k.repeat_interleave(np_ // k.shape[1], dim=1)
            v = v.repeat_interleave(np_ // v.shape[1], dim=1)
            gqa = False
        if self.window_left is not None:  # sliding window: an explicit mask on every backend
            mask = with_window(mask, sq, k.shape[2], self.window_left, q.device)
        with get_rng_tracker().fork():  # heads are split over tp: a different stream per rank
            if backend == "sdpa":
                return F.scaled_dot_product_attention(
                    q,
                    k,
                    v,
                    attn_mask=None if mask is None else ~mask,
                    dropout_p=p,
                    is_causal=mask is None,
                    scale=self.scale,
                    **({"enable_gqa": True} if gqa else {}),
                )
            scores = torch.matmul(q, k.transpose(-1, -2))  # [b, np, sq, sk], unscaled
            probs = self.softmax(scores, mask, fusion=backend == "fused")
            if p > 0:
                probs = F.dropout(probs, p, training=True)
            return torch.matmul(probs, v)


class SelfAttention(nn.Module):
    """QKV column-parallel linear, rotary, core attention, output row-parallel linear.

    The fused QKV weight is laid out per query group, [ng, (np/ng + 2) * d, h] (q heads of the group,
    then its k and v), so a contiguous split over tp gives each rank whole groups.
    """

    def __init__(self, cfg: Config, tp_group: Group, output_std: float, cp_group: Group = None):
        super().__init__()
        m, sp = cfg.model, cfg.parallel.sequence_parallel
        tp = group_size(tp_group)
        self.cp_size, self.cp_rank = group_size(cp_group), group_rank(cp_group)
        self.d = m.kv_channels
        self.np = m.num_attention_heads // tp
        self.ng = m.num_query_groups // tp
        self.selective_recompute = m.recompute_granularity == "selective"
        self.rope = m.position_embedding_type == "rope"
        self.model_cfg = m
        qkv_size = m.kv_channels * (m.num_attention_heads + 2 * m.num_query_groups)
        common = dict(tp_group=tp_group, bias=m.add_bias_linear, sequence_parallel=sp)
        self.linear_qkv = ColumnParallelLinear(
            m.hidden_size,
            qkv_size,
            init_std=m.init_method_std,
            **{**common, "bias": m.add_bias_linear or m.add_qkv_bias},
        )
        self.core_attention = CoreAttention(cfg, cp_group)
        self.linear_proj = RowParallelLinear(
            m.num_attention_heads * m.kv_channels,
            m.hidden_size,
            init_std=output_std,
            skip_bias_add=True,
            input_is_parallel=True,
            **common,
        )
        self._rope_cache: tuple | None = None

    def _cos_sin(self, s: int, device: torch.device):
        """Tables for this rank's `s` positions: 0..s-1, or under context parallelism its two
        chunks of the s x cp positions of the whole sequence."""
        c = self._rope_cache
        if c is None or c[0] != s or c[1].device != device:
            cos, sin = rotary_cos_sin(s * self.cp_size, self.model_cfg, device)
            if self.cp_size > 1:
                idx = cp_chunk_positions(s * self.cp_size, self.cp_rank, self.cp_size).to(device)
                cos, sin = cos[idx], sin[idx]
            self._rope_cache = (s, cos, sin)
        return self._rope_cache[1:]

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        inference_params: InferenceParams | None = None,
    ):
        qkv, _ = self.linear_qkv(x)  # [s, b, ng * (np/ng + 2) * d]
        s, b = qkv.shape[:2]
        per_group = self.np // self.ng
        qkv = qkv.view(s, b, self.ng, (per_group + 2) * self.d)
        q, k, v = qkv.split([per_group * self.d, self.d, self.d], dim=-1)
        q = q.reshape(s, b, self.np, self.d)
        if self.rope:
            if inference_params is None:
                cos, sin = self._cos_sin(s, x.device)
            else:  # the positions that continue the cached sequence(s)
                cos, sin = self._cos_sin(inference_params.max_sequence_length, x.device)
                cos, sin = inference_params.rotary(cos, sin, s)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if inference_params is not None:
            mask = inference_params.causal_mask(s, x.device)
            k, v = inference_params.update(self, k, v)  # [offset + s, b, ng, d]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if self.selective_recompute and self.training:
            ctx = checkpoint(self.core_attention, q, k, v, mask)
        else:
            ctx = self.core_attention(q, k, v, mask)
        ctx = ctx.permute(2, 0, 1, 3).reshape(s, b, self.np * self.d)  # [s, b, np * d]
        return self.linear_proj(ctx)


class TransformerLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)), with bias-dropout-add. The MLP is an
    MoE one (model/moe) where --num-experts and --moe-layer-freq say so; that needs `ps` (its groups)
    and the global `layer_number`."""

    def __init__(
        self,
        cfg: Config,
        tp_group: Group,
        ps: ParallelState | None = None,
        layer_number: int = 0,
    ):
        super().__init__()
        m = cfg.model
        self.sequence_parallel = cfg.parallel.sequence_parallel
        self.hidden_dropout = m.hidden_dropout
        output_std = m.init_method_std / math.sqrt(2.0 * m.num_layers)  # GPT-2's scaled init
        self.input_layernorm = build_norm(cfg)
        cp_group = ps.cp_group if ps is not None else None
        self.self_attention = SelfAttention(cfg, tp_group, output_std, cp_group)
        self.pre_mlp_layernorm = build_norm(cfg)
        if (
            cfg.moe.enabled
            and moe_layer_pattern(cfg.moe.moe_layer_freq, m.num_layers)[layer_number]
        ):
            self.mlp = MoELayer(cfg, ps or ParallelState.single(), layer_number, output_std)
        else:
            self.mlp = MLP(cfg, tp_group, output_std)

    def _bias_dropout_add(self, out, bias, residual):
        if bias is not None:
            out = out + bias
        if self.training and self.hidden_dropout > 0:
            if self.sequence_parallel:  # each rank holds different tokens: its own stream
                with get_rng_tracker().fork():
                    out = F.dropout(out, self.hidden_dropout, training=True)
            else:
                out = F.dropout(out, self.hidden_dropout, training=True)
        return residual + out

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        inference_params: InferenceParams | None = None,
    ) -> torch.Tensor:
        out, bias = self.self_attention(self.input_layernorm(x), mask, inference_params)
        x = self._bias_dropout_add(out, bias, x)
        out, bias = self.mlp(self.pre_mlp_layernorm(x))
        return self._bias_dropout_add(out, bias, x)


class TransformerBlock(nn.Module):
    """This chunk's layers (keyed by global layer number) and, on the last one, the final norm."""

    def __init__(
        self,
        cfg: Config,
        tp_group: Group,
        layer_numbers: range,
        final_norm: bool,
        ps: ParallelState | None = None,
    ):
        super().__init__()
        m = cfg.model
        self.layers = nn.ModuleDict(
            {str(i): TransformerLayer(cfg, tp_group, ps, i) for i in layer_numbers}
        )
        self.final_layernorm = build_norm(cfg) if final_norm else None
        self.recompute_granularity = m.recompute_granularity
        self.recompute_method = m.recompute_method
        self.recompute_num_layers = m.recompute_num_layers

    def _run(self, layers: list[nn.Module]):
        def fn(x, mask):
            for layer in layers:
                x = layer(x, mask)
            return x

        return fn

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        inference_params: InferenceParams | None = None,
    ) -> torch.Tensor:
        layers = list(self.layers.values())
        if inference_params is not None:  # incremental decoding: no recompute, no autograd
            for layer in layers:
                x = layer(x, mask, inference_params)
        elif self.recompute_granularity == "full" and self.training:
            n = self.recompute_num_layers
            if self.recompute_method == "uniform":  # every group of n layers is one checkpoint
                for i in range(0, len(layers), n):
                    x = checkpoint(self._run(layers[i : i + n]), x, mask)
            else:  # block: the first n layers of the chunk one by one, the rest kept in memory
                for i, layer in enumerate(layers):
                    x = checkpoint(layer, x, mask) if i < n else layer(x, mask)
        else:
            for layer in layers:
                x = layer(x, mask)
        if self.final_layernorm is not None:
            x = self.final_layernorm(x)
        return x
