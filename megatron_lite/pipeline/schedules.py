"""Pipeline schedules: one executor runs any schedule's action list (`actions.py`) with the comm plan
derived from it (`comm_plan.py`), so the simulator replays exactly what runs here.

    forward_backward = get_forward_backward_func(cfg, ps)
    losses = forward_backward(forward_step_func, data_iterator, model_chunks, num_microbatches,
                              seq_length, micro_batch_size, forward_only=False)

Megatron's contract: `forward_step_func(data_iterator, model) -> (output_tensor, loss_func)` and
`loss_func(output_tensor) -> (loss, reported_dict)`. The loss is divided by `num_microbatches` here;
the result holds each microbatch's reported dict on the last stage and is empty elsewhere.

Gradient sync: a chunk with a `no_sync()` context manager (our DDP) runs every backward part under it
except the chunk's last one, so data-parallel reduction starts once per step. Under zero-bubble that
last part is the final W; parameters whose gradients B computes (not deferred) accumulated under
`no_sync`, so DDP's `finish_grad_sync()` must reduce every bucket not yet reduced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megatron_lite import device
from megatron_lite.pipeline import p2p
from megatron_lite.pipeline.abort import (
    WATCHDOG,
    AbortWatchdog,
    PipelineAborted,
    abort_groups,
    abort_message,
    signal_abort,
)
from megatron_lite.pipeline.actions import Action, build_actions, forward_only, num_chunks
from megatron_lite.pipeline.comm_plan import Message, build_plan, virtual_stage
from megatron_lite.tensor_parallel.weight_grad_store import WeightGradStore
from megatron_lite.timers import NO_TIMERS, Timers

if TYPE_CHECKING:
    from megatron_lite.config import Config
    from megatron_lite.parallel_state import ParallelState


def schedule_name(cfg: Config, pp_size: int) -> str:
    """The schedule a configuration runs: no pipelining, 1F1B, interleaved 1F1B or zero-bubble."""
    if pp_size == 1:
        return "no-pipelining"
    vpp = cfg.virtual_pipeline_size
    if vpp is not None and vpp > 1:
        return "interleaved"
    return "zero-bubble" if cfg.parallel.pipeline_schedule == "zero-bubble" else "1f1b"


def pipeline_dtype(cfg: Config) -> torch.dtype:
    return device.params_dtype(cfg.optim)


def get_forward_backward_func(cfg: Config, ps: ParallelState) -> Callable[..., list[dict]]:
    """The schedule for this configuration and rank, with Megatron's call signature."""
    name = schedule_name(cfg, ps.pp_size)
    v = num_chunks(name, cfg.virtual_pipeline_size or 1)
    tp = cfg.parallel.tensor_model_parallel_size
    sp = cfg.parallel.sequence_parallel

    def forward_backward(
        forward_step_func: Callable,
        data_iterator: Iterator | list[Iterator],
        model: torch.nn.Module | list[torch.nn.Module],
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
        forward_only: bool = False,
        *,
        variable_seq_lengths: bool = False,
        grad_scale_func: Callable[[torch.Tensor], torch.Tensor] | None = None,
        weight_grad_store: WeightGradStore | None = None,
        timers: Timers | None = None,
    ) -> list[dict]:
        shape = (
            None
            if variable_seq_lengths
            else (seq_length // tp if sp else seq_length, micro_batch_size, cfg.model.hidden_size)
        )
        store = None
        if name == "zero-bubble" and not forward_only:
            store = weight_grad_store if weight_grad_store is not None else WeightGradStore()
        run = _Executor(
            name,
            ps,
            v,
            _as_list(model, v, "model chunks"),
            num_microbatches,
            forward_only,
            forward_step_func=forward_step_func,
            iterators=_as_list(data_iterator, v, "data iterators"),
            transfer=Transfer(shape, pipeline_dtype(cfg)),
            grad_scale_func=grad_scale_func,
            store=store,
            timers=timers or NO_TIMERS,
        )
        return run()

    forward_backward.schedule = name  # type: ignore[attr-defined]
    return forward_backward


def _as_list(x: Any, v: int, what: str) -> list:
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(xs) == 1 and v > 1 and what == "data iterators":
        raise ValueError(f"the interleaved schedule needs one data iterator per chunk ({v})")
    if len(xs) != v:
        raise ValueError(f"expected {v} {what} on this pipeline rank, got {len(xs)}")
    return xs


@dataclass(frozen=True)
class Transfer:
    """What travels between stages: activations (and their gradients) of `shape` ([s, b, h], or
    None to send shapes first) in `dtype`."""

    shape: tuple[int, ...] | None
    dtype: torch.dtype


class _Executor:
    """Runs one rank's action list for one step; comm points sit between consecutive actions."""

    def __init__(
        self,
        name: str,
        ps: ParallelState,
        v: int,
        chunks: list[torch.nn.Module],
        m: int,
        fwd_only: bool,
        *,
        forward_step_func: Callable,
        iterators: list[Iterator],
        transfer: Transfer,
        grad_scale_func: Callable[[torch.Tensor], torch.Tensor] | None = None,
        store: WeightGradStore | None = None,
        watchdog: AbortWatchdog = WATCHDOG,
        timers: Timers = NO_TIMERS,
    ):
        self.ps, self.p, self.v, self.chunks, self.m = ps, ps.pp_size, v, chunks, m
        self.forward_step_func, self.iterators = forward_step_func, iterators
        self.shape, self.dtype = transfer.shape, transfer.dtype
        self.grad_scale_func, self.store, self.watchdog = grad_scale_func, store, watchdog
        self.timers = timers
        self.rank = ps.pp_rank
        acts = build_actions(name, self.p, m, v)[self.rank]
        self.actions: tuple[Action, ...] = forward_only(acts) if fwd_only else acts
        self.plan = build_plan(name, self.p, m, v, fwd_only)[self.rank]
        self.fwd_only, self.split = fwd_only, name == "zero-bubble"
        self.last_stage = self.p * v - 1
        self.device = next(chunks[0].parameters()).device
        self.received: dict[Message, torch.Tensor] = {}
        self.to_send: dict[Message, torch.Tensor] = {}
        self.saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.reports: list[dict] = []
        # data-parallel sync only in each chunk's last gradient-producing action
        self.sync_at = {a.chunk: k for k, a in enumerate(self.actions) if a.kind != "F"}

    def __call__(self) -> list[dict]:
        action: Action | None = None
        groups = [self.ps.pp_group, self.ps.dp_group, self.ps.tp_group, self.ps.mp_group]
        groups.append(self.ps.embedding_group)
        self.watchdog.watch(groups)
        comm = False  # whether the exception came out of a transfer (then a peer failed)
        try:
            for k, action in enumerate(self.actions):
                comm = True
                self._communicate(self.plan[k])
                comm = False
                self._run(k, action)
            comm = True
            self._communicate(self.plan[-1])
        except PipelineAborted:
            raise
        except BaseException as e:
            first = abort_message()
            if first is None and not comm:  # this rank failed first: tell everyone
                signal_abort(
                    f"pipeline rank {self.rank} (global rank {self.ps.rank}) failed in "
                    f"{action!r}: {type(e).__name__}: {e}"
                )
            abort_groups(groups)
            if first is not None or comm:
                raise PipelineAborted(first or f"a peer pipeline rank failed: {e}") from e
            raise
        return self.reports

    def _communicate(self, ops) -> None:
        if not ops:
            return
        sends = [(self.to_send.pop(o.msg), self.ps.pp_ranks[o.peer]) for o in ops if o.op == "send"]
        recvs = [o for o in ops if o.op == "recv"]
        with self.timers("pipeline-p2p", 2), self.watchdog.blocked():
            got = p2p.communicate(
                sends,
                [self.ps.pp_ranks[o.peer] for o in recvs],
                shape=self.shape,
                dtype=self.dtype,
                device=self.device,
                group=self.ps.pp_group,
            )
        self.received.update((o.msg, t) for o, t in zip(recvs, got))

    def _run(self, k: int, a: Action) -> None:
        stage = virtual_stage(self.rank, a.chunk, self.p)
        if a.kind == "F":
            with torch.no_grad() if self.fwd_only else contextlib.nullcontext():
                self._forward(a, stage)
            return
        with contextlib.ExitStack() as stack:
            no_sync = getattr(self.chunks[a.chunk], "no_sync", None)
            if no_sync is not None and k != self.sync_at[a.chunk]:
                stack.enter_context(no_sync())
            if a.kind == "B":
                self._backward(a, stage, stack)
            else:
                self.store.pop()

    def _forward(self, a: Action, stage: int) -> None:
        inp = None
        if stage > 0:
            inp = self.received.pop(Message("act", a.microbatch, stage - 1))
            inp.requires_grad_(not self.fwd_only)
        chunk = self.chunks[a.chunk]
        if hasattr(chunk, "set_input_tensor"):
            chunk.set_input_tensor(inp)
        out, loss_func = self.forward_step_func(self.iterators[a.chunk], chunk)
        if stage == self.last_stage:
            loss, reported = loss_func(out)
            self.reports.append(reported)
            out = loss / self.m
        else:
            self._check_output(out, stage)
            self.to_send[Message("act", a.microbatch, stage)] = out.detach()
        if not self.fwd_only:
            self.saved[(a.microbatch, a.chunk)] = (inp, out)

    def _backward(self, a: Action, stage: int, stack: contextlib.ExitStack) -> None:
        inp, out = self.saved.pop((a.microbatch, a.chunk))
        grad = None
        if stage < self.last_stage:
            grad = self.received.pop(Message("grad", a.microbatch, stage + 1))
        elif self.grad_scale_func is not None:
            out = self.grad_scale_func(out)
        if self.split:
            stack.enter_context(self.store.defer())
        torch.autograd.backward(out, grad_tensors=grad)
        if stage > 0:
            self.to_send[Message("grad", a.microbatch, stage)] = inp.grad

    def _check_output(self, out: torch.Tensor, stage: int) -> None:
        if out.dtype != self.dtype:
            raise TypeError(
                f"virtual stage {stage} produced {out.dtype} activations but the pipeline sends "
                f"{self.dtype} (from --bf16/--fp16); make the model's output match"
            )
        if self.shape is not None and tuple(out.shape) != tuple(self.shape):
            raise ValueError(
                f"virtual stage {stage} produced an activation of shape {tuple(out.shape)}, "
                f"expected {tuple(self.shape)} ([seq, micro batch, hidden]); pass "
                "variable_seq_lengths=True to send shapes first"
            )
