"""Deferred weight gradients for zero-bubble pipeline schedules (Qi et al., 2023, "Zero Bubble
Pipeline Parallelism", section 2: split backward into B = input gradient and W = weight gradient).

    store = WeightGradStore()                   # one per step (the schedule makes it)
    with store.defer():
        torch.autograd.backward(output, grad)   # B: linears compute only their input gradients
    ...                                          # send the input gradient on, run other microbatches
    store.pop()                                 # W: the oldest deferred microbatch's weight gradients

Each queued closure applies its gradients with `torch.autograd.backward([param], [grad])`, so they go
through normal gradient accumulation and fire the parameters' post-accumulate-grad hooks (DDP's buckets).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import deque
from collections.abc import Callable, Iterator

import torch


class WeightGradStore:
    """Queue of weight-gradient closures, one list per deferred microbatch backward."""

    def __init__(self) -> None:
        _live_stores.add(self)
        self._current: list[Callable[[], None]] | None = None
        self._queue: deque[list[Callable[[], None]]] = deque()

    @contextlib.contextmanager
    def defer(self) -> Iterator[None]:
        """Backward passes run inside this block queue their weight gradients as one microbatch."""
        global _deferring
        if _deferring is not None:
            raise RuntimeError("WeightGradStore.defer() blocks cannot be nested")
        _deferring, self._current = self, []
        try:
            yield
        finally:
            self._queue.append(self._current)
            _deferring, self._current = None, None

    def put(self, compute: Callable[[], None]) -> None:
        """Queue `compute` (called by the linears' backward while deferring)."""
        assert self._current is not None, "WeightGradStore.put outside defer()"
        self._current.append(compute)

    def pop(self) -> None:
        """Compute and apply the weight gradients of the oldest deferred microbatch."""
        if not self._queue:
            raise RuntimeError("WeightGradStore.pop(): no deferred microbatch is queued")
        for compute in self._queue.popleft():
            compute()

    def pop_all(self) -> None:
        while self._queue:
            self.pop()

    def num_pending(self) -> int:
        """Deferred microbatches not yet popped."""
        return len(self._queue)

    def clear(self) -> None:
        """Drop every queued closure (after an aborted step)."""
        self._queue.clear()


# Every store alive: while there is none, no backward can defer, so the linears take the plain
# `F.linear` path (no custom autograd function, no nested backward per weight: ~free when off).
_live_stores: weakref.WeakSet[WeightGradStore] = weakref.WeakSet()


def any_store_alive() -> bool:
    """Whether some WeightGradStore exists (a zero-bubble step, or a test driving one)."""
    return len(_live_stores) > 0


# The store inside `defer()`, if any: the linears' backward, which autograd may run on its own
# threads where no caller's context reaches, finds it here (one backward runs at a time).
_deferring: WeightGradStore | None = None


def deferring_store() -> WeightGradStore | None:
    """The store whose `defer()` block is running (the linears queue their weight gradients in it)."""
    return _deferring


def apply_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Accumulate `grads` into `params` through autograd, so post-accumulate-grad hooks fire."""
    pairs = [(p, g) for p, g in zip(params, grads) if p is not None and g is not None]
    if pairs:
        torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
