"""Tensor-parallel layers (Megatron-LM, Shoeybi et al. 2019, section 3).

- `ColumnParallelLinear`: weight split on the output dim; the input is replicated (all-gathered along
  the sequence first under sequence parallelism).
- `RowParallelLinear`: weight split on the input dim; partial outputs are all-reduced (reduce-scattered
  along the sequence under sequence parallelism).
- `VocabParallelEmbedding`: the vocabulary split over tp ranks; each rank looks up its own rows.

Both linears share one autograd Function that overlaps the input-gradient collective with the weight
gradient, and defers the weight gradient to a `WeightGradStore` under zero-bubble schedules.
Parameters are created empty with their tags; `initialize_parameter` (utils) fills them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.tensor_parallel.mappings import (
    Group,
    all_gather_dim,
    all_reduce,
    gather_from_tensor_model_parallel_region,
    group_rank,
    group_size,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_dim0,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_lite.tensor_parallel.utils import set_tensor_model_parallel_attributes
from megatron_lite.tensor_parallel.weight_grad_store import (
    any_store_alive,
    apply_grads,
    deferring_store,
)


class LinearWithGradAccumulationAndAsyncCommunication(torch.autograd.Function):
    """y = x W^T + b, where x is all-gathered along dim 0 first under sequence parallelism.

    Backward starts the input-gradient collective (all-reduce, or reduce-scatter under sequence
    parallelism) asynchronously, computes the weight gradient meanwhile, then waits. Inside
    a `WeightGradStore.defer()` block the weight gradient is queued instead of computed.

    The weight and bias enter detached and their gradients are applied with
    `torch.autograd.backward([param], [grad])` (`apply_grads`), now or when the store pops: so a
    parameter's post-accumulate-grad hook fires only once its gradient really exists, never with a
    placeholder while the weight gradient is deferred.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, params, allreduce_dgrad, sequence_parallel, group):
        total_x = all_gather_dim(x, 0, group) if sequence_parallel else x
        ctx.save_for_backward(total_x, weight)
        ctx.params, ctx.has_bias = params, bias is not None
        ctx.allreduce_dgrad, ctx.sequence_parallel, ctx.group = (
            allreduce_dgrad,
            sequence_parallel,
            group,
        )
        return F.linear(total_x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        total_x, weight = ctx.saved_tensors
        grad_x = grad_out.matmul(weight)
        work = None
        if ctx.sequence_parallel:
            grad_x, work = reduce_scatter_dim0(grad_x, ctx.group, async_op=True)
        elif ctx.allreduce_dgrad:
            work = all_reduce(grad_x, ctx.group, async_op=True)

        params, has_bias = ctx.params, ctx.has_bias

        def weight_grads() -> None:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = None
            if params[0] is not None:
                grad_w = g2.t().matmul(total_x.reshape(-1, total_x.shape[-1]))
            grad_b = g2.sum(0) if has_bias and params[1] is not None else None
            apply_grads(list(params), [grad_w, grad_b])

        if all(p is None for p in params):
            pass
        elif (store := deferring_store()) is not None:
            store.put(weight_grads)
        else:
            weight_grads()
        if work is not None:
            work.wait()
        return grad_x, None, None, None, None, None, None


def linear_with_grad_accumulation_and_async_allreduce(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    allreduce_dgrad: bool,
    sequence_parallel: bool,
    group: Group,
) -> torch.Tensor:
    if not (allreduce_dgrad or sequence_parallel or any_store_alive()):
        return F.linear(x, weight, bias)  # nothing to overlap or defer: autograd's own linear
    params = tuple(p if p is not None and p.requires_grad else None for p in (weight, bias))
    if any(p is not None for p in params) and torch.is_grad_enabled() and not x.requires_grad:
        x = x.detach().requires_grad_()  # backward must run to produce the weight gradients
    return LinearWithGradAccumulationAndAsyncCommunication.apply(
        x,
        weight.detach(),
        None if bias is None else bias.detach(),
        params,
        allreduce_dgrad,
        sequence_parallel,
        group,
    )


def _bias(size: int, is_parallel: bool, stride: int = 1) -> nn.Parameter:
    b = nn.Parameter(torch.zeros(size))
    set_tensor_model_parallel_attributes(b, is_parallel, 0, stride)
    b.init_std = "zeros"
    return b


class ColumnParallelLinear(nn.Module):
    """Y = X A with A split by columns: rank r computes Y_r = X A_r (output dim sharded).

    `gather_output` all-gathers Y along the last dim; `stride` > 1 keeps interleaved blocks of the full
    weight together on a rank (utils docstring). `forward(x, weight=None)` may take an external weight
    (the tied word embedding). Returns (output, bias) with bias only when `skip_bias_add`.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        tp_group: Group,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        init_std: float = 0.02,
        stride: int = 1,
        skip_bias_add: bool = False,
        skip_weight_param_allocation: bool = False,
    ):
        super().__init__()
        tp = group_size(tp_group)
        if output_size % tp != 0:
            raise ValueError(f"output_size ({output_size}) must be divisible by the tp size ({tp})")
        if gather_output and sequence_parallel:
            raise ValueError("gather_output is not supported with sequence parallelism")
        self.tp_group, self.tp_size = tp_group, tp
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel and tp > 1
        self.skip_bias_add = skip_bias_add
        self.output_size_per_partition = output_size // tp
        if skip_weight_param_allocation:
            self.weight = None
        else:
            self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size))
            set_tensor_model_parallel_attributes(self.weight, True, 0, stride)
            self.weight.init_std = init_std
        self.bias = _bias(self.output_size_per_partition, True, stride) if bias else None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None):
        weight = self.weight if weight is None else weight
        bias = None if self.skip_bias_add else self.bias
        out = linear_with_grad_accumulation_and_async_allreduce(
            x, weight, bias, self.tp_size > 1, self.sequence_parallel, self.tp_group
        )
        if self.gather_output:
            out = gather_from_tensor_model_parallel_region(out, self.tp_group)
        return out, (self.bias if self.skip_bias_add else None)


class RowParallelLinear(nn.Module):
    """Y = X A with A split by rows: rank r computes X_r A_r, partial sums reduced over tp.

    `input_is_parallel`: X arrives already split on its last dim (the output of a column-parallel
    layer); else it is split here. Under sequence parallelism the sum is reduce-scattered along the
    sequence (dim 0) and the bias, added per sequence shard, is tagged `sequence_parallel`.
    Returns (output, bias) with bias only when `skip_bias_add`.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        tp_group: Group,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_std: float = 0.02,
        skip_bias_add: bool = False,
    ):
        super().__init__()
        tp = group_size(tp_group)
        if input_size % tp != 0:
            raise ValueError(f"input_size ({input_size}) must be divisible by the tp size ({tp})")
        if sequence_parallel and not input_is_parallel and tp > 1:
            raise ValueError("sequence parallelism needs input_is_parallel=True")
        self.tp_group, self.tp_size = tp_group, tp
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and tp > 1
        self.skip_bias_add = skip_bias_add
        self.weight = nn.Parameter(torch.empty(output_size, input_size // tp))
        set_tensor_model_parallel_attributes(self.weight, True, 1)
        self.weight.init_std = init_std
        self.bias = _bias(output_size, False) if bias else None
        if self.bias is not None:
            self.bias.sequence_parallel = self.sequence_parallel

    def forward(self, x: torch.Tensor):
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.tp_group)
        out = linear_with_grad_accumulation_and_async_allreduce(
            x, self.weight, None, False, False, self.tp_group
        )
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        else:
            out = reduce_from_tensor_model_parallel_region(out, self.tp_group)
        if self.skip_bias_add or self.bias is None:
            return out, (self.bias if self.skip_bias_add else None)
        return out + self.bias, None


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over tp ranks: rank r owns rows [r V/tp, (r+1) V/tp).

    Tokens outside the rank's range look up zeros; the partial outputs are all-reduced, or, with
    `reduce_scatter_embeddings`, transposed to [s, b, h] and reduce-scattered along the sequence.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp_group: Group,
        init_std: float = 0.02,
        reduce_scatter_embeddings: bool = False,
    ):
        super().__init__()
        tp = group_size(tp_group)
        if num_embeddings % tp != 0:
            raise ValueError(
                f"num_embeddings ({num_embeddings}) must be divisible by the tp size ({tp})"
            )
        self.tp_group, self.tp_size = tp_group, tp
        per_rank = num_embeddings // tp
        self.vocab_start = group_rank(tp_group) * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.reduce_scatter_embeddings = reduce_scatter_embeddings and tp > 1
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim))
        set_tensor_model_parallel_attributes(self.weight, True, 0)
        self.weight.init_std = init_std

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill_(outside, 0)
        out = F.embedding(local, self.weight)  # [b, s, h] partial
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            out = out.transpose(0, 1).contiguous()  # [s, b, h]
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        return reduce_from_tensor_model_parallel_region(out, self.tp_group)
