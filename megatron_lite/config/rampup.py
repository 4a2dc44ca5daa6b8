"""--rampup-batch-size arithmetic (Megatron's rule), torch-free: `Config.finalize` validates and
counts a --train-samples run with it, `optim.microbatches.NumMicroBatchesCalculator` follows it
step by step. A function of consumed samples only, so a resumed run picks up exactly where it stopped.
"""

from __future__ import annotations

from megatron_lite.config.flags import require


def check_rampup(
    rampup: list[int], global_batch_size: int, micro_times_dp: int | None = None
) -> None:
    """The global batch is START plus a whole number of INCREMENTs; with `micro_times_dp` (known
    once the data-parallel size is), START and INCREMENT must also be positive multiples of it."""
    start, incr, samples = rampup
    if micro_times_dp is not None:
        for name, v in (("start", start), ("increment", incr)):
            require(
                v > 0 and v % micro_times_dp == 0,
                f"--rampup-batch-size {name} ({v}) must be a positive multiple of "
                f"--micro-batch-size x data-parallel size ({micro_times_dp})",
            )
    diff = global_batch_size - start
    require(
        start > 0 and incr > 0 and samples >= 0 and diff >= 0 and diff % incr == 0,
        f"--rampup-batch-size {start} {incr} {samples}: the global batch size "
        f"({global_batch_size}) minus start must be a non-negative multiple of the increment",
    )


def global_batch_size_at(consumed_samples: int, global_batch_size: int, rampup: list | None) -> int:
    """Megatron's --rampup-batch-size START INCREMENT SAMPLES: the global batch starts at START and
    grows by INCREMENT every SAMPLES / ((global - START) / INCREMENT) consumed samples; after SAMPLES
    it is the global batch size. A function of consumed samples only, so resume is exact."""
    if rampup is None or consumed_samples > rampup[2]:
        return global_batch_size
    start, increment, samples = rampup
    steps = (global_batch_size - start) // increment
    if steps == 0 or samples == 0:
        return start
    return start + int(consumed_samples / (samples / steps)) * increment


def train_iters_for_samples(train_samples: int, global_batch_size: int, rampup: list | None) -> int:
    """Iterations of a --train-samples run: those whose batches all fit in train_samples."""
    iters = consumed = 0
    while rampup is not None and consumed <= rampup[2]:
        batch = global_batch_size_at(consumed, global_batch_size, rampup)
        if consumed + batch > train_samples:
            return iters
        consumed, iters = consumed + batch, iters + 1
    return iters + (train_samples - consumed) // global_batch_size
