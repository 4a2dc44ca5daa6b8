"""Our data-parallel wrapper: gradients into contiguous buckets, reduced once per step.

Not torch's DistributedDataParallel, so the distributed optimizer can share its buffers. How a step goes:

1. backward: a post-accumulate-grad hook adds `param.grad` into `param.main_grad` (a view of the grad
   buffer) and drops `param.grad`. This also catches the zero-bubble schedule's deferred weight gradients,
   which are applied with `torch.autograd.backward([param], [grad])`.
2. Inside `no_sync()` (every microbatch but the last) nothing else happens. Outside it, with
   `overlap_grad_reduce`, a bucket starts its reduction asynchronously, while backward continues, as
   soon as each of its parameters has received all the gradients it gets outside `no_sync()`. That
   count is learned on the first step (which reduces everything at its end): a parameter may receive
   several per backward (a tied embedding used twice, each linear layer applying its weight gradient
   with its own `torch.autograd.backward`), or none (zero-bubble: only the last W runs synced).
3. `finish_grad_sync()` starts whatever has not started (everything, without overlap) and waits.

Each bucket is scaled by 1/dp and summed (all-reduce, or reduce-scatter under the distributed
optimizer, after which each rank's `main_grad` is valid on its own shard only).

After the distributed optimizer's step, `all_gather_params()` refreshes every parameter from the shard
each dp rank updated: at once, or with `overlap_param_gather` asynchronously, one all-gather per
bucket, each waited for by a forward pre-hook of the first module that uses one of its parameters
(so the next forward's first layers run while the later buckets are still arriving). Contract: a
parameter is used inside the forward of the module holding it (or, for a container without a
forward, of its nearest ancestor with one), as every megatron_lite layer does.
`finish_param_sync()` waits for the rest (before reading parameters outside a forward: a save).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from megatron_lite.distributed.grad_buffer import Bucket, ParamAndGradBuffer
from megatron_lite.tensor_parallel.utils import tag_of

if TYPE_CHECKING:
    from megatron_lite.config import Config, ParallelConfig
    from megatron_lite.parallel_state import ParallelState


class DistributedDataParallel(torch.nn.Module):
    """Wraps one model chunk; `forward`, `state_dict` and unknown attributes go to the module."""

    def __init__(
        self, module: torch.nn.Module, cfg: Config | ParallelConfig, ps: ParallelState
    ) -> None:
        """`cfg`: the run's Config (or its ParallelConfig): --overlap-grad-reduce,
        --use-distributed-optimizer, --ddp-bucket-size, --accumulate-allreduce-grads-in-fp32."""
        super().__init__()
        p = getattr(cfg, "parallel", cfg)
        self.module = module
        self.ps = ps
        self.dp_group, self.dp_size, self.dp_rank = ps.dp_group, ps.dp_size, ps.dp_rank
        # context parallelism: dense gradients reduce over dp x cp (ZeRO-1 shards stay over dp)
        self.cp_group, self.cp_size = ps.cp_group, ps.cp_size
        self.overlap_grad_reduce = p.overlap_grad_reduce
        self.use_distributed_optimizer = p.use_distributed_optimizer
        whole = ps.cp_size > 1 and not self.use_distributed_optimizer  # one all-reduce over dp x cp
        self.reduce_group = ps.dp_cp_group if whole else ps.dp_group
        bucket_size = p.ddp_bucket_size
        if bucket_size is None:  # Megatron's default: large buckets, more of them as dp grows
            bucket_size = max(40_000_000, 1_000_000 * self.dp_size)
        self.bucket_size = bucket_size
        self._sync_enabled = True
        self._expected: dict[int, int] | None = None  # synced gradients per param, from step 1
        self._arrived: dict[int, int] = {}
        self.buffers = self._build_buffers(p.accumulate_allreduce_grads_in_fp32)
        self._bucket_of: dict[int, tuple[ParamAndGradBuffer, Bucket]] = {
            id(p): (buf, b) for buf in self.buffers for b in buf.buckets for p in b.params
        }
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._grad_hook)
            for buf in self.buffers
            for p in buf.params
        ]
        self.overlap_param_gather = p.overlap_param_gather and self.use_distributed_optimizer
        if self.overlap_param_gather:
            self._register_param_gather_hooks()

    def _build_buffers(self, grads_in_fp32: bool) -> list[ParamAndGradBuffer]:
        """One buffer per (param dtype, grad dtype), and a separate set for MoE experts' params,
        which are reduced (and sharded by the distributed optimizer) over edp instead of dp."""
        groups: dict[tuple[bool, torch.dtype, torch.dtype], list[torch.nn.Parameter]] = {}
        # reverse registration order ~ the order backward produces gradients
        for p in reversed([p for p in self.module.parameters() if p.requires_grad]):
            fp32 = grads_in_fp32 or p.dtype == torch.bfloat16  # bf16 sums lose too much
            grad_dtype = torch.float32 if fp32 else p.dtype
            groups.setdefault((tag_of(p, "expert_parallel"), p.dtype, grad_dtype), []).append(p)
        ps = self.ps
        return [
            ParamAndGradBuffer(
                params,
                grad_dtype,
                self.bucket_size,
                ps.edp_size if expert else self.dp_size,
                shard=self.use_distributed_optimizer,
                group=ps.edp_group if expert else self.reduce_group,
                rank=ps.edp_rank if expert else self.dp_rank,
                grad_scale=1.0 / (self.dp_size * self.cp_size),
                cp_group=None if expert else self.cp_group,
                cp_size=1 if expert else self.cp_size,
            )
            for (expert, _, grad_dtype), params in groups.items()
        ]

    # --- the module's face ---------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)  # set_input_tensor, pre_process, ...

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if assign:
            raise ValueError(
                "load_state_dict(assign=True) would detach parameters from DDP buffers"
            )
        return self.module.load_state_dict(state_dict, strict=strict)

    # --- gradient synchronization --------------------------------------------------------------
    def _grad_hook(self, param: torch.nn.Parameter) -> None:
        if param.grad is None:
            return
        param.main_grad.add_(param.grad)
        param.grad = None
        if not (self._sync_enabled and self.overlap_grad_reduce):
            return
        key = id(param)
        if self._expected is None:  # first step: learn how many gradients come synced
            self._arrived[key] = self._arrived.get(key, 0) + 1
            return
        buf, bucket = self._bucket_of[key]
        if bucket.launched:
            raise RuntimeError(
                f"a gradient of a parameter of shape {tuple(param.shape)} arrived after its "
                f"bucket's reduction started (step 1 saw {self._expected.get(key, 0)} outside "
                "no_sync()): keep the same backward pattern every step, with every backward but "
                "each step's last inside model.no_sync()"
            )
        left = bucket.pending.get(key, 0) - 1
        if left > 0:
            bucket.pending[key] = left
        elif left == 0:
            del bucket.pending[key]
            if not bucket.pending:
                buf.launch(bucket, async_op=True)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without reducing them (all microbatches but the last)."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def start_grad_sync(self) -> None:
        """Start the reduction of every bucket not yet started."""
        for buf in self.buffers:
            for b in buf.buckets:
                if not b.launched:
                    buf.launch(b, async_op=self.overlap_grad_reduce)

    def finish_grad_sync(self) -> None:
        """Wait until every bucket is reduced; then `main_grad` holds the dp-averaged gradients."""
        self.start_grad_sync()
        if self._expected is None and self.overlap_grad_reduce:
            self._expected = dict(self._arrived)
        for buf in self.buffers:
            for b in buf.buckets:
                buf.wait(b, buf.rank)
                b.reset(self._expected)  # ready for the next step's hooks

    def zero_grad_buffer(self) -> None:
        """Zero every `main_grad` (before each step's first forward)."""
        for buf in self.buffers:
            buf.grad_data.zero_()
            for b in buf.buckets:
                if b.work is not None:
                    b.work.wait()
                b.reset(self._expected)
        self._arrived.clear()
        for p in self.module.parameters():
            p.grad = None

    def all_gather_params(self) -> None:
        """Distributed optimizer: refresh every parameter from the shard each dp rank updated
        (left in flight under `overlap_param_gather`: the next forward waits bucket by bucket)."""
        for buf in self.buffers:
            buf.all_gather_params(buf.group, buf.rank, self.overlap_param_gather)

    def finish_param_sync(self) -> None:
        """Wait for every parameter all-gather still in flight."""
        for buf in self.buffers:
            for b in buf.buckets:
                buf.wait_params(b)

    def params_in_flight(self) -> int:
        """Buckets whose parameter all-gather has not been waited for."""
        return sum(b.param_work is not None for buf in self.buffers for b in buf.buckets)

    def _register_param_gather_hooks(self) -> None:
        """A forward pre-hook on each module that uses parameters, waiting for their buckets. A
        parameter held by a module without a forward of its own (a plain container) is used by an
        ancestor's forward: that ancestor waits for it."""
        parent = {c: m for m in self.module.modules() for c in m.children()}
        waits: dict[torch.nn.Module, set[tuple[ParamAndGradBuffer, Bucket]]] = {}
        for m in self.module.modules():
            user = m
            while type(user).forward is torch.nn.Module.forward and user in parent:
                user = parent[user]
            for q in m.parameters(recurse=False):
                if id(q) in self._bucket_of:
                    waits.setdefault(user, set()).add(self._bucket_of[id(q)])

        def hook_for(buckets: set[tuple[ParamAndGradBuffer, Bucket]]):
            def hook(module, args) -> None:
                for buf, b in buckets:
                    buf.wait_params(b)  # a no-op once it has landed

            return hook

        for user, buckets in waits.items():
            user.register_forward_pre_hook(hook_for(buckets))


# --- the step's lifecycle, called in this order by training.train_step ---------------------------
def zero_grad_buffers(chunks: list[DistributedDataParallel]) -> None:
    """Before the step's first forward: every `main_grad` to zero."""
    for c in chunks:
        c.zero_grad_buffer()


def finish_param_gather(chunks: list[DistributedDataParallel]) -> None:
    """Land the previous step's parameter all-gathers still in flight (--overlap-param-gather)
    before the optimizer writes the parameters again, or anything reads them outside a forward."""
    for c in chunks:
        c.finish_param_sync()


def start_param_gather(chunks: list[DistributedDataParallel]) -> None:
    """After the distributed optimizer's step: every dp rank's updated shard to every rank."""
    for c in chunks:
        if c.use_distributed_optimizer:
            c.all_gather_params()


def wrap_model_chunks(
    cfg: Config | ParallelConfig, chunks: list[torch.nn.Module], ps: ParallelState
) -> list[DistributedDataParallel]:
    """One DDP wrapper per model chunk, configured from `cfg.parallel`."""
    return [DistributedDataParallel(c, cfg, ps) for c in chunks]
