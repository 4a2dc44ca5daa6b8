"""Contiguous gradient (and parameter) buffers split into buckets.

Parameters are laid out in reverse registration order, roughly the order backward produces their
gradients, so the first bucket fills first and its reduction can start while backward goes on. A
parameter never straddles two buckets. Each parameter's `main_grad` is a view into the grad buffer.

For the distributed optimizer (ZeRO-1) each bucket is padded to a multiple of dp (x 128 elements, for
aligned shards) and split into dp equal shards: dp rank r owns shard r of every bucket. The parameters
then live in a contiguous param buffer too (`param.data` is a view), so one all-gather per bucket
refreshes them after the step. A `shared_embedding` parameter gets a bucket of its own, so the first and
the last pipeline stage shard it identically and its embedding-group all-reduce can follow the dp
reduce-scatter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megatron_lite import comm
from megatron_lite.tensor_parallel.utils import tags_of


@dataclass(eq=False)
class Bucket:
    """A run of parameters whose gradients are reduced by one collective."""

    params: list[torch.nn.Parameter]
    offset: int  # first element in the buffer
    numel: int  # including padding
    grad_data: torch.Tensor  # view [numel] of the grad buffer
    param_data: torch.Tensor | None  # view [numel] of the param buffer (distributed optimizer)
    pending: dict[int, int] = field(default_factory=dict)  # id(param) -> gradients still to come
    work: object | None = None  # async handle while the reduction is in flight
    shard_out: torch.Tensor | None = None  # reduce-scatter destination until it lands
    launched: bool = False
    param_work: object | None = (
        None  # async parameter all-gather in flight (--overlap-param-gather)
    )
    param_shard_in: torch.Tensor | None = None  # its input, kept alive until it lands

    def shard_range(self, dp_rank: int, dp_size: int) -> tuple[int, int]:
        """Buffer range [start, end) of dp rank `dp_rank`'s shard of this bucket."""
        size = self.numel // dp_size
        return self.offset + dp_rank * size, self.offset + (dp_rank + 1) * size

    def reset(self, expected: dict[int, int] | None = None) -> None:
        """Ready for a new step; `expected`: gradients per parameter in the step's synced backward."""
        expected = expected or {}
        self.pending = {id(p): expected[id(p)] for p in self.params if expected.get(id(p), 0) > 0}
        self.work, self.shard_out, self.launched = None, None, False


class ParamAndGradBuffer:
    """One buffer for the parameters of one (param dtype, grad dtype) pair."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        grad_dtype: torch.dtype,
        bucket_size: int | None,
        dp_size: int,
        shard: bool,
        *,
        group=None,
        rank: int = 0,
        grad_scale: float | None = None,
        cp_group=None,
        cp_size: int = 1,
    ) -> None:
        """`group`/`rank`: the group this buffer reduces over and this rank's dp index in it (dp,
        or dp x cp when not sharded under context parallelism; edp for experts); `grad_scale`: what
        each gradient is multiplied by before the sum (default 1/(dp x cp); experts: 1/dp, since
        their tokens came from every dp rank); `cp_group`/`cp_size`: context-parallel ranks whose
        partial gradients are summed in first when sharded (ZeRO-1 shards stay over dp)."""
        self.params = list(params)  # already in bucket (backward) order
        self.group, self.rank = group, rank
        self.cp_group = cp_group
        self.grad_scale = 1.0 / (dp_size * cp_size) if grad_scale is None else grad_scale
        self.param_dtype = self.params[0].dtype
        self.grad_dtype = grad_dtype
        self.dp_size, self.shard, self.cp_size = dp_size, shard, cp_size
        align = math.lcm(dp_size, 128) if shard else 1
        self.ranges: dict[int, tuple[int, int]] = {}  # id(param) -> buffer [start, end)
        layout: list[tuple[list[torch.nn.Parameter], int, int]] = []  # (params, offset, numel)
        current: list[torch.nn.Parameter] = []
        start = offset = 0

        def close() -> None:
            nonlocal start, offset, current
            if current:
                offset = _round_up(offset, align)
                layout.append((current, start, offset - start))
            start, current = offset, []

        for p in self.params:
            alone = tags_of(p).shared_embedding
            if alone:
                close()
            self.ranges[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
            current.append(p)
            if alone or (bucket_size is not None and offset - start >= bucket_size):
                close()
        close()
        self.numel = offset
        device = self.params[0].device
        self.grad_data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.param_data = None
        if shard:  # the params move into one flat buffer, so one all-gather per bucket updates them
            self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
            for p in self.params:
                s, e = self.ranges[id(p)]
                self.param_data[s:e].copy_(p.data.view(-1))
                p.data = self.param_data[s:e].view(p.shape)
        for p in self.params:
            s, e = self.ranges[id(p)]
            p.main_grad = self.grad_data[s:e].view(p.shape)
        self.buckets = [
            Bucket(
                params=ps,
                offset=o,
                numel=n,
                grad_data=self.grad_data[o : o + n],
                param_data=None if self.param_data is None else self.param_data[o : o + n],
            )
            for ps, o, n in layout
        ]
        for b in self.buckets:
            b.reset()

    def param_shard_ranges(self, dp_rank: int) -> list[tuple[torch.nn.Parameter, int, int, Bucket]]:
        """(param, start, end, bucket) for each piece of a parameter inside this rank's shards.

        `start, end` index the flattened parameter; empty intersections are left out.
        """
        out = []
        for b in self.buckets:
            s0, s1 = b.shard_range(dp_rank, self.dp_size)
            for p in b.params:
                ps, pe = self.ranges[id(p)]
                lo, hi = max(ps, s0), min(pe, s1)
                if lo < hi:
                    out.append((p, lo - ps, hi - ps, b))
        return out

    def grad_view(self, p: torch.nn.Parameter, start: int, end: int) -> torch.Tensor:
        ps, _ = self.ranges[id(p)]
        return self.grad_data[ps + start : ps + end]

    # --- reduction ---------------------------------------------------------------------------
    def launch(self, bucket: Bucket, async_op: bool) -> None:
        """Average the bucket's gradients over dp (x cp): all-reduce over the buffer's group, or
        under sharding an all-reduce over the cp group and a reduce-scatter over the group (dp)
        into the shard."""
        bucket.launched = True
        if self.grad_scale != 1.0:
            bucket.grad_data.mul_(self.grad_scale)  # averaging done once, before the sum
        if self.dp_size * self.cp_size == 1:
            return
        if self.shard and self.cp_size > 1:
            comm.all_reduce(bucket.grad_data, self.cp_group)  # cp partial sums, then the shards
            if self.dp_size == 1:
                return
        if self.shard:
            # a separate destination: an in-place reduce-scatter is not safe on every backend
            bucket.shard_out = torch.empty(
                bucket.numel // self.dp_size, dtype=self.grad_dtype, device=self.grad_data.device
            )
            bucket.work = comm.reduce_scatter(
                bucket.shard_out, bucket.grad_data, self.group, async_op
            )
        else:
            bucket.work = comm.all_reduce(bucket.grad_data, self.group, async_op=async_op)

    def wait(self, bucket: Bucket, dp_rank: int) -> None:
        if bucket.work is not None:
            bucket.work.wait()
        if bucket.shard_out is not None:
            s0, s1 = bucket.shard_range(dp_rank, self.dp_size)
            self.grad_data[s0:s1].copy_(bucket.shard_out)
        bucket.work, bucket.shard_out = None, None

    def all_gather_params(self, group, dp_rank: int, async_op: bool = False) -> None:
        """After the step: every rank's updated shard to every rank (distributed optimizer);
        `async_op` leaves each bucket's all-gather in flight until `wait_params(bucket)`."""
        if self.dp_size == 1:
            return
        for b in self.buckets:
            s0, s1 = b.shard_range(dp_rank, self.dp_size)
            b.param_shard_in = self.param_data[s0:s1].clone()
            b.param_work = comm.all_gather(b.param_data, b.param_shard_in, group, async_op)
            if not async_op:
                b.param_work = b.param_shard_in = None

    def wait_params(self, bucket: Bucket) -> None:
        if bucket.param_work is not None:
            bucket.param_work.wait()
        bucket.param_work = bucket.param_shard_in = None


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
