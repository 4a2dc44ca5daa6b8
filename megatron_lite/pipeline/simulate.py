"""Pipeline schedule simulator: replays each rank's exact action list (`actions.build_actions`, the
lists the executor runs) with a cost per F, B and W, respecting the p2p dependencies.

    python -m megatron_lite.pipeline.simulate --pp 4 --microbatches 8 --schedule 1f1b
    python -m megatron_lite.pipeline.simulate --pp 4 --microbatches 8 --vpp 2 --png timeline.png

Costs: `f` per forward, `b` per input-gradient part, `w` per weight-gradient part. Schedules that do
not split the backward run it whole, costing `b + w`, so every schedule does the same work per step.
Bubble is reported both ways of DESIGN.md: idle time over ideal compute time, and over total time.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_lite.pipeline.actions import SCHEDULES, Action, build_actions, num_chunks
from megatron_lite.pipeline.comm_plan import build_plan, check_plan, virtual_stage


@dataclass
class Simulation:
    schedule: str
    p: int
    m: int
    v: int
    starts: list[list[float]]  # starts[rank][i]: start time of that rank's i-th action
    ends: list[list[float]]
    actions: tuple[tuple[Action, ...], ...]
    peak_activations: list[int]  # most microbatch-chunks between F and its last backward part

    @property
    def makespan(self) -> float:
        return max(e[-1] for e in self.ends if e)

    def busy(self, rank: int) -> float:
        return sum(e - s for s, e in zip(self.starts[rank], self.ends[rank]))

    def bubble(self, rank: int) -> float:
        return self.makespan - self.busy(rank)

    def bubble_over_ideal(self, rank: int) -> float:
        return self.bubble(rank) / self.busy(rank)

    def bubble_over_total(self, rank: int) -> float:
        return self.bubble(rank) / self.makespan


def simulate(
    schedule: str, p: int, m: int, v: int = 1, f: float = 1.0, b: float = 1.0, w: float = 1.0
) -> Simulation:
    """Earliest start of every action given its rank's order and its data dependencies."""
    actions = build_actions(schedule, p, m, v)
    nv = num_chunks(schedule, v)
    split = schedule == "zero-bubble"
    # costs are per stage; a chunk of an interleaved rank holds 1/v of its layers
    cost = {"F": f / nv, "B": (b if split else b + w) / nv, "W": w / nv}
    last = p * nv - 1
    finish: dict[tuple[str, int, int], float] = {}  # (kind, microbatch, virtual stage) -> end
    starts = [[] for _ in range(p)]
    ends = [[] for _ in range(p)]
    free, nxt = [0.0] * p, [0] * p
    while any(nxt[r] < len(actions[r]) for r in range(p)):
        progress = False
        for r in range(p):
            while nxt[r] < len(actions[r]):
                a = actions[r][nxt[r]]
                stage = virtual_stage(r, a.chunk, p)
                dep = {
                    "F": ("F", a.microbatch, stage - 1) if stage > 0 else None,
                    "B": ("B", a.microbatch, stage + 1)
                    if stage < last
                    else ("F", a.microbatch, stage),
                    "W": ("B", a.microbatch, stage),
                }[a.kind]
                if dep is not None and dep not in finish:
                    break
                start = max(free[r], finish[dep] if dep else 0.0)
                free[r] = finish[(a.kind, a.microbatch, stage)] = start + cost[a.kind]
                starts[r].append(start)
                ends[r].append(free[r])
                nxt[r] += 1
                progress = True
        if not progress:
            raise ValueError(f"schedule {schedule} p={p} m={m} v={v} cannot run: stuck at {nxt}")
    return Simulation(
        schedule, p, m, v, starts, ends, actions, [peak_in_flight(acts, split) for acts in actions]
    )


def peak_in_flight(
    actions: tuple[Action, ...], split: bool, chunk_weights: list[int] | None = None
) -> int:
    """A microbatch holds its activations from F until its last backward part (W, or B unsplit).

    Counts microbatch-chunks, or, with `chunk_weights`, the peak of their summed weights (bytes of
    one microbatch's activations on each chunk: the memory estimator's use)."""
    release = "W" if split else "B"
    n = peak = 0
    for a in actions:
        w = 1 if chunk_weights is None else chunk_weights[a.chunk]
        n += w * ((a.kind == "F") - (a.kind == release))
        peak = max(peak, n)
    return peak


def timeline_text(sim: Simulation, unit: float = 1.0) -> str:
    """One row per rank, two characters per `unit` of time: kind (lower case on odd chunks) and the
    microbatch in base 36; '..' is idle."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    width = int(round(sim.makespan / unit))
    rows = []
    for r in range(sim.p):
        cells = [".."] * width
        for a, s, e in zip(sim.actions[r], sim.starts[r], sim.ends[r]):
            kind = a.kind.lower() if a.chunk % 2 else a.kind
            for t in range(int(round(s / unit)), int(round(e / unit))):
                cells[t] = kind + digits[a.microbatch % 36]
        rows.append(f"rank {r:2d} |" + "".join(cells) + "|")
    return "\n".join(rows)


def draw_png(sim: Simulation, path: str) -> bool:
    """Draw the timeline with matplotlib; False when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {"F": "#4c72b0", "B": "#55a868", "W": "#c44e52"}
    fig, ax = plt.subplots(figsize=(max(6.0, sim.makespan * 0.25), 0.5 * sim.p + 1.2))
    for r in range(sim.p):
        for a, s, e in zip(sim.actions[r], sim.starts[r], sim.ends[r]):
            alpha = 1.0 if a.chunk % 2 == 0 else 0.6
            ax.broken_barh([(s, e - s)], (r - 0.4, 0.8), color=colors[a.kind], alpha=alpha)
            ax.text((s + e) / 2, r, str(a.microbatch), ha="center", va="center", fontsize=6)
    ax.set_yticks(range(sim.p), [f"rank {r}" for r in range(sim.p)])
    ax.invert_yaxis()
    ax.set_xlabel("time")
    ax.set_title(f"{sim.schedule}: p={sim.p} m={sim.m} v={sim.v}, makespan {sim.makespan:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(sim: Simulation) -> str:
    lines = [
        f"schedule {sim.schedule}  p={sim.p}  m={sim.m}  v={sim.v}  makespan {sim.makespan:g}",
        "rank  busy  bubble  bubble/ideal  bubble/total  peak in-flight",
    ]
    for r in range(sim.p):
        lines.append(
            f"{r:4d}  {sim.busy(r):4g}  {sim.bubble(r):6g}  {sim.bubble_over_ideal(r):12.4f}  "
            f"{sim.bubble_over_total(r):12.4f}  {sim.peak_activations[r]:14d}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pp", type=int, default=4, help="pipeline stages p")
    ap.add_argument("--microbatches", type=int, default=8, help="microbatches per step m")
    ap.add_argument("--vpp", type=int, default=1, help="virtual chunks per rank v (interleaved)")
    ap.add_argument("--schedule", choices=SCHEDULES, default=None, help="default: from --vpp")
    ap.add_argument("--f", type=float, default=1.0, help="cost of a forward")
    ap.add_argument("--b", type=float, default=1.0, help="cost of an input-gradient backward")
    ap.add_argument("--w", type=float, default=1.0, help="cost of a weight-gradient backward")
    ap.add_argument("--no-text", action="store_true", help="skip the text timeline")
    ap.add_argument("--png", default=None, help="also draw the timeline into this PNG file")
    args = ap.parse_args(argv)
    schedule = args.schedule or ("interleaved" if args.vpp > 1 else "1f1b")
    if args.pp == 1:
        schedule = "no-pipelining"
    vpp = args.vpp if schedule == "interleaved" else 1
    sim = simulate(schedule, args.pp, args.microbatches, vpp, args.f, args.b, args.w)
    check_plan(build_plan(schedule, args.pp, args.microbatches, vpp))
    print(report(sim))
    if not args.no_text:
        unit = min(c for c in (args.f, args.b, args.w) if c > 0) / sim.v
        print(timeline_text(sim, unit))
    if args.png:
        print(f"timeline: {args.png}" if draw_png(sim, args.png) else "matplotlib not importable")


if __name__ == "__main__":
    main()
