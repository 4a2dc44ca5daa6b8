"""How many microbatches a step takes: constant, or growing with --rampup-batch-size.

The ramp-up arithmetic is `megatron_lite.config.rampup` (Megatron's rule, a function of consumed
samples only, so a resumed run picks up exactly where it stopped): torch-free, so `Config.finalize`
validates and counts a --train-samples run with the same functions this calculator steps through.
"""

from __future__ import annotations

from megatron_lite.config import ConfigError
from megatron_lite.config.rampup import check_rampup, global_batch_size_at


class NumMicroBatchesCalculator:
    """`get()` microbatches per step for the current global batch; `update(consumed_samples)`."""

    def __init__(
        self,
        global_batch_size: int,
        micro_batch_size: int,
        dp_size: int,
        rampup_batch_size: list[int] | None = None,
    ) -> None:
        self.global_batch_size = global_batch_size
        self.micro_batch_times_dp = micro_batch_size * dp_size
        self.rampup = rampup_batch_size
        if rampup_batch_size is not None:
            check_rampup(rampup_batch_size, global_batch_size)  # each step checks micro x dp
        self.update(0, consistency_check=False)

    def update(self, consumed_samples: int, consistency_check: bool = True) -> None:
        self.current_global_batch_size = global_batch_size_at(
            consumed_samples, self.global_batch_size, self.rampup
        )
        if consistency_check and self.current_global_batch_size % self.micro_batch_times_dp:
            raise ConfigError(
                f"current global batch size ({self.current_global_batch_size}) is not divisible "
                f"by micro batch size x data-parallel size ({self.micro_batch_times_dp})"
            )
        self.num_micro_batches = max(1, self.current_global_batch_size // self.micro_batch_times_dp)

    def get(self) -> int:
        return self.num_micro_batches

    def get_current_global_batch_size(self) -> int:
        return self.current_global_batch_size


def build_num_microbatches_calculator(cfg) -> NumMicroBatchesCalculator:
    t = cfg.train
    return NumMicroBatchesCalculator(
        t.global_batch_size, t.micro_batch_size, cfg.data_parallel_size, t.rampup_batch_size
    )
