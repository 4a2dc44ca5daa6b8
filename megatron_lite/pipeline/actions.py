"""Per-rank ordered action lists of every pipeline schedule: the one description both the executor
(`schedules.py`) runs and the simulator (`simulate.py`) replays, so what is simulated is what runs.

An action is a forward `F`, a backward `B` or a weight-gradient part `W` of one microbatch on one
model chunk. Outside the zero-bubble schedule `B` is the whole backward; in it, `B` computes only the
input gradient and `W` the weight gradient, which may wait (Qi et al. 2023, section 2).

Virtual stages: chunk `c` of pipeline rank `r` is virtual stage `c * p + r` (Megatron's interleaving),
so a forward goes r -> r + 1 within a chunk and from the last rank back to rank 0 for the next chunk.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

SCHEDULES = ("no-pipelining", "1f1b", "interleaved", "zero-bubble")


class Action(NamedTuple):
    kind: str  # "F", "B" or "W"
    microbatch: int
    chunk: int = 0

    def __repr__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def no_pipelining(m: int) -> list[Action]:
    """Gradient accumulation on one stage: forward and backward of each microbatch in turn."""
    return [a for i in range(m) for a in (Action("F", i), Action("B", i))]


def one_f_one_b(p: int, m: int, rank: int) -> list[Action]:
    """PipeDream-Flush (Narayanan et al. 2021, section 2.2): p - rank - 1 warm-up forwards, then one
    forward and one backward alternately, then the remaining backwards. At most p - rank microbatches
    are in flight on a rank."""
    warmup = min(p - rank - 1, m)
    out = [Action("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        out += [Action("F", warmup + i), Action("B", i)]
    return out + [Action("B", i) for i in range(m - warmup, m)]


def interleaved(p: int, m: int, v: int, rank: int) -> list[Action]:
    """Interleaved 1F1B (Narayanan et al. 2021, section 2.2): each rank holds v chunks; microbatches
    advance in groups of p through chunk 0, then chunk 1, ... Needs m % p == 0."""
    if m % p != 0:
        raise ValueError(
            f"the interleaved schedule needs the number of microbatches ({m}) to be divisible "
            f"by the pipeline-parallel size ({p})"
        )
    total = m * v

    def unit(k: int, backward: bool) -> tuple[int, int]:
        group, pos = divmod(k, p * v)
        chunk = pos // p
        return group * p + pos % p, (v - 1 - chunk) if backward else chunk

    def fwd(k: int) -> Action:
        return Action("F", *unit(k, False))

    def bwd(k: int) -> Action:
        return Action("B", *unit(k, True))

    warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    out = [fwd(k) for k in range(warmup)]
    for k in range(total - warmup):
        out += [fwd(warmup + k), bwd(k)]
    return out + [bwd(k) for k in range(total - warmup, total)]


def zero_bubble_h1(p: int, m: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al. 2023, section 3.1) for all ranks at once.

    Built by replaying the pipeline with unit costs for F, B and W: whenever a rank is free it runs
    the next F if its input has arrived and memory allows, else the next input-gradient B if its
    gradient has arrived, else the oldest pending W. Memory: at most p - rank microbatches between F
    and B (1F1B's bound) and at most p between F and W (1F1B's peak, that of rank 0), so no rank holds
    more than 1F1B's first stage. The W parts fill the bubbles, which shrink to
    (p - 1)(T_F + T_B - T_W): a third of 1F1B's when the three costs are equal (makespan 3m + p - 1
    for m >= p, the lower bound under that memory limit).
    """
    finish: dict[tuple[str, int, int], int] = {}  # (kind, microbatch, rank) -> finish time
    nxt = [{"F": 0, "B": 0, "W": 0} for _ in range(p)]
    order: list[list[Action]] = [[] for _ in range(p)]
    busy_until = [0] * p
    t = 0
    while any(n["W"] < m for n in nxt):
        for r in range(p):
            n = nxt[r]
            if busy_until[r] > t:
                continue
            arrived_f = r == 0 or finish.get(("F", n["F"], r - 1), t + 1) <= t
            arrived_b = r == p - 1 or finish.get(("B", n["B"], r + 1), t + 1) <= t
            if n["F"] < m and arrived_f and n["F"] - n["B"] < p - r and n["F"] - n["W"] < p:
                kind = "F"
            elif n["B"] < n["F"] and arrived_b:
                kind = "B"
            elif n["W"] < n["B"]:
                kind = "W"
            else:
                continue
            finish[(kind, n[kind], r)] = busy_until[r] = t + 1
            order[r].append(Action(kind, n[kind]))
            n[kind] += 1
        t += 1
    return order


@functools.lru_cache(maxsize=64)
def build_actions(schedule: str, p: int, m: int, v: int = 1) -> tuple[tuple[Action, ...], ...]:
    """Every rank's ordered actions for one training step: `result[rank]`."""
    if m < 1:
        raise ValueError(f"number of microbatches must be positive, got {m}")
    if schedule == "no-pipelining":
        if p != 1:
            raise ValueError(f"no-pipelining runs a single stage, got pipeline-parallel size {p}")
        ranks = [no_pipelining(m)]
    elif schedule == "1f1b":
        ranks = [one_f_one_b(p, m, r) for r in range(p)]
    elif schedule == "interleaved":
        ranks = [interleaved(p, m, v, r) for r in range(p)]
    elif schedule == "zero-bubble":
        ranks = zero_bubble_h1(p, m)
    else:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {SCHEDULES}")
    return tuple(tuple(r) for r in ranks)


def forward_only(actions: tuple[Action, ...]) -> tuple[Action, ...]:
    """Evaluation runs the forwards of the training order and nothing else."""
    return tuple(a for a in actions if a.kind == "F")


def num_chunks(schedule: str, v: int) -> int:
    return v if schedule == "interleaved" else 1
