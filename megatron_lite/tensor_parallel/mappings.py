"""Autograd-aware communication for tensor and sequence parallelism (Megatron-LM, Shoeybi et al.
2019, section 3; Korthikanti et al. 2022, section 4.2 for the sequence-parallel pair).

Every function takes the tensor-parallel group explicitly; `None` or a group of size 1 means "no
communication" (the function is the identity, or a no-op split). Each forward op's backward is its
conjugate: copy <-> all-reduce, split <-> all-gather, all-gather (sequence) <-> reduce-scatter.
No device calls here: the same code runs on gloo (CPU) and NCCL (CUDA).
"""

from __future__ import annotations

import torch

from megatron_lite.comm import Group, all_gather, all_reduce, group_rank, group_size, reduce_scatter


def all_gather_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    all_gather(out, x, group)
    if dim == 0:
        return out
    return torch.cat(out.chunk(world, dim=0), dim=dim)


def reduce_scatter_dim0(x: torch.Tensor, group: Group, async_op: bool = False):
    """Sum over ranks, keep this rank's slice of dim 0; returns (out, work-or-None)."""
    world = group_size(group)
    if world == 1:
        return x, None
    if x.shape[0] % world != 0:
        raise ValueError(f"dim 0 ({x.shape[0]}) must be divisible by the tp size ({world})")
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    work = reduce_scatter(out, x, group, async_op=async_op)
    return out, work


def split_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """This rank's equal slice of `x` along `dim` (no communication)."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world != 0:
        raise ValueError(f"dim {dim} ({x.shape[dim]}) must be divisible by the tp size ({world})")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


# ---- autograd functions -----------------------------------------------------------------------


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        all_reduce(grad, ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # in place, as Megatron: x is a fresh matmul output nobody saved
        all_reduce(x, group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, -1, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return split_dim(grad, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, 0, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group, ctx.reduce = group, tensor_parallel_output_grad
        return all_gather_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce:  # the consumer was tp-parallel: each rank holds a partial gradient
            return reduce_scatter_dim0(grad, ctx.group)[0], None, None
        return split_dim(grad, 0, ctx.group), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)[0]

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim(grad, 0, ctx.group), None


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel op)."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-reduce forward; identity backward (output of a row-parallel op)."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's slice of the last dim; all-gather backward."""
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather along the last dim; split backward."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Keep this rank's slice of the sequence (dim 0); all-gather backward."""
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: Group, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather along the sequence (dim 0); backward reduce-scatters (or splits, when the consumer
    was replicated over tp and each rank already holds the full gradient)."""
    if group_size(group) == 1:
        return x
    return _GatherFromSequence.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum over tp ranks and keep this rank's sequence slice; all-gather backward."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)
