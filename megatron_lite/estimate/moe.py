"""Mixture of experts in the estimate: parameter counts (all, in experts, active per token) and the
expert-parallel dispatch traffic.

Traffic per MoE layer and microbatch, bytes one rank sends (T = s x b tokens of its microbatch, k
experts per token, a bytes per activation; forward and backward each move the same again):
- alltoall: the k T routed copies, of which (ep - 1) / ep leave the rank, there and back:
  2 x k T h a (ep - 1) / ep forward;
- allgather: an all-gather of the T h tokens and a reduce-scatter of the ep T h outputs:
  2 x (ep - 1) T h a forward (each ring step moves 1/ep of the ep T h buffer).
FLOPs count active parameters (`model.flops.model_flops_per_token`).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config import Config, moe_layer_numbers
from megatron_lite.estimate.activations import dims
from megatron_lite.model.gpt import build_meta_chunk


@dataclass
class MoECounts:
    total: int  # every parameter of the model
    experts: int  # of which in routed experts
    active: int  # what one token uses: the dense part, the router, k experts (and the shared one)


def _mlp_params(h: int, f: int, swiglu: bool, bias: bool) -> int:
    rows = f * (2 if swiglu else 1)
    return rows * h + h * f + (rows + h if bias else 0)


def model_parameters(cfg: Config, padded_vocab: int) -> int:
    """Every parameter of the model, each expert and the tied embedding counted once (meta)."""
    pp, vpp = cfg.parallel.pipeline_model_parallel_size, cfg.virtual_pipeline_size or 1
    seen: dict[str, int] = {}
    for r in range(pp):
        for c in range(vpp):
            for n, w in build_meta_chunk(cfg, r, padded_vocab, c).named_parameters():
                if not w.shared_embedding or n.startswith("embedding."):
                    seen[n] = w.numel()
    return sum(seen.values())


def parameter_counts(cfg: Config, padded_vocab: int) -> MoECounts:
    """The model's parameters: all, in routed experts, and those one token uses."""
    total = model_parameters(cfg, padded_vocab)
    m, e = cfg.model, cfg.moe
    layers = len(moe_layer_numbers(cfg.moe, cfg.model.num_layers))
    if not layers:
        return MoECounts(total, 0, total)
    one = _mlp_params(m.hidden_size, cfg.moe_ffn_hidden_size, m.swiglu, m.add_bias_linear)
    experts = layers * e.num_experts * one
    return MoECounts(total, experts, total - experts + layers * e.moe_router_topk * one)


def dispatch_bytes(cfg: Config) -> float:
    """Bytes one rank sends per MoE layer and microbatch, forward and backward (module docstring)."""
    e = cfg.moe
    ep = e.expert_model_parallel_size
    if not e.enabled or ep == 1:
        return 0.0
    x = dims(cfg)
    tokens = x.s * x.b * x.h * x.a
    if e.moe_token_dispatcher_type == "alltoall":
        forward = 2 * e.moe_router_topk * tokens * (ep - 1) / ep
    else:
        forward = 2 * (ep - 1) * tokens
    return 2 * forward


def ep_comm_seconds(cfg: Config, intra_gbs: float, inter_gbs: float, gpus_per_node: int) -> float:
    """Time per iteration on the dispatch of the worst stage (every microbatch, every MoE layer)."""
    ep, tp = cfg.moe.expert_model_parallel_size, cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    per_stage = -(-len(moe_layer_numbers(cfg.moe, cfg.model.num_layers)) // pp)
    bw = intra_gbs if ep * tp <= gpus_per_node else inter_gbs  # ep ranks sit tp apart
    return per_stage * cfg.num_microbatches * dispatch_bytes(cfg) / (bw * 1e9)
