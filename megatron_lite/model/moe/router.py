"""Top-k router in fp32: logits -> z-loss -> top-k probabilities -> capacity dropping -> aux loss.

Semantics follow Megatron-LM's TopKRouter (Shazeer et al. 2017; Switch Transformer, Fedus et al.
2021, for the load-balancing loss; ST-MoE, Zoph et al. 2022, for the z-loss):
- probabilities: softmax over the top-k logits, or (--moe-router-pre-softmax) the top-k of the
  softmax over all experts;
- load-balancing loss: E * sum_i f_i P_i * coeff, with f_i the fraction of the k T routing slots
  that top-k gives expert i and P_i its mean softmax probability over the T tokens of the
  microbatch (seq_aux_loss: the same per sequence, averaged over the sequences);
- capacity: ceil(T k / E * factor) tokens per expert and microbatch; an over-full expert keeps its
  highest-probability tokens (probs) or its earliest ones (position). The aux loss counts the
  routing before any drop, as Megatron's does.

A rank routes the tokens of its own microbatch (every tp rank holds all of them: sequence
parallelism is refused with MoE), so the tokens dropped depend on the microbatch only, never on the
layout: a single process with the same --micro-batch-size drops exactly the same ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import Config
from megatron_lite.model.moe import aux_losses
from megatron_lite.tensor_parallel.utils import set_default_attributes


def capacity(num_tokens: int, num_experts: int, topk: int, factor: float) -> int:
    """Tokens each expert takes from one microbatch (Megatron's get_capacity over T k slots)."""
    return math.ceil(num_tokens * topk / num_experts * factor)


def keep_within_capacity(
    probs: torch.Tensor, routing_map: torch.Tensor, cap: int, policy: str
) -> torch.Tensor:
    """The routing map with each expert's column cut to `cap` tokens ([T, E] bool)."""
    if cap >= routing_map.shape[0]:
        return routing_map
    if policy == "position":  # the first `cap` tokens routed to each expert
        return routing_map & (routing_map.long().cumsum(0) <= cap)
    # probs: the `cap` most probable of the tokens routed to each expert (ties: lower index)
    masked = probs.masked_fill(~routing_map, -1.0)
    order = masked.argsort(dim=0, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        0, order, torch.arange(len(order))[:, None].expand_as(order)
    )
    return routing_map & (rank < cap)


def load_balancing_loss(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """E * sum_i f_i P_i over the tokens of `scores` [T, E] (softmax over all experts)."""
    t, e = scores.shape
    chosen = torch.zeros_like(scores).scatter_(1, scores.topk(topk, dim=1).indices, 1.0)
    return (scores.sum(0) * chosen.sum(0)).sum() * e / (topk * t * t)


class TopKRouter(nn.Module):
    """`forward(x [T, h]) -> (probs [T, E] fp32, zero off the route; routing_map [T, E] bool)`."""

    def __init__(self, cfg: Config, layer_number: int):
        super().__init__()
        e = cfg.moe
        self.layer_number = layer_number
        self.num_experts, self.topk = e.num_experts, e.moe_router_topk
        self.pre_softmax = e.moe_router_pre_softmax
        self.balancing = e.moe_router_load_balancing_type
        self.aux_coeff, self.z_coeff = e.moe_aux_loss_coeff, e.moe_z_loss_coeff
        self.capacity_factor, self.drop_policy = (
            e.moe_expert_capacity_factor,
            e.moe_token_drop_policy,
        )
        self.seq_length = cfg.model.seq_length
        # replicated over tp; computed in fp32 whatever the model's dtype
        self.weight = nn.Parameter(torch.empty(e.num_experts, cfg.model.hidden_size))
        self.weight.init_std = cfg.model.init_method_std
        set_default_attributes(self.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        training = self.training and torch.is_grad_enabled()
        if training and self.z_coeff is not None:
            z = torch.logsumexp(logits, dim=-1).square().mean()
            aux_losses.record("z_loss", self.layer_number, z)
            logits = aux_losses.attach(logits, z * self.z_coeff)
        if self.pre_softmax:
            top, idx = logits.softmax(-1).topk(self.topk, dim=1)
        else:
            top, idx = logits.topk(self.topk, dim=1)
            top = top.softmax(-1)
        probs = torch.zeros_like(logits).scatter(1, idx, top)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
        if self.capacity_factor is not None:
            cap = capacity(len(x), self.num_experts, self.topk, self.capacity_factor)
            routing_map = keep_within_capacity(probs, routing_map, cap, self.drop_policy)
            probs = probs * routing_map
        if training and self.balancing != "none" and self.aux_coeff > 0:
            probs = self._attach_balancing_loss(probs, logits.softmax(-1))
        return probs, routing_map

    def _attach_balancing_loss(self, probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.balancing == "seq_aux_loss":  # tokens are [s, b] flattened: one loss per column b
            s = self.seq_length
            per_seq = scores.view(s, -1, self.num_experts).transpose(0, 1)  # [b, s, E]
            loss = torch.stack([load_balancing_loss(q, self.topk) for q in per_seq]).mean()
            name = "seq_load_balancing_loss"
        else:
            loss, name = load_balancing_loss(scores, self.topk), "load_balancing_loss"
        aux_losses.record(name, self.layer_number, loss)
        return aux_losses.attach(probs, loss * self.aux_coeff)
