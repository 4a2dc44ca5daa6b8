"""Mixtral (`MixtralForCausalLM`) <-> megatron_lite: a Llama with an MoE MLP in every layer.

Tensors, in the layout of the published Mixtral checkpoints (which transformers 4.x reads as they
are and 5.x converts on load): `block_sparse_moe.gate.weight` is our router; expert E's w1 (gate)
and w3 (up) stacked are our `mlp.experts.local_experts.E.linear_fc1.weight`, w2 (down) is its fc2.
Routing agrees: Mixtral's top-k of the softmax, renormalised over the k, is the softmax over the
top-k logits (--moe-router-pre-softmax off). Mixtral has no shared expert, biases or capacity;
its sliding window is --window-size, as Mistral's (hf_rope.py).
"""

from __future__ import annotations

import torch

from megatron_lite.checkpointing import CheckpointError

MIXTRAL = "mixtral"
EXPERT = "mlp.experts.local_experts.{}."


def is_moe(moe: dict | None) -> bool:
    return bool(moe and moe.get("num_experts"))


def check_mixtral(m: dict, moe: dict) -> None:
    """What the Mixtral format cannot hold, named."""
    bad = []
    if moe.get("moe_layer_freq", 1) not in (1, [1] * m["num_layers"]):
        bad.append("--moe-layer-freq (Mixtral: every layer is MoE)")
    if moe.get("moe_shared_expert_intermediate_size"):
        bad.append("--moe-shared-expert-intermediate-size")
    if moe.get("moe_router_pre_softmax"):
        bad.append("--moe-router-pre-softmax")
    if m["add_bias_linear"]:
        bad.append("biases (use --disable-bias-linear)")
    if bad:
        raise CheckpointError(f"Mixtral format cannot hold: {', '.join(bad)}")


def mixtral_mlp_rules(moe: dict, rule_cls) -> list:
    """Router and expert rules of one layer (names relative to the layer)."""
    rules = [rule_cls("mlp.router.weight", ["block_sparse_moe.gate.weight"])]
    for e in range(moe["num_experts"]):
        ours, hf = EXPERT.format(e), f"block_sparse_moe.experts.{e}."
        rules += [
            rule_cls(
                ours + "linear_fc1.weight",
                [hf + "w1.weight", hf + "w3.weight"],
                lambda t: list(t.chunk(2, 0)),
                lambda ts: torch.cat(ts, 0),
            ),
            rule_cls(ours + "linear_fc2.weight", [hf + "w2.weight"]),
        ]
    return rules


def mixtral_config(cfg: dict, llama: dict, window: int | None) -> dict:
    """config.json of a Mixtral: the Llama one (from hf_rules) plus the experts; `window`: the
    sliding window (--window-size), if any."""
    m, moe = cfg["model"], cfg["moe"]
    check_mixtral(m, moe)
    out = {k: v for k, v in llama.items() if k not in ("mlp_bias",)}
    out.update(
        architectures=["MixtralForCausalLM"],
        model_type=MIXTRAL,
        intermediate_size=moe.get("moe_ffn_hidden_size") or m["ffn_hidden_size"],
        num_local_experts=moe["num_experts"],
        num_experts_per_tok=moe["moe_router_topk"],
        router_aux_loss_coef=moe.get("moe_aux_loss_coeff", 0.0),
        output_router_logits=False,
        router_jitter_noise=0.0,
        sliding_window=window,
    )
    return out


def moe_from_mixtral(hf: dict) -> dict:
    """Our moe section for a Mixtral config.json."""
    if hf.get("router_jitter_noise"):
        raise CheckpointError("Mixtral router_jitter_noise is not supported")
    return {
        "num_experts": hf["num_local_experts"],
        "moe_router_topk": hf.get("num_experts_per_tok", 2),
        "moe_aux_loss_coeff": hf.get("router_aux_loss_coef", 0.0),
    }
