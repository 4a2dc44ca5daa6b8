"""The MoE MLP that replaces the dense one in the layers --moe-layer-freq selects:

    x [s, b, h] -> router (fp32) -> dispatch to the experts over ep -> combine -> all-reduce over tp
                (+ the shared expert's output, when --moe-shared-expert-intermediate-size is set)

Every tp rank routes the same tokens (its copy of the microbatch); the experts are split over tp
(etp = tp), so their inputs' gradients and the combined output are reduced over tp once per layer.
Under sequence parallelism the layer first all-gathers the sequence (so routing, and any token
dropping, is the same as without it) and reduce-scatters its output back.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_lite.comm import group_size
from megatron_lite.config import Config
from megatron_lite.model.mlp import MLP
from megatron_lite.model.moe.dispatcher import DISPATCHERS
from megatron_lite.model.moe.experts import LocalExperts
from megatron_lite.model.moe.router import TopKRouter, capacity
from megatron_lite.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

if TYPE_CHECKING:
    from megatron_lite.parallel_state import ParallelState


class MoELayer(nn.Module):
    """`forward(x [s, b, h]) -> (out [s, b, h], None)`, as the dense MLP's (output, bias)."""

    def __init__(self, cfg: Config, ps: ParallelState, layer_number: int, output_std: float):
        super().__init__()
        e = cfg.moe
        self.tp_group, self.ep_group = ps.tp_group, ps.ep_group
        self.sequence_parallel = cfg.parallel.sequence_parallel and group_size(ps.tp_group) > 1
        self.dispatch = DISPATCHERS[e.moe_token_dispatcher_type]
        self.pad_to_capacity = e.moe_pad_expert_input_to_capacity
        self.capacity_factor, self.topk, self.num_experts = (
            e.moe_expert_capacity_factor,
            e.moe_router_topk,
            e.num_experts,
        )
        self.router = TopKRouter(cfg, layer_number)
        self.experts = LocalExperts(cfg, ps.ep_rank, ps.ep_size, ps.tp_group, output_std)
        self.shared_experts = None
        if e.moe_shared_expert_intermediate_size is not None:
            shared = dataclasses.replace(
                cfg.model, ffn_hidden_size=e.moe_shared_expert_intermediate_size
            )
            self.shared_experts = MLP(
                dataclasses.replace(cfg, model=shared), ps.tp_group, output_std
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """x [s, b, h] ([s/tp, b, h] under sequence parallelism)."""
        tokens, expert_in = self._inputs(x)
        probs, routing_map = self.router(tokens)
        pad = None
        if self.pad_to_capacity:
            pad = capacity(len(tokens), self.num_experts, self.topk, self.capacity_factor)
        out = self.dispatch(
            expert_in,
            copy_to_tensor_model_parallel_region(probs, self.tp_group),  # its grads are tp-partial
            routing_map,
            self.experts,
            self.ep_group,
            pad,
        ).to(x.dtype)
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(
                out.view(-1, *x.shape[1:]), self.tp_group
            )
        else:
            out = reduce_from_tensor_model_parallel_region(out, self.tp_group).view(x.shape)
        if self.shared_experts is not None:
            shared, bias = self.shared_experts(x)
            out = out + shared if bias is None else out + shared + bias
        return out, None

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the router's tokens [T, h], the experts' tokens [T, h]): the same values, but the
        experts are tp-split, so their input gradients are partial and summed over tp (a
        reduce-scatter under sequence parallelism), while the router's are whole already."""
        h = x.shape[-1]
        if self.sequence_parallel:  # the whole sequence, on every tp rank
            router_in = gather_from_sequence_parallel_region(x, self.tp_group, False)
            expert_in = gather_from_sequence_parallel_region(x, self.tp_group, True)
            return router_in.reshape(-1, h), expert_in.reshape(-1, h)
        tokens = x.reshape(-1, h)
        return tokens, copy_to_tensor_model_parallel_region(tokens, self.tp_group)
