"""Faults injected on purpose, for the tests that prove a failing rank or a nan loss is handled.

Read once from the environment when the run is set up (MEGATRON_LITE_FAULT=raise:RANK:ITER makes that
rank raise at that iteration; nan:ITER makes that iteration's loss nan on every rank) and handed to
the step as an object, so the hot path asks a plain question instead of parsing the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

FAULT_ENV = "MEGATRON_LITE_FAULT"


@dataclass(frozen=True)
class FaultInjector:
    """No fault unless `kind` is 'raise' (on `rank` at `iteration`) or 'nan' (at `iteration`)."""

    kind: str | None = None
    rank: int = -1
    iteration: int = -1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> FaultInjector:
        spec = env.get(FAULT_ENV, "")
        if not spec:
            return cls()
        parts = spec.split(":")
        try:
            if parts[0] == "raise" and len(parts) == 3:
                return cls("raise", int(parts[1]), int(parts[2]))
            if parts[0] == "nan" and len(parts) == 2:
                return cls("nan", iteration=int(parts[1]))
        except ValueError:
            pass
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected raise:RANK:ITER or nan:ITER")

    def raise_if_due(self, iteration: int, rank: int) -> None:
        if self.kind == "raise" and (self.rank, self.iteration) == (rank, iteration):
            raise RuntimeError(f"injected fault on rank {rank} ({FAULT_ENV})")

    def nan_loss_at(self, iteration: int) -> bool:
        return self.kind == "nan" and self.iteration == iteration
