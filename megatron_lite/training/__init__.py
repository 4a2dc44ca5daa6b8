"""Pretraining: build a run from a Config (setup), one iteration (step), the loop, and its logging."""

from megatron_lite.training.faults import FAULT_ENV, FaultInjector
from megatron_lite.training.loop import pretrain, report_eval, save, shutdown, train
from megatron_lite.training.setup import Run, build_data_iterators, set_seeds, setup
from megatron_lite.training.step import (
    evaluate,
    forward_step,
    land_params,
    optimizer_step,
    train_step,
)

__all__ = [
    "FAULT_ENV", "FaultInjector", "Run", "build_data_iterators", "evaluate", "forward_step",
    "land_params", "optimizer_step", "pretrain", "report_eval", "save", "set_seeds", "setup", "shutdown", "train",
    "train_step",
]  # fmt: skip
