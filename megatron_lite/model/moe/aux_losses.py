"""The routers' auxiliary losses: their backward scale, and what each layer reports per step.

An aux loss never reaches the pipeline's loss: it is attached to the router's output by
`AuxLossAutoScaler`, whose backward feeds the aux loss the gradient `scale` (Megatron's
MoEAuxLossAutoScaler). The schedule divides the lm loss by the number of microbatches and the loss
scaler multiplies it; `set_aux_loss_scale(loss_scale / num_microbatches)` gives the aux losses the
same treatment, and dp averaging of gradients does the rest. So a layout gives the same gradients
as one process, on every pipeline stage, without sending the aux losses anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_lite import comm
from megatron_lite.tensor_parallel.random import is_recomputing

if TYPE_CHECKING:
    from megatron_lite.parallel_state import ParallelState

_scale = 1.0
_tracked: dict[str, dict[int, torch.Tensor]] = {}  # name -> layer number -> sum over microbatches


def set_aux_loss_scale(scale: float) -> None:
    """The gradient each aux loss receives in backward (loss scale / number of microbatches)."""
    global _scale
    _scale = float(scale)


class AuxLossAutoScaler(torch.autograd.Function):
    """Identity on `output`; backward also gives `aux_loss` the gradient `_scale`."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, _scale)


def attach(output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
    return AuxLossAutoScaler.apply(output, aux_loss)


def record(name: str, layer_number: int, value: torch.Tensor) -> None:
    """Add one microbatch's aux loss (without its coefficient, as Megatron logs it); a
    recomputed forward (activation checkpointing) adds nothing: its first pass did."""
    if is_recomputing():
        return
    per_layer = _tracked.setdefault(name, {})
    v = value.detach().float()
    per_layer[layer_number] = per_layer[layer_number] + v if layer_number in per_layer else v


def reset() -> None:
    _tracked.clear()


def aux_loss_names(load_balancing_type: str, z_loss: bool) -> list[str]:
    """The names a configuration records, in a fixed order (every rank reduces the same table)."""
    names = {"aux_loss": ["load_balancing_loss"], "seq_aux_loss": ["seq_load_balancing_loss"]}
    return names.get(load_balancing_type, []) + (["z_loss"] if z_loss else [])


def start_step(loss_scale: float, num_microbatches: int) -> None:
    """Before a training step's first forward: clear the records, set the aux losses' scale."""
    reset()
    set_aux_loss_scale(loss_scale / num_microbatches)


def step_aux_losses(cfg, num_microbatches: int, ps: ParallelState) -> dict[str, dict[int, float]]:
    """After the step: each aux loss per MoE layer (collective; see `reduce_aux_losses`)."""
    e = cfg.moe
    names = aux_loss_names(
        e.moe_router_load_balancing_type if e.moe_aux_loss_coeff > 0 else "none",
        e.moe_z_loss_coeff is not None,
    )
    return reduce_aux_losses(names, cfg.model.num_layers, num_microbatches, ps)


def reduce_aux_losses(
    names: list[str], num_layers: int, num_microbatches: int, ps: ParallelState
) -> dict[str, dict[int, float]]:
    """Each name's per-layer average over this step's microbatches and dp ranks (collective over pp
    and dp: every layer lives on one stage); layers without an MoE MLP are left out."""
    table = torch.zeros(len(names), num_layers, dtype=torch.float64)
    seen = torch.zeros(num_layers, dtype=torch.float64)
    for i, name in enumerate(names):
        for layer, v in _tracked.get(name, {}).items():
            table[i, layer] = float(v) / num_microbatches
            seen[layer] = 1.0
    both = torch.cat([table.flatten(), seen])
    if ps.tp_rank != 0:  # tp ranks hold the same values
        both.zero_()
    comm.all_reduce_sum_over(both, ps.tp_group, ps.pp_group, ps.dp_group)
    table = both[: table.numel()].view_as(table) / ps.dp_size
    seen = both[table.numel() :] > 0
    return {
        name: {layer: float(table[i, layer]) for layer in range(num_layers) if seen[layer]}
        for i, name in enumerate(names)
    }
