"""Deferred weight gradients for zero-bubble pipeline schedules (Qi et al., 2023, "Zero Bubble
Pipeline Parallelism", section 2: split backward into B = input gradient and W = weight gradient).

    with WeightGradStore.defer():
        torch.autograd.backward(output, grad)   # B: linears compute only their input gradients
    ...                                          # send the input gradient on, run other microbatches
    WeightGradStore.pop()                        # W: the oldest deferred microbatch's weight gradients

Each queued closure applies its gradients with `torch.autograd.backward([param], [grad])`, so they go
through normal gradient accumulation and fire the parameters' post-accumulate-grad hooks (DDP's buckets).
State is per process, like autograd's own: one backward runs at a time.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator

import torch


class WeightGradStore:
    """Queue of weight-gradient closures, one list per deferred microbatch backward."""

    _deferring: bool = False
    _current: list[Callable[[], None]] | None = None
    _queue: deque[list[Callable[[], None]]] = deque()

    @classmethod
    @contextlib.contextmanager
    def defer(cls) -> Iterator[None]:
        """Backward passes run inside this block queue their weight gradients as one microbatch."""
        if cls._deferring:
            raise RuntimeError("WeightGradStore.defer() blocks cannot be nested")
        cls._deferring, cls._current = True, []
        try:
            yield
        finally:
            cls._queue.append(cls._current)
            cls._deferring, cls._current = False, None

    @classmethod
    def is_deferring(cls) -> bool:
        return cls._deferring

    @classmethod
    def put(cls, compute: Callable[[], None]) -> None:
        """Queue `compute` (called by the linears' backward while deferring)."""
        assert cls._current is not None, "WeightGradStore.put outside defer()"
        cls._current.append(compute)

    @classmethod
    def pop(cls) -> None:
        """Compute and apply the weight gradients of the oldest deferred microbatch."""
        if not cls._queue:
            raise RuntimeError("WeightGradStore.pop(): no deferred microbatch is queued")
        for compute in cls._queue.popleft():
            compute()

    @classmethod
    def pop_all(cls) -> None:
        while cls._queue:
            cls.pop()

    @classmethod
    def num_pending(cls) -> int:
        """Deferred microbatches not yet popped."""
        return len(cls._queue)

    @classmethod
    def clear(cls) -> None:
        """Drop every queued closure (after an aborted step)."""
        cls._queue.clear()


def apply_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    """Accumulate `grads` into `params` through autograd, so post-accumulate-grad hooks fire."""
    pairs = [(p, g) for p, g in zip(params, grads) if p is not None and g is not None]
    if pairs:
        torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
