"""Learning-rate schedules: linear warm-up, then constant | linear | cosine | inverse-square-root decay.

Steps are iterations (`step()` after each successful optimizer step). With linear warm-up over W
iterations and decay until D, at step n: lr = max_lr * n / W while n <= W; then, with
r = (n - W) / (D - W), linear: min + (max - min)(1 - r); cosine: min + (max - min)(1 + cos(pi r)) / 2;
inverse-square-root: max(min, max_lr sqrt(W) / sqrt(n)); constant: max_lr; after D: min_lr.
"""

from __future__ import annotations

import math

from megatron_lite.config import ConfigError


class OptimizerParamScheduler:
    """Sets `lr` on every param group of `optimizer` from the number of iterations so far."""

    def __init__(
        self,
        optimizer,
        max_lr: float,
        min_lr: float,
        warmup_steps: int,
        decay_steps: int | None,
        decay_style: str,
        *,
        init_lr: float = 0.0,
        override: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        if decay_style != "constant" and decay_steps is None:
            raise ConfigError(
                f"--lr-decay-style {decay_style} needs --lr-decay-iters or --train-iters"
            )
        if decay_steps is not None and warmup_steps > decay_steps:
            raise ConfigError(
                f"warm-up ({warmup_steps} iterations) is longer than decay ({decay_steps}): "
                "lower --lr-warmup-iters/--lr-warmup-fraction or raise --lr-decay-iters"
            )
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.init_lr = max_lr, min_lr, init_lr
        self.warmup_steps, self.decay_steps, self.decay_style = (
            warmup_steps,
            decay_steps,
            decay_style,
        )
        self.override, self.use_checkpoint = override, use_checkpoint
        self.num_steps = 0
        self.step(0)

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

    def step(self, increment: int = 1) -> float:
        """Advance by `increment` iterations; set and return the new lr."""
        self.num_steps += increment
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    _CHECKED = ("max_lr", "min_lr", "warmup_steps", "decay_steps", "decay_style")

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, **{k: getattr(self, k) for k in self._CHECKED}}

    def load_state_dict(self, state: dict) -> None:
        """Resume; a setting that differs from the checkpoint's is an error unless overridden
        (--override-opt_param-scheduler keeps ours, --use-checkpoint-opt_param-scheduler theirs)."""
        for k in self._CHECKED:
            ours, theirs = getattr(self, k), state[k]
            if self.override or ours == theirs:
                continue
            if self.use_checkpoint:
                setattr(self, k, theirs)
                continue
            raise ConfigError(
                f"learning-rate schedule {k} is {ours} but the checkpoint has {theirs}: pass "
                "--override-opt_param-scheduler or --use-checkpoint-opt_param-scheduler"
            )
        self.num_steps = int(state["num_steps"])
        self.step(0)


def build_lr_scheduler(cfg, optimizer) -> OptimizerParamScheduler:
    """The schedule of `cfg.optim`; decay length defaults to --train-iters."""
    o, t = cfg.optim, cfg.train
    decay_iters = o.lr_decay_iters if o.lr_decay_iters is not None else t.train_iters
    if o.lr_warmup_fraction is not None:
        if decay_iters is None:
            raise ConfigError("--lr-warmup-fraction needs --lr-decay-iters or --train-iters")
        warmup_iters = int(o.lr_warmup_fraction * decay_iters)
    else:
        warmup_iters = o.lr_warmup_iters
    return OptimizerParamScheduler(
        optimizer,
        max_lr=o.lr,
        min_lr=o.min_lr,
        warmup_steps=warmup_iters,
        decay_steps=decay_iters,
        decay_style=o.lr_decay_style,
        override=getattr(o, "override_opt_param_scheduler", False),
        use_checkpoint=getattr(o, "use_checkpoint_opt_param_scheduler", False),
    )
