"""Pipeline schedules without processes: action lists, comm plans and the simulator's figures against
the bubble formulas of DESIGN.md ("Pipeline bubble, stated precisely")."""

from collections import Counter
from fractions import Fraction

import pytest
from factory import make_config

from megatron_lite.config import Config, ConfigError, ModelConfig, ParallelConfig
from megatron_lite.pipeline.actions import build_actions
from megatron_lite.pipeline.comm_plan import Message, build_plan, check_plan
from megatron_lite.pipeline.schedules import schedule_name
from megatron_lite.pipeline.simulate import main, simulate

P = 4


def frac(x: float) -> Fraction:
    return Fraction(x).limit_denominator(10_000)


@pytest.mark.parametrize("m", [8, 16, 32])
def test_simulated_bubbles_equal_the_formulas(m):
    p, v = P, 2
    one = simulate("1f1b", p, m)
    inter = simulate("interleaved", p, m, v)
    zb = simulate("zero-bubble", p, m)
    for r in range(p):
        assert frac(one.bubble_over_total(r)) == Fraction(p - 1, m + p - 1)
        assert frac(one.bubble_over_ideal(r)) == Fraction(p - 1, m)
        assert frac(inter.bubble_over_ideal(r)) == Fraction(p - 1, v * m)  # exactly 1/v of 1F1B's
        assert frac(inter.bubble_over_total(r)) == Fraction(p - 1, v * m + p - 1)
        # the "at most 1F1B's / v" holds over ideal compute; over total time it is a little
        # more than 1F1B's / v (DESIGN.md), still well under 1F1B's
        assert inter.bubble_over_ideal(r) <= one.bubble_over_ideal(r) / v + 1e-12
        assert one.bubble_over_total(r) / v < inter.bubble_over_total(r) < one.bubble_over_total(r)
        # ZB-H1 with equal F, B, W costs: (p - 1)(T_F + T_B - T_W), a third of 1F1B's
        assert frac(zb.bubble(r)) == p - 1
        assert frac(zb.bubble_over_ideal(r)) == frac(one.bubble_over_ideal(r)) / 3
    assert one.makespan == 3 * (m + p - 1) and zb.makespan == 3 * m + p - 1


def test_peak_in_flight_activations():
    for m in (2, 8, 32):
        one = simulate("1f1b", P, m)
        assert one.peak_activations == [min(P - r, m) for r in range(P)]
        assert max(simulate("zero-bubble", P, m).peak_activations) <= P  # 1F1B's rank-0 peak
    assert simulate("no-pipelining", 1, 8).peak_activations == [1]
    # interleaved counts chunk activations (each 1/v of a stage): Megatron's warm-up bound
    inter = simulate("interleaved", P, 8, 2)
    assert inter.peak_activations[0] == 2 * (P - 1) + P + 1


@pytest.mark.parametrize(
    "schedule,v", [("1f1b", 1), ("interleaved", 2), ("interleaved", 3), ("zero-bubble", 1)]
)
def test_every_rank_runs_each_part_once_and_plans_never_deadlock(schedule, v):
    for p in (2, 3, 4, 8):
        for m in (1, 2, 3, 4, 8, 16):
            if schedule == "interleaved" and m % p:
                continue
            acts = build_actions(schedule, p, m, v)
            kinds = "FBW" if schedule == "zero-bubble" else "FB"
            for rank_actions in acts:
                assert Counter(rank_actions) == Counter(
                    (k, i, c) for k in kinds for i in range(m) for c in range(v)
                )
            for fwd_only in (False, True):
                check_plan(build_plan(schedule, p, m, v, fwd_only))  # raises on deadlock/mismatch


def test_check_plan_catches_a_deadlock_and_a_mismatch():
    act = Message("act", 0, 0)
    crossed = (
        ((("send", 1, act),), (("recv", 1, Message("grad", 0, 1)),), ()),
        (
            (("send", 0, Message("grad", 0, 1)),),
            (("recv", 0, act),),
            (),
        ),
    )
    with pytest.raises(ValueError, match="deadlock"):  # both send first, receive later
        check_plan(_ops(crossed))
    wrong = (((("send", 1, act),),), ((("recv", 0, Message("act", 1, 0)),),))
    with pytest.raises(ValueError, match="sends .* but receives"):
        check_plan(_ops(wrong))


def _ops(plan):
    from megatron_lite.pipeline.comm_plan import CommOp

    return tuple(tuple(tuple(CommOp(*o) for o in point) for point in rank) for rank in plan)


def test_one_f_one_b_order_is_pipedream_flush():
    acts = build_actions("1f1b", 4, 6)
    assert [repr(a) for a in acts[0]][:6] == ["F0", "F1", "F2", "F3", "B0", "F4"]
    assert [repr(a) for a in acts[3]][:4] == ["F0", "B0", "F1", "B1"]


def test_schedule_choice_and_uneven_layers_rejected():
    def cfg(**par):
        return make_config(num_layers=8, **par)

    assert schedule_name(cfg(), 1) == "no-pipelining"
    assert schedule_name(cfg(pipeline_model_parallel_size=2), 2) == "1f1b"
    assert (
        schedule_name(
            cfg(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2), 2
        )
        == "interleaved"
    )
    assert (
        schedule_name(cfg(pipeline_model_parallel_size=2, pipeline_schedule="zero-bubble"), 2)
        == "zero-bubble"
    )
    with pytest.raises(ConfigError, match=r"--num-layers \(6\) must be divisible by .* \(4\)"):
        Config(
            model=ModelConfig(num_layers=6), parallel=ParallelConfig(pipeline_model_parallel_size=4)
        )
    with pytest.raises(ValueError, match=r"microbatches \(6\) to be divisible .* \(4\)"):
        build_actions("interleaved", 4, 6, 2)


def test_simulator_cli_prints_report_timeline_and_png(tmp_path, capsys):
    png = tmp_path / "zb.png"
    main(["--pp", "4", "--microbatches", "8", "--schedule", "zero-bubble", "--png", str(png)])
    out = capsys.readouterr().out
    assert "makespan 27" in out and "bubble/ideal" in out and "bubble/total" in out
    assert "rank  0 |F0F1F2F3......B0W0F4" in out
    assert png.stat().st_size > 1000
