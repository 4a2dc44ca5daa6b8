"""Learning-rate schedules: linear warm-up, then constant | linear | cosine | inverse-square-root decay.

Steps are samples, as in Megatron-LM: after each successful optimizer step the schedule advances by
that step's global batch size, so a --rampup-batch-size run warms up and decays by samples seen.
--train-iters runs give their lengths in iterations (x --global-batch-size), --train-samples runs in
samples. With linear warm-up over W steps (from --lr-warmup-init, i0) and decay until D, at step n:
lr = i0 + (max_lr - i0) n / W while n <= W; then, with r = (n - W) / (D - W), linear:
min + (max - min)(1 - r); cosine: min + (max - min)(1 + cos(pi r)) / 2; inverse-square-root:
max(min, max_lr sqrt(W) / sqrt(n)); constant: max_lr; after D: min_lr.

Weight decay can change too (--start-weight-decay, --end-weight-decay, --weight-decay-incr-style
linear | cosine over the whole run, in samples, as Megatron's): wd = start + c (end - start) with
c = r (linear) or (1 - cos(pi r)) / 2 (cosine), r = n / run length. Groups that take no decay
(biases, norm weights: `wd_mult` 0) keep 0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from megatron_lite.config import ConfigError

if TYPE_CHECKING:
    import torch

    from megatron_lite.config import Config
    from megatron_lite.optim.optimizer import MegatronOptimizer

    Optimizer = MegatronOptimizer | torch.optim.Optimizer  # anything with param_groups


class OptimizerParamScheduler:
    """Sets `lr` on every param group of `optimizer` from the number of samples trained so far."""

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: float,
        min_lr: float,
        warmup_steps: int,
        decay_steps: int | None,
        decay_style: str,
        *,
        init_lr: float = 0.0,
        wd_schedule: tuple[float, float, str, int] | None = None,
        override: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        if decay_style != "constant" and decay_steps is None:
            raise ConfigError(
                f"--lr-decay-style {decay_style} needs --lr-decay-iters or --train-iters"
            )
        if decay_steps is not None and warmup_steps > decay_steps:
            raise ConfigError(
                f"warm-up ({warmup_steps} samples) is longer than decay ({decay_steps}): lower "
                "--lr-warmup-iters/--lr-warmup-samples/--lr-warmup-fraction or raise "
                "--lr-decay-iters/--lr-decay-samples"
            )
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.init_lr = max_lr, min_lr, init_lr
        self.warmup_steps, self.decay_steps, self.decay_style = (
            warmup_steps,
            decay_steps,
            decay_style,
        )
        # (start, end, style, samples) of the weight decay, or None: the groups' own values stay
        self.start_wd, self.end_wd, self.wd_incr_style, self.wd_incr_steps = wd_schedule or (
            None,
            None,
            "constant",
            None,
        )
        self.override, self.use_checkpoint = override, use_checkpoint
        self.num_steps = 0
        self.step(0)

    def get_wd(self) -> float:
        if self.wd_incr_style == "constant" or self.num_steps > self.wd_incr_steps:
            return self.end_wd
        ratio = self.num_steps / self.wd_incr_steps
        if self.wd_incr_style == "linear":
            coeff = ratio
        else:  # cosine
            coeff = 0.5 * (1.0 - math.cos(math.pi * ratio))
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self) -> float:
        n, warm = self.num_steps, self.warmup_steps
        if warm > 0 and n <= warm:
            return self.init_lr + (self.max_lr - self.init_lr) * n / warm
        if self.decay_style == "constant":
            return self.max_lr
        if self.decay_style == "inverse-square-root":
            warm, n = max(warm, 1), max(n, 1)
            return max(self.min_lr, self.max_lr * math.sqrt(warm) / math.sqrt(n))
        if n > self.decay_steps:
            return self.min_lr
        ratio = (n - warm) / (self.decay_steps - warm)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:
            raise ConfigError(f"unknown --lr-decay-style {self.decay_style!r}")
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int) -> float:
        """Advance by `increment` samples (the step's global batch); set and return the new lr."""
        self.num_steps += increment
        lr = self.get_lr()
        wd = None if self.end_wd is None else self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if wd is not None:
                group["weight_decay"] = wd * group.get("wd_mult", 1.0)
        return lr

    # checkpoint key (Megatron's name) -> attribute
    _CHECKED = {
        "max_lr": "max_lr",
        "min_lr": "min_lr",
        "lr_warmup_steps": "warmup_steps",
        "lr_decay_steps": "decay_steps",
        "lr_decay_style": "decay_style",
        "start_wd": "start_wd",
        "end_wd": "end_wd",
        "wd_incr_style": "wd_incr_style",
        "wd_incr_steps": "wd_incr_steps",
    }

    def state_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            **{k: getattr(self, a) for k, a in self._CHECKED.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume; a setting that differs from the checkpoint's is an error unless overridden
        (--override-opt_param-scheduler keeps ours, --use-checkpoint-opt_param-scheduler theirs)."""
        for key, attr in self._CHECKED.items():
            ours, theirs = getattr(self, attr), state.get(key)
            if self.override or ours == theirs:
                continue
            if self.use_checkpoint:
                setattr(self, attr, theirs)
                continue
            raise ConfigError(
                f"learning-rate schedule {key} is {ours} but the checkpoint has {theirs}: pass "
                "--override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler"
            )
        self.num_steps = int(state["num_steps"])
        self.step(0)


def build_lr_scheduler(cfg: Config, optimizer: Optimizer) -> OptimizerParamScheduler:
    """The schedule of `cfg.optim` in samples; the decay length defaults to the run's length."""
    o, t = cfg.optim, cfg.train
    if t.train_samples is not None:
        decay = o.lr_decay_samples if o.lr_decay_samples is not None else t.train_samples
        warmup = o.lr_warmup_samples
    else:
        gbs = t.global_batch_size
        decay_iters = o.lr_decay_iters if o.lr_decay_iters is not None else t.train_iters
        decay = decay_iters * gbs if decay_iters is not None else None
        warmup = o.lr_warmup_iters * gbs
    if o.lr_warmup_fraction is not None:
        if decay is None:
            raise ConfigError("--lr-warmup-fraction needs --lr-decay-iters or --train-iters")
        warmup = o.lr_warmup_fraction * decay
    wd_schedule = None
    if o.start_weight_decay is not None or o.end_weight_decay is not None:
        start = o.weight_decay if o.start_weight_decay is None else o.start_weight_decay
        end = o.weight_decay if o.end_weight_decay is None else o.end_weight_decay
        run_samples = t.train_samples or (cfg.total_train_iters or 0) * t.global_batch_size
        wd_schedule = (start, end, o.weight_decay_incr_style, run_samples)
    return OptimizerParamScheduler(
        optimizer,
        max_lr=o.lr,
        min_lr=o.min_lr,
        warmup_steps=warmup,
        decay_steps=decay,
        decay_style=o.lr_decay_style,
        init_lr=o.lr_warmup_init,
        wd_schedule=wd_schedule,
        override=o.override_opt_param_scheduler,
        use_checkpoint=o.use_checkpoint_opt_param_scheduler,
    )
