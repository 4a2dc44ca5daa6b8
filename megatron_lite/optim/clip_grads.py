"""Global gradient norm over every tp/pp/dp shard, clipping, and zero counting.

Each rank sums the squares of the gradients it is responsible for counting, then the sums are added
over the model-parallel group (and over dp, when the distributed optimizer split the gradients over
dp). Tags from docs/internals.md decide what counts: a parameter replicated over tp only on tp rank 0,
a tied `shared_embedding` only on the first pipeline stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatron_lite import comm
from megatron_lite.tensor_parallel.utils import tags_of

if TYPE_CHECKING:
    from megatron_lite.parallel_state import ParallelState


def counts_toward_norm(param: torch.nn.Parameter, ps: ParallelState) -> bool:
    """Whether this rank's copy of `param` is the one counted in global norms."""
    tags = tags_of(param)
    if not tags.tensor_model_parallel and ps.tp_rank != 0:
        return False  # the same tensor lives on every tp rank
    if tags.shared_embedding and not ps.is_first_stage:
        return False  # the last stage holds a copy of the first stage's word embedding
    return True


def sum_of_squares(
    grads: list[torch.Tensor], groups: list, device: torch.device | None = None
) -> torch.Tensor:
    """Sum of the squares of `grads` over `groups` (each rank passes only what it counts)."""
    total = torch.zeros(1, dtype=torch.float32, device=device)
    if grads:
        norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
        total += torch.stack(norms).square().sum()
    comm.all_reduce_sum_over(total, *groups)
    return total


def global_norm(
    grads: list[torch.Tensor], groups: list, device: torch.device | None = None
) -> float:
    """L2 norm of `grads` summed over `groups` (each rank passes only what it counts)."""
    return float(sum_of_squares(grads, groups, device).sqrt())


def global_norm_of_parts(parts: list[tuple[list, list]], device=None) -> float:
    """L2 norm of several (tensors, groups) parts, each summed over its own groups (dense
    parameters over the model-parallel group, MoE experts over it and the ep group)."""
    return float(sum(sum_of_squares(ts, groups, device) for ts, groups in parts).sqrt())


def clip_grads(grads: list[torch.Tensor], total_norm: float, max_norm: float) -> None:
    """Scale every gradient (counted or not) by max_norm / norm when the norm exceeds max_norm."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


def count_zeros(grads: list[torch.Tensor], groups: list, device=None) -> int:
    total = torch.zeros(1, dtype=torch.float32, device=device)
    for g in grads:
        total += (g == 0).sum()
    comm.all_reduce_sum_over(total, *groups)
    return int(total.item())
