"""MoE experts in checkpoints: each ep rank holds other experts, all under their global names
(`decoder.layers.N.mlp.experts.local_experts.E.…`), so the one file of a (tp, pp) rank gets every
expert of that rank by gathering them over the ep group before dp rank 0 writes. Loading needs
nothing special: a rank reads the experts it holds by name, whatever ep (or tp/pp/dp) saved them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_lite.config import MoEConfig, flag_name

if TYPE_CHECKING:
    from megatron_lite.parallel_state import ParallelState

EXPERT_NAME = ".mlp.experts.local_experts."
# the MoE settings that shape the model: how many experts, how big, in which layers
MOE_SHAPE_FIELDS = (
    "num_experts",
    "moe_ffn_hidden_size",
    "moe_layer_freq",
    "moe_shared_expert_intermediate_size",
)


def is_expert(name: str) -> bool:
    return EXPERT_NAME in name


def moe_differences(saved: dict, mine: MoEConfig) -> list[str]:
    """'flag: checkpoint a, this run b' for each MoE shape setting that differs."""
    out = []
    for f in MOE_SHAPE_FIELDS:
        a, b = saved.get(f, getattr(MoEConfig(), f)), getattr(mine, f)
        if a != b:
            out.append(f"{flag_name(MoEConfig, f)}: checkpoint {a}, this run {b}")
    return out


def _cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    return v


def gather_experts(per_chunk: list[dict[str, Any]], ps: ParallelState) -> list[dict[str, Any]]:
    """`per_chunk[i]`: name -> value for model chunk i; returns them with every ep rank's expert
    entries added (collective over ep; the identity at ep = 1)."""
    if ps.ep_size == 1:
        return per_chunk
    mine = [{n: _cpu(v) for n, v in d.items() if is_expert(n)} for d in per_chunk]
    every: list[list[dict] | None] = [None] * ps.ep_size
    dist.all_gather_object(every, mine, group=ps.ep_group)
    merged = [dict(d) for d in per_chunk]
    for theirs in every:
        for i, d in enumerate(theirs):
            merged[i].update(d)
    return merged
