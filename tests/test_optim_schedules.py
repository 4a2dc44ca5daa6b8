"""LR schedules match their formulas, the batch-size ramp-up is exact, the loss scaler follows
Megatron's rules; all single-process."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lite.config import (
    Config,
    ConfigError,
    OptimConfig,
    TrainConfig,
    train_iters_for_samples,
)
from megatron_lite.optim import (
    DynamicGradScaler,
    NumMicroBatchesCalculator,
    OptimizerParamScheduler,
    build_lr_scheduler,
    build_num_microbatches_calculator,
)
from megatron_lite.optim.optimizer import restore_param_groups

MAX, MIN, WARM, DECAY = 1.0e-3, 1.0e-5, 10, 110


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)


def _lr_at(style: str, steps: list[int], warm=WARM) -> list[float]:
    sched = OptimizerParamScheduler(_opt(), MAX, MIN, warm, DECAY, style)
    out, done = [], 0
    for n in steps:
        sched.step(n - done)
        done = n
        out.append(sched.optimizer.param_groups[0]["lr"])
    return out


STEPS = [0, 5, 10, 35, 60, 100, 110, 200]


def _expected(style: str, n: int) -> float:
    if n <= WARM:
        return MAX * n / WARM
    if style == "constant":
        return MAX
    if style == "inverse-square-root":
        return max(MIN, MAX * math.sqrt(WARM) / math.sqrt(n))
    if n > DECAY:
        return MIN
    r = (n - WARM) / (DECAY - WARM)
    coeff = 1 - r if style == "linear" else 0.5 * (1 + math.cos(math.pi * r))
    return MIN + coeff * (MAX - MIN)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root"])
def test_each_lr_schedule_matches_its_formula(style):
    got = _lr_at(style, STEPS)
    assert got == pytest.approx([_expected(style, n) for n in STEPS], rel=1e-12, abs=1e-15)


def test_hand_computed_lr_values():
    # cosine halfway through decay is the midpoint; linear at 35 is a quarter of the way down
    assert _lr_at("cosine", [60])[0] == pytest.approx((MAX + MIN) / 2)
    assert _lr_at("linear", [35])[0] == pytest.approx(MIN + 0.75 * (MAX - MIN))
    assert _lr_at("inverse-square-root", [40])[0] == pytest.approx(MAX / 2)
    assert _lr_at("linear", [3])[0] == pytest.approx(MAX * 0.3)


def test_scheduler_resumes_exactly_and_checks_settings():
    a = OptimizerParamScheduler(_opt(), MAX, MIN, WARM, DECAY, "cosine")
    for _ in range(37):
        a.step(1)
    state = a.state_dict()  # Megatron's key names
    assert set(state) == {
        "num_steps", "max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
        "start_wd", "end_wd", "wd_incr_style", "wd_incr_steps",
    }  # fmt: skip
    b = OptimizerParamScheduler(_opt(), MAX, MIN, WARM, DECAY, "cosine")
    b.load_state_dict(state)
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    assert b.step(1) == a.step(1)
    c = OptimizerParamScheduler(_opt(), 2 * MAX, MIN, WARM, DECAY, "cosine")
    with pytest.raises(ConfigError, match="max_lr"):
        c.load_state_dict(a.state_dict())
    d = OptimizerParamScheduler(_opt(), 2 * MAX, MIN, WARM, DECAY, "cosine", use_checkpoint=True)
    d.load_state_dict(a.state_dict())
    assert d.max_lr == MAX and d.num_steps == a.num_steps


def test_build_lr_scheduler_from_flags_with_warmup_fraction():
    cfg = Config(
        optim=OptimConfig(lr=MAX, min_lr=MIN, lr_decay_style="linear", lr_warmup_fraction=0.1),
        train=TrainConfig(train_iters=200, global_batch_size=8),
    ).finalize(1)
    sched = build_lr_scheduler(cfg, _opt())
    assert (sched.warmup_steps, sched.decay_steps) == (20 * 8, 200 * 8)  # in samples
    for _ in range(10):
        lr = sched.step(8)
    assert lr == pytest.approx(MAX / 2)
    with pytest.raises(ConfigError, match="longer than decay"):
        OptimizerParamScheduler(_opt(), MAX, MIN, 50, 20, "linear")


def test_rampup_batch_size_is_exact():
    # start 4, +4 per step, over 48 samples, to 16: 3 increments, one every 16 samples
    calc = NumMicroBatchesCalculator(
        16, micro_batch_size=2, dp_size=2, rampup_batch_size=[4, 4, 48]
    )
    consumed, sizes, micro = 0, [], []
    while consumed < 100:
        calc.update(consumed)
        sizes.append(calc.get_current_global_batch_size())
        micro.append(calc.get())
        consumed += sizes[-1]
    # consumed: 0 4 8 12 | 16 24 | 32 44 | 56 (> 48: full batch) 72 88
    assert sizes == [4, 4, 4, 4, 8, 8, 12, 12, 16, 16, 16]
    assert micro == [s // 4 for s in sizes]
    # a function of consumed samples only: a resumed run continues the same sequence
    resumed = NumMicroBatchesCalculator(16, 2, 2, [4, 4, 48])
    resumed.update(sum(sizes[:5]))
    assert resumed.get_current_global_batch_size() == sizes[5]
    with pytest.raises(ConfigError, match="multiple of the increment"):
        NumMicroBatchesCalculator(16, 2, 2, [4, 5, 48])
    with pytest.raises(ConfigError, match="not divisible"):
        NumMicroBatchesCalculator(16, 2, 2, [6, 2, 48]).update(0)


def _lrs_of_a_run(cfg: Config) -> list[float]:
    """The lr after each iteration, stepping by the iteration's global batch as training does."""
    sched, calc = build_lr_scheduler(cfg, _opt()), build_num_microbatches_calculator(cfg)
    consumed, lrs = 0, []
    for _ in range(cfg.total_train_iters):
        calc.update(consumed)
        lrs.append(sched.step(calc.get_current_global_batch_size()))
        consumed += calc.get_current_global_batch_size()
    return lrs


def test_lr_counts_samples_during_a_batch_size_rampup():
    # Megatron's GPT-3 recipe in small: --rampup-batch-size with --train-samples and the schedule
    # in samples. Batches 4 4 4 4 8 8 12 12 then 16s (see test_rampup_batch_size_is_exact).
    ramp = Config(
        optim=OptimConfig(lr=MAX, min_lr=MIN, lr_decay_style="cosine", lr_warmup_samples=40),
        train=TrainConfig(
            micro_batch_size=2,
            global_batch_size=16,
            rampup_batch_size=[4, 4, 48],
            train_samples=200,
        ),
    ).finalize(2)
    # 56 samples in 8 ramp-up iterations, then (200 - 56) // 16 = 9 full ones
    assert ramp.total_train_iters == 17 and ramp.train.train_iters is None
    lrs, seen = _lrs_of_a_run(ramp), [4, 8, 12, 16, 24, 32, 44, 56]
    # warm-up over 40 samples, not 40 iterations: lr after iteration k is MAX * samples_k / 40
    assert lrs[:6] == pytest.approx([MAX * n / 40 for n in seen[:6]], rel=1e-12)
    r = (seen[7] - 40) / (200 - 40)  # then cosine decay over the remaining samples
    assert lrs[7] == pytest.approx(MIN + (MAX - MIN) * 0.5 * (1 + math.cos(math.pi * r)))
    # without a ramp-up, the sample schedule equals the iteration schedule it replaces
    fixed = Config(
        optim=OptimConfig(lr=MAX, min_lr=MIN, lr_decay_style="linear", lr_warmup_iters=3),
        train=TrainConfig(micro_batch_size=2, global_batch_size=8, train_iters=12),
    ).finalize(2)
    expected = [
        MAX * n / 3 if n <= 3 else MIN + (MAX - MIN) * (1 - (n - 3) / 9) for n in range(1, 13)
    ]
    assert _lrs_of_a_run(fixed) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "train, optim, match",
    [
        ({"train_samples": 100}, {"lr_warmup_iters": 2}, "--lr-warmup-samples"),
        ({"train_samples": 100}, {"lr_decay_iters": 5}, "--lr-decay-samples"),
        ({"train_iters": 10}, {"lr_decay_samples": 50}, "--lr-decay-iters"),
        ({"train_iters": 10}, {"lr_warmup_samples": 8, "lr_warmup_fraction": 0.1}, "only one"),
    ],
)
def test_iteration_and_sample_schedule_flags_do_not_mix(train, optim, match):
    with pytest.raises(ConfigError, match=match):
        Config(optim=OptimConfig(**optim), train=TrainConfig(**train)).finalize(1)


def test_train_iters_for_samples_counts_whole_batches():
    # constant batch: floor; ramp-up 4 4 4 4 8 8 12 12 16..: cumulative 4 8 12 16 24 32 44 56 72
    assert train_iters_for_samples(100, 16, None) == 6
    assert [train_iters_for_samples(n, 16, [4, 4, 48]) for n in (3, 4, 23, 24, 56, 71, 72)] == [
        0, 1, 4, 5, 8, 8, 9
    ]  # fmt: skip
    cfg = Config(train=TrainConfig(global_batch_size=16, train_samples=100)).finalize(1)
    again = Config.from_dict(cfg.to_dict())  # a --train-samples config reloads from a checkpoint
    assert again == cfg and again.total_train_iters == 6


def test_num_microbatches_from_config_is_global_over_micro_times_dp():
    cfg = Config(train=TrainConfig(micro_batch_size=2, global_batch_size=24)).finalize(3)
    calc = build_num_microbatches_calculator(cfg)
    calc.update(10_000)
    assert calc.get() == 4 == cfg.num_microbatches
    assert calc.get_current_global_batch_size() == 2 * 3 * 4


def test_dynamic_loss_scaler_hysteresis_backoff_growth_and_floor():
    s = DynamicGradScaler(1024.0, min_scale=256.0, growth_interval=3, hysteresis=2)
    history = []
    for inf in [True, True, True, False, False, False, True, True, True, True]:
        s.update(inf)
        history.append(s.scale)
    # 2 overflows before the first backoff, then every overflow backs off until 3 clean steps
    # restore growth (and the hysteresis budget); the scale never drops below min_scale
    assert history == [1024, 512, 256, 256, 256, 512, 512, 256, 256, 256]
    restored = DynamicGradScaler(1.0, min_scale=256.0, growth_interval=3, hysteresis=2)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()


def test_weight_decay_schedule_and_warmup_init_as_megatron():
    cfg = Config(
        optim=OptimConfig(
            lr=MAX, lr_warmup_init=MAX / 10, lr_warmup_iters=4, lr_decay_style="constant",
            start_weight_decay=0.0, end_weight_decay=0.1, weight_decay_incr_style="cosine",
        ),
        train=TrainConfig(global_batch_size=2, train_iters=10),
    ).finalize(1)  # fmt: skip
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW(
        [{"params": [p], "wd_mult": 1.0}, {"params": [torch.nn.Parameter(torch.zeros(1))], "wd_mult": 0.0}]
    )  # fmt: skip
    sched = build_lr_scheduler(cfg, opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(
        MAX / 10
    )  # warm-up starts at --lr-warmup-init
    sched.step(4)  # 4 of 20 samples: half-way through warm-up
    assert opt.param_groups[0]["lr"] == pytest.approx(MAX / 10 + (MAX - MAX / 10) / 2)
    wd = [sched.step(2) and opt.param_groups[0]["weight_decay"] for _ in range(8)]
    expected = [0.05 * (1 - math.cos(math.pi * n / 20)) for n in range(6, 21, 2)]
    assert wd == pytest.approx(expected, rel=1e-12)
    assert opt.param_groups[1]["weight_decay"] == 0.0  # biases and norms never decay
    with pytest.raises(ConfigError, match="--weight-decay-incr-style linear or cosine"):
        OptimConfig(start_weight_decay=0.0, end_weight_decay=0.1)


def test_saved_param_groups_are_matched_by_kind_not_position():
    # saved at dp 1 (decay + no-decay groups), loaded into a ZeRO-1 shard holding only biases
    saved = [{"weight_decay": 0.1, "wd_mult": 1.0, "lr": 1.0}, {"weight_decay": 0.0, "wd_mult": 0.0, "lr": 1.0}]  # fmt: skip
    shard = [{"params": [], "weight_decay": 0.5, "wd_mult": 0.0, "betas": (0.9, 0.99)}]
    restore_param_groups(shard, saved)
    assert shard[0]["weight_decay"] == 0.0 and shard[0]["betas"] == (0.9, 0.99)
