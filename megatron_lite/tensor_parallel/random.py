"""Random streams for tensor-parallel regions, and activation recomputation that replays them.

Dropout inside a tensor-parallel region (attention probabilities of this rank's heads, or activations
sharded over the sequence) must differ between tp ranks; dropout on replicated activations must agree.
The default torch generator (seeded the same on every tp rank) serves replicated regions; the tracker
holds a second stream seeded per tp rank, swapped in with `get_rng_tracker().fork()` (Megatron's
CudaRNGStatesTracker, but for CPU and CUDA alike: the device helper saves/restores both).

`checkpoint(fn, *args)` recomputes `fn` in backward from saved RNG states (default generator and every
tracker stream), so the recomputed dropout masks equal the original ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint

from megatron_lite import device

MODEL_PARALLEL_RNG = "model-parallel-rng"


class RNGStatesTracker:
    """Named RNG streams; `fork(name)` runs a block on that stream and saves where it got to."""

    def __init__(self) -> None:
        self._states: dict[str, dict] = {}

    def reset(self) -> None:
        self._states = {}

    def is_initialized(self) -> bool:
        return bool(self._states)

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        saved = device.rng_state()
        torch.manual_seed(seed)
        self._states[name] = device.rng_state()
        device.set_rng_state(saved)

    def get_states(self) -> dict[str, dict]:
        """A copy of every stream's state (for checkpoints)."""
        return {k: {d: t.clone() for d, t in v.items()} for k, v in self._states.items()}

    def set_states(self, states: dict[str, dict]) -> None:
        self._states = {k: {d: t.clone() for d, t in v.items()} for k, v in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self._states:
            # not seeded (single-process use without set_random_seed): the default stream serves
            yield
            return
        saved = device.rng_state()
        device.set_rng_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = device.rng_state()
            device.set_rng_state(saved)


# One per process, beside torch's default generator whose companion it is (that one is process
# state too): the layers fork it inside their forward, checkpoints save and restore it.
_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    return _TRACKER


def set_random_seed(seed: int, tp_rank: int = 0, pp_rank: int = 0) -> None:
    """Seed as Megatron: default stream `seed + 100 * pp_rank` (same on every tp rank), tensor-parallel
    stream `seed + 2718 + tp_rank` on top of that (different per tp rank)."""
    base = seed + 100 * pp_rank
    torch.manual_seed(base)
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, base + 2718 + tp_rank)


def get_rng_states() -> dict[str, Any]:
    """Every RNG state of this process (default generators + tracker streams), for checkpoints."""
    return {"default": device.rng_state(), "tracker": _TRACKER.get_states()}


def set_rng_states(states: dict[str, Any]) -> None:
    device.set_rng_state(states["default"])
    _TRACKER.set_states(states["tracker"])


_recomputing = 0  # > 0 while a checkpointed forward runs again inside backward


def is_recomputing() -> bool:
    """Whether this forward is a recomputation (what it records, e.g. MoE aux losses, it did once)."""
    return _recomputing > 0


class _ReplayTrackerStates:
    """Recompute contexts: capture the tracker streams at forward, replay them during recomputation."""

    def __init__(self) -> None:
        self.states: dict[str, dict] | None = None

    def forward_ctx(self) -> contextlib.AbstractContextManager:
        self.states = _TRACKER.get_states()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def recompute_ctx(self) -> Iterator[None]:
        global _recomputing
        current = _TRACKER.get_states()
        _TRACKER.set_states(self.states)
        _recomputing += 1
        try:
            yield
        finally:
            _recomputing -= 1
            _TRACKER.set_states(current)


def checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` without keeping its activations; recompute them in backward with the same
    RNG states (default generator via torch's preserve_rng_state, tracker streams via the context)."""

    def contexts():
        replay = _ReplayTrackerStates()
        return replay.forward_ctx(), replay.recompute_ctx()

    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts
    )
