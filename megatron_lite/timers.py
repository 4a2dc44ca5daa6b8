"""Megatron's per-region timers (--timing-log-level, --timing-log-option), reported across ranks.

    with timers("forward-backward", 1):   # timed when --timing-log-level >= 1, else a no-op
        ...

Every rank keeps the same fixed list of region names (`REGIONS`), so gathering them is one collective
of one shape whatever a rank timed; a region a rank never entered is left out of its min/max.
Times are averaged per iteration over the log interval, in ms, as Megatron prints them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megatron_lite import comm, device

# region -> the lowest --timing-log-level that times it
REGIONS = {
    "forward-backward": 1,  # the pipeline schedule: every microbatch's forward and backward
    "all-grads-sync": 1,  # finalize_model_grads: dp reduction, sequence-parallel and embedding sums
    "params-all-gather": 1,  # ZeRO-1: landing the last step's parameter all-gathers, starting the next
    "optimizer": 1,  # the optimizer step (unscale, clip, update)
    "batch-generator": 2,  # reading a microbatch from the data loader
    "pipeline-p2p": 2,  # waiting on pipeline sends and receives
}


class Timers:
    def __init__(self, level: int = 0, option: str = "minmax", dev: torch.device | None = None):
        self.level, self.option, self.device = level, option, dev or torch.device("cpu")
        self._reset()

    def _reset(self) -> None:
        self.elapsed = dict.fromkeys(REGIONS, 0.0)
        self.entered = dict.fromkeys(REGIONS, False)  # 0 s timed and never entered differ

    @contextlib.contextmanager
    def __call__(self, name: str, level: int) -> Iterator[None]:
        if level > self.level:
            yield
            return
        device.synchronize(self.device)  # time the device's work, not just its launch
        t0 = time.perf_counter()
        try:
            yield
        finally:
            device.synchronize(self.device)
            self.elapsed[name] += time.perf_counter() - t0
            self.entered[name] = True

    def gather(self, iterations: int) -> dict[str, list[float]] | None:
        """Collective over the world: region -> ms per iteration on each rank that timed it (None
        when timing is off). Resets the timers."""
        if self.level == 0:
            return None
        names = [n for n, lvl in REGIONS.items() if lvl <= self.level]
        mine = [1000 * self.elapsed[n] / iterations if self.entered[n] else -1.0 for n in names]
        local = torch.tensor(
            mine, dtype=torch.float64, device=device.comm_device(dist.get_backend())
        )
        world = comm.group_size(dist.group.WORLD)
        rows = [torch.empty_like(local) for _ in range(world)]
        comm.all_gather_list(rows, local, dist.group.WORLD)
        self._reset()
        table = torch.stack(rows).cpu()
        return {n: [v for v in table[:, i].tolist() if v >= 0] for i, n in enumerate(names)}

    def format(self, times: dict[str, list[float]]) -> str:
        """Megatron's layout: a heading, then one dotted line per region."""
        head = {"max": "max time", "minmax": "(min, max) time", "all": "times"}[self.option]
        lines = [f"{head} across ranks (ms):"]
        for name, values in times.items():
            if not values:
                continue
            if self.option == "max":
                shown = f"{max(values):.2f}"
            elif self.option == "minmax":
                shown = f"({min(values):.2f}, {max(values):.2f})"
            else:
                shown = ", ".join(f"{v:.2f}" for v in values)
            lines.append(f"    {name} {'.' * max(1, 48 - len(name))}: {shown}")
        return "\n".join(lines)


NO_TIMERS = Timers()  # level 0: every region a no-op, nothing recorded (the default everywhere)
