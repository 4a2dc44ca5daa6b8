"""Pipeline bubble and activation figures from the schedule simulator (unit costs F = B = W = 1; an
unsplit backward costs B + W), for p = 4 and m = 8, 16, 32. Both bubble measures of DESIGN.md:
bubble / ideal compute and bubble / total time, next to the formulas.

    python bench/bench_pipeline.py
"""

from __future__ import annotations

from megatron_lite.pipeline.simulate import simulate

P, V = 4, 2


def row(name: str, sim, formula_ideal: float, formula_total: float) -> str:
    ideal = max(sim.bubble_over_ideal(r) for r in range(sim.p))
    total = max(sim.bubble_over_total(r) for r in range(sim.p))
    peaks = ",".join(str(x) for x in sim.peak_activations)
    return (
        f"{name:<16}{sim.m:>4}  {ideal:>8.4f} ({formula_ideal:.4f})  {total:>8.4f} "
        f"({formula_total:.4f})  {sim.makespan:>8g}  [{peaks}]"
    )


def main() -> None:
    print(f"p={P}, unit costs; formulas in parentheses; peak in-flight per rank in brackets")
    print("schedule           m  bubble/ideal          bubble/total          makespan  peak")
    for m in (8, 16, 32):
        one = simulate("1f1b", P, m)
        inter = simulate("interleaved", P, m, V)
        zb = simulate("zero-bubble", P, m)
        one_ideal = (P - 1) / m
        print(row("1f1b", one, one_ideal, (P - 1) / (m + P - 1)))
        print(row(f"interleaved v={V}", inter, one_ideal / V, (P - 1) / (V * m + P - 1)))
        # ZB-H1: (p - 1)(T_F + T_B - T_W) idle per rank
        print(row("zero-bubble H1", zb, (P - 1) / (3 * m), (P - 1) / (3 * m + P - 1)))
        ratio = zb.bubble_over_ideal(0) / one.bubble_over_ideal(0)
        print(
            f"{'':16}      ZB-H1 / 1F1B bubble = {ratio:.4f}; interleaved counts chunk "
            f"activations (1/{V} of a stage each)"
        )


if __name__ == "__main__":
    main()
