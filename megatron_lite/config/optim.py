"""Optimizer, LR and weight-decay schedules, mixed precision and loss scaling."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config.flags import flag, flag_name, positive, require


def precision_of(bf16: bool, fp16: bool) -> str:
    """'bf16', 'fp16' or 'fp32' from --bf16/--fp16 (the one rule for the model weights' dtype)."""
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


@dataclass
class OptimConfig:
    optimizer: str = flag("adam", "Optimizer (adam is AdamW).", choices=["adam", "sgd"])
    lr: float = flag(1e-4, "Peak learning rate.", type=float)
    min_lr: float = flag(0.0, "Learning rate at the end of decay.", type=float)
    lr_decay_style: str = flag(
        "linear",
        "Decay after warm-up.",
        choices=["constant", "linear", "cosine", "inverse-square-root"],
    )
    lr_warmup_iters: int = flag(0, "Linear warm-up iterations (with --train-iters).", type=int)
    lr_warmup_samples: int = flag(0, "Linear warm-up samples (with --train-samples).", type=int)
    lr_warmup_fraction: float | None = flag(
        None, "Warm-up as a fraction of the decay length.", type=float
    )
    lr_decay_iters: int | None = flag(
        None, "Iterations of decay (default --train-iters).", type=int
    )
    lr_decay_samples: int | None = flag(
        None, "Samples of decay (default --train-samples).", type=int
    )
    lr_warmup_init: float = flag(0.0, "Learning rate at the start of warm-up.", type=float)
    weight_decay: float = flag(0.01, "Weight decay (not on biases and norm weights).", type=float)
    start_weight_decay: float | None = flag(
        None, "Weight decay at the start of the run (default --weight-decay).", type=float
    )
    end_weight_decay: float | None = flag(
        None, "Weight decay at the end of the run (default --weight-decay).", type=float
    )
    weight_decay_incr_style: str = flag(
        "constant",
        "How weight decay goes from start to end over the run.",
        choices=["constant", "linear", "cosine"],
    )
    adam_beta1: float = flag(0.9, "Adam beta1.", type=float)
    adam_beta2: float = flag(0.999, "Adam beta2.", type=float)
    adam_eps: float = flag(1e-8, "Adam epsilon.", type=float)
    sgd_momentum: float = flag(0.9, "SGD momentum.", type=float)
    clip_grad: float = flag(1.0, "Clip gradients to this global L2 norm (0 disables).", type=float)
    bf16: bool = flag(False, "bf16 model weights, fp32 master weights.", action="store_true")
    fp16: bool = flag(
        False, "fp16 model weights, fp32 master weights, loss scaling.", action="store_true"
    )
    loss_scale: float | None = flag(
        None, "Constant fp16 loss scale (default: dynamic).", type=float
    )
    initial_loss_scale: float = flag(2.0**32, "Initial dynamic loss scale.", type=float)
    min_loss_scale: float = flag(1.0, "Smallest dynamic loss scale.", type=float)
    loss_scale_window: int = flag(1000, "Steps without overflow before the scale grows.", type=int)
    hysteresis: int = flag(2, "Overflows tolerated before the scale backs off.", type=int)
    log_num_zeros_in_grad: bool = flag(
        False, "Count zero gradient entries each step (for logging).", action="store_true"
    )
    override_opt_param_scheduler: bool = flag(
        False,
        "On resume, keep this run's LR schedule settings over the checkpoint's.",
        name="--override-opt_param-scheduler",
        action="store_true",
    )
    use_checkpoint_opt_param_scheduler: bool = flag(
        False,
        "On resume, take the LR schedule settings from the checkpoint.",
        name="--use-checkpoint-opt_param-scheduler",
        action="store_true",
    )

    @property
    def precision(self) -> str:
        """The model weights' precision, 'bf16', 'fp16' or 'fp32' (fp32 masters either way)."""
        return precision_of(self.bf16, self.fp16)

    def __post_init__(self) -> None:
        require(not (self.bf16 and self.fp16), "--bf16 and --fp16 are mutually exclusive")
        require(self.lr >= 0, f"--lr must be non-negative, got {self.lr}")
        require(
            0 <= self.min_lr <= self.lr,
            f"--min-lr ({self.min_lr}) must be between 0 and --lr ({self.lr})",
        )
        for name in ("lr_warmup_iters", "lr_warmup_samples"):
            value = getattr(self, name)
            require(value >= 0, f"{flag_name(OptimConfig, name)} must be non-negative, got {value}")
        positive(self, "lr_decay_iters", "lr_decay_samples")
        if self.lr_warmup_fraction is not None:
            require(
                0 <= self.lr_warmup_fraction <= 1,
                f"--lr-warmup-fraction must be in [0, 1], got {self.lr_warmup_fraction}",
            )
            require(
                self.lr_warmup_iters == 0 and self.lr_warmup_samples == 0,
                "use only one of --lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples",
            )
        require(self.clip_grad >= 0, f"--clip-grad must be non-negative, got {self.clip_grad}")
        if self.weight_decay_incr_style == "constant":
            require(
                self.start_weight_decay == self.end_weight_decay,
                f"--start-weight-decay ({self.start_weight_decay}) and --end-weight-decay "
                f"({self.end_weight_decay}) differ: give --weight-decay-incr-style linear or cosine",
            )
        else:
            require(
                self.start_weight_decay is not None and self.end_weight_decay is not None,
                f"--weight-decay-incr-style {self.weight_decay_incr_style} needs "
                "--start-weight-decay and --end-weight-decay",
            )
        positive(self, "loss_scale", "initial_loss_scale", "loss_scale_window", "hysteresis")
