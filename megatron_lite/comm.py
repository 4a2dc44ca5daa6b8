"""The raw collectives every parallelism uses (tp mappings, DDP, the optimizers), wrapped once, with
a counter the benchmark reads.

Every call takes its group explicitly; None (ParallelState.single(), or no process group at all) or
a group of one rank means "no communication". Device-agnostic: the same calls run on gloo (CPU) and
NCCL (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def _reduce_scatter(*args, **kwargs):  # torch >= 2.8 names it *_single; the old name warns there
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(
        *args, **kwargs
    )


def _all_gather(*args, **kwargs):  # looked up per call, so a test can count the real calls
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(
        *args, **kwargs
    )


@dataclass
class CommStats:
    """Collectives issued by this process (reset by the benchmark around one step)."""

    calls: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.calls, self.bytes = 0, 0


stats = CommStats()  # process-wide on purpose: it counts what this process sends, whoever sends it
Group = dist.ProcessGroup | None


def group_size(group: Group) -> int:
    """Ranks in `group`; None means "no communication" (ParallelState.single()), so 1."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This process's rank in `group` (0 where `group_size` is 1)."""
    return 0 if group_size(group) == 1 else dist.get_rank(group)


def _count(t: torch.Tensor) -> None:
    stats.calls += 1
    stats.bytes += t.numel() * t.element_size()


def all_reduce(
    t: torch.Tensor,
    group: Group,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    async_op: bool = False,
):
    """In-place all-reduce; returns a work handle when `async_op`, else None. Over one rank it is
    the identity and nothing is sent (still counted: the caller asked for it)."""
    _count(t)
    if group_size(group) == 1:
        return None
    return dist.all_reduce(t, op=op, group=group, async_op=async_op)


def reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: Group, async_op: bool = False):
    """Sum `inp` over the group; rank r keeps the r-th equal slice in `out`."""
    _count(inp)
    return _reduce_scatter(out, inp, group=group, async_op=async_op)


def all_gather(out: torch.Tensor, inp: torch.Tensor, group: Group, async_op: bool = False):
    """Concatenate every rank's `inp` (rank order) into `out`."""
    _count(out)
    return _all_gather(out, inp, group=group, async_op=async_op)


def all_reduce_max_over(t: torch.Tensor, *groups: Group) -> torch.Tensor:
    """Maximum of `t` over each group in turn (found-inf agreement); skips groups of size 1."""
    for g in groups:
        if group_size(g) > 1:
            all_reduce(t, g, op=dist.ReduceOp.MAX)
    return t


def all_reduce_sum_over(t: torch.Tensor, *groups: Group) -> torch.Tensor:
    for g in groups:
        if group_size(g) > 1:
            all_reduce(t, g)
    return t


def broadcast(t: torch.Tensor, src: int, group: Group) -> None:
    """`t` from global rank `src` to every rank of `group`, in place."""
    _count(t)
    if group_size(group) > 1:
        dist.broadcast(t, src, group=group)


def all_gather_list(out: list[torch.Tensor], inp: torch.Tensor, group: Group) -> None:
    """Every rank's `inp` into `out[rank]` (the list form: for a few small tensors of one shape)."""
    _count(inp)
    if group_size(group) == 1:
        out[0].copy_(inp)
        return
    dist.all_gather(out, inp, group=group)


def all_to_all(
    out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Group
) -> None:
    """Rank r sends rows `in_splits[j]` of `inp` to rank j and receives `out_splits[j]` rows from
    it (dim 0, rank order), into `out` (MoE token dispatch)."""
    _count(inp)
    if group_size(group) == 1:
        out.copy_(inp)
        return
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)


def ring_exchange(
    send: list[torch.Tensor], next_rank: int, prev_rank: int, group: Group
) -> tuple[list[torch.Tensor], list]:
    """Ring p2p (context parallelism): send each tensor to global rank `next_rank` and receive its
    like from `prev_rank`, all in flight at once. -> (received tensors, work handles to wait on).
    Messages to one peer match in order, so with two ranks (next == prev) it still pairs up."""
    recv = [torch.empty_like(t) for t in send]
    works = []
    for t in send:
        _count(t)
        works.append(dist.isend(t.contiguous(), next_rank, group=group))
    for r in recv:
        works.append(dist.irecv(r, prev_rank, group=group))
    return recv, works


def wait_all(works: list) -> None:
    for w in works:
        w.wait()
