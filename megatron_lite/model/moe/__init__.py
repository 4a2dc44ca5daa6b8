"""Mixture of experts (Megatron-LM's MoE, Shazeer et al. 2017): `router.py` (top-k in fp32, aux
losses, capacity), `dispatcher.py` (alltoall / allgather over the expert-parallel group),
`experts.py` (this rank's experts, keyed by global index), `layer.py` (the MoE MLP), `aux_losses.py`
(their backward scale and per-layer logging)."""

from megatron_lite.model.moe.aux_losses import (
    aux_loss_names,
    reduce_aux_losses,
    set_aux_loss_scale,
    start_step,
    step_aux_losses,
)
from megatron_lite.model.moe.layer import MoELayer

__all__ = [
    "MoELayer",
    "aux_loss_names",
    "reduce_aux_losses",
    "set_aux_loss_scale",
    "start_step",
    "step_aux_losses",
]
