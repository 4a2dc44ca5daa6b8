"""Model FLOPs per token: the formula the training log's TFLOP/s figure and estimate/ both use
(here, beside the model it counts, so that estimate/ need not import training/)."""

from __future__ import annotations

from megatron_lite.config import Config, moe_layer_numbers


def model_flops_per_token(cfg: Config, padded_vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward), counting matrix multiplies only.

    Per layer and token, forward: QKV projection 2*h*(q + 2*kv) with q = heads*head_dim and kv =
    groups*head_dim; attention scores and weighted values 2 * 2*s*q (the full s x s square, as Megatron
    counts it, although half is masked); output projection 2*q*h; MLP 2*2*h*f (3 matrices for SwiGLU: 2*3*h*f).
    The output layer adds 2*h*V. Backward costs twice the forward; full recomputation adds one more
    forward of the layers. An MoE layer's MLP counts what a token runs (active parameters): its
    top-k experts, the shared expert and the router's 2*h*E.
    """
    m = cfg.model
    h, s = m.hidden_size, m.seq_length
    q = m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    mats = 3 if m.swiglu else 2
    attention = 2 * h * (q + 2 * kv) + 2 * 2 * s * q + 2 * q * h
    layers_fwd = sum(attention + 2 * mats * h * mlp for mlp in _mlp_widths(cfg)) + sum(
        2 * h * cfg.moe.num_experts for _ in moe_layer_numbers(cfg.moe, cfg.model.num_layers)
    )
    logits_fwd = 2 * h * padded_vocab_size
    recompute = layers_fwd if m.recompute_granularity == "full" else 0.0
    return 3.0 * (layers_fwd + logits_fwd) + recompute


def _mlp_widths(cfg: Config) -> list[int]:
    """The MLP hidden size each token runs through, per layer (k experts + a shared one if MoE)."""
    widths = [cfg.model.ffn_hidden_size] * cfg.model.num_layers
    e = cfg.moe
    for i in moe_layer_numbers(cfg.moe, cfg.model.num_layers):
        widths[i] = e.moe_router_topk * cfg.moe_ffn_hidden_size
        widths[i] += e.moe_shared_expert_intermediate_size or 0
    return widths
