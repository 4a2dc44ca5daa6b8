"""Loss scaling for fp16 training (Micikevicius et al., "Mixed Precision Training", 2018, sec. 3.2).

The loss is multiplied by `scale` before backward so small gradients survive fp16; the optimizer
divides it out again. A dynamic scaler halves the scale after `hysteresis` overflowing steps (each one
skipped) and doubles it after `growth_interval` clean steps in a row, as Megatron's --loss-scale-window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_lite.config import OptimConfig


class ConstantGradScaler:
    """A fixed scale (--loss-scale); a step whose gradients overflow is still skipped."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    @property
    def inv_scale(self) -> float:
        return 1.0 / self.scale

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicGradScaler(ConstantGradScaler):
    """Megatron's dynamic scaler: backoff after `hysteresis` overflows, growth after a clean window."""

    def __init__(
        self,
        initial_scale: float,
        min_scale: float = 1.0,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
    ) -> None:
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0):
            raise ValueError(
                f"growth_factor ({growth_factor}) must be > 1 and backoff_factor "
                f"({backoff_factor}) in (0, 1)"
            )
        super().__init__(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.growth_tracker = 0  # clean steps since the last overflow or growth
        self.hysteresis_tracker = hysteresis  # overflows left before a backoff

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "hysteresis_tracker": self.hysteresis_tracker,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
        self.hysteresis_tracker = int(state["hysteresis_tracker"])


def build_grad_scaler(optim_cfg: OptimConfig) -> ConstantGradScaler | None:
    """fp16: dynamic unless --loss-scale is given; bf16/fp32: none unless --loss-scale is given."""
    if optim_cfg.loss_scale is not None:
        return ConstantGradScaler(optim_cfg.loss_scale)
    if not optim_cfg.fp16:
        return None
    return DynamicGradScaler(
        initial_scale=optim_cfg.initial_loss_scale,
        min_scale=optim_cfg.min_loss_scale,
        growth_interval=optim_cfg.loss_scale_window,
        hysteresis=optim_cfg.hysteresis,
    )
