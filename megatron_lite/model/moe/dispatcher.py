"""Token dispatch to the experts over the expert-parallel group, and the way back.

Both dispatchers take this rank's routed tokens and return the combined expert outputs (each token's
sum over its experts of probability x output), partial over tp like a row-parallel layer's:
- alltoall: each token goes only to the rank holding its expert (two all-to-alls: counts, then
  tokens), the experts run, the outputs come back the same way;
- allgather: every rank gathers every ep rank's tokens and routing, runs its own experts on the
  tokens routed to them, and the partial results are reduce-scattered back (more traffic, no
  data-dependent message sizes).
"""

from __future__ import annotations

import torch

from megatron_lite import comm
from megatron_lite.comm import Group, group_size
from megatron_lite.model.moe.experts import LocalExperts
from megatron_lite.tensor_parallel.mappings import (
    all_gather_dim,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


def permute(x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
    """Tokens in expert-major order: (rows [N, h], their probabilities [N], source token [N],
    tokens per expert [E])."""
    expert_idx, token_idx = routing_map.t().nonzero(as_tuple=True)
    return x[token_idx], probs[token_idx, expert_idx], token_idx, routing_map.sum(0)


def unpermute(y: torch.Tensor, weights: torch.Tensor, token_idx: torch.Tensor, n: int):
    """Each token's probability-weighted sum of its rows of `y` -> [n, h]."""
    out = y.new_zeros(n, y.shape[1])
    return out.index_add(0, token_idx, y * weights[:, None].to(y.dtype))


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group: Group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        comm.all_to_all(out, x.contiguous(), out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(out_splits), *grad.shape[1:])
        comm.all_to_all(back, grad.contiguous(), out_splits, in_splits, ctx.group)
        return back, None, None, None


def _regroup(x: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    """Segments of `x` (lengths `sizes`) concatenated in `order`."""
    pieces = x.split(sizes)
    return torch.cat([pieces[i] for i in order]) if pieces else x


def alltoall_dispatch(
    x: torch.Tensor,
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    experts: LocalExperts,
    group: Group,
    pad_per_source: int | None = None,
) -> torch.Tensor:
    ep, local = group_size(group), experts.num_local
    rows, weights, token_idx, counts = permute(x, probs, routing_map)
    send = counts.view(ep, local)  # [destination rank, its local expert]
    recv = torch.empty_like(send)  # [source rank, my local expert]
    comm.all_to_all(recv, send, [1] * ep, [1] * ep, group)
    in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
    got = _AllToAll.apply(rows, out_splits, in_splits, group)  # (source, expert)-major
    sizes = recv.flatten().tolist()
    order = [s * local + e for e in range(local) for s in range(ep)]  # -> (expert, source)-major
    pad = None if pad_per_source is None else pad_per_source * ep
    y = experts(_regroup(got, sizes, order), recv.sum(0).tolist(), pad)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    y = _regroup(y, [sizes[i] for i in order], inverse)
    back = _AllToAll.apply(y, in_splits, out_splits, group)
    return unpermute(back, weights, token_idx, len(x))


def allgather_dispatch(
    x: torch.Tensor,
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    experts: LocalExperts,
    group: Group,
    pad_per_source: int | None = None,
) -> torch.Tensor:
    ep = group_size(group)
    every_x = gather_from_sequence_parallel_region(x, group)  # [ep T, h]; backward sums
    every_probs = gather_from_sequence_parallel_region(probs, group)
    every_map = all_gather_dim(routing_map.to(torch.uint8), 0, group).bool()
    mine = slice(experts.first, experts.first + experts.num_local)
    rows, weights, token_idx, counts = permute(every_x, every_probs[:, mine], every_map[:, mine])
    pad = None if pad_per_source is None else pad_per_source * ep
    y = experts(rows, counts.tolist(), pad)
    out = unpermute(y, weights, token_idx, len(every_x))
    return reduce_scatter_to_sequence_parallel_region(out, group)


DISPATCHERS = {"alltoall": alltoall_dispatch, "allgather": allgather_dispatch}
