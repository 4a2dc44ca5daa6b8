"""The collectives DDP and the optimizers use, with a counter the benchmark reads.

Every call takes its group explicitly; a group of size 1 (or None on a single process) means "no
communication". Device-agnostic: the same calls run on gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch >= 2.8 names them *_single; the old names still work but warn
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class CommStats:
    """Collectives issued by this process (reset by the benchmark around one step)."""

    calls: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.calls, self.bytes = 0, 0


stats = CommStats()


def group_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in `group`; None means "no communication" (ParallelState.single()), so 1."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _count(t: torch.Tensor) -> None:
    stats.calls += 1
    stats.bytes += t.numel() * t.element_size()


def all_reduce(
    t: torch.Tensor,
    group: dist.ProcessGroup | None,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    async_op: bool = False,
):
    """In-place all-reduce; returns a work handle when `async_op`, else None."""
    _count(t)
    return dist.all_reduce(t, op=op, group=group, async_op=async_op)


def reduce_scatter(
    out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool = False
):
    """Sum `inp` over the group; rank r keeps the r-th equal slice in `out`."""
    _count(inp)
    return _reduce_scatter(out, inp, group=group, async_op=async_op)


def all_gather(
    out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool = False
):
    """Concatenate every rank's `inp` (rank order) into `out`."""
    _count(out)
    return _all_gather(out, inp, group=group, async_op=async_op)


def all_reduce_max_over(t: torch.Tensor, *groups: dist.ProcessGroup | None) -> torch.Tensor:
    """Maximum of `t` over each group in turn (found-inf agreement); skips groups of size 1."""
    for g in groups:
        if group_size(g) > 1:
            all_reduce(t, g, op=dist.ReduceOp.MAX)
    return t


def all_reduce_sum_over(t: torch.Tensor, *groups: dist.ProcessGroup | None) -> torch.Tensor:
    for g in groups:
        if group_size(g) > 1:
            all_reduce(t, g)
    return t
