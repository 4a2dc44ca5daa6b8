"""Optimizer (mixed precision, loss scaling, clipping, ZeRO-1), LR schedules, batch-size ramp-up."""

from megatron_lite.optim.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron_lite.optim.lr_scheduler import OptimizerParamScheduler, build_lr_scheduler
from megatron_lite.optim.microbatches import (
    NumMicroBatchesCalculator,
    build_num_microbatches_calculator,
)
from megatron_lite.optim.optimizer import MegatronOptimizer, build_optimizer
from megatron_lite.optim.param_state import merge_sharded_state_dicts

__all__ = [
    "ConstantGradScaler",
    "DynamicGradScaler",
    "MegatronOptimizer",
    "NumMicroBatchesCalculator",
    "OptimizerParamScheduler",
    "build_lr_scheduler",
    "build_num_microbatches_calculator",
    "build_optimizer",
    "merge_sharded_state_dicts",
]
