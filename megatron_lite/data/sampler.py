"""Megatron's pretraining batch sampler: consecutive samples, sharded over data-parallel ranks.

The global sample order is 0, 1, 2, ... (the dataset's own shuffle index already randomized it);
each step takes the next `micro_batch_size x dp_size` samples and rank r gets its slice
`[r * mbs, (r + 1) * mbs)`. Restarting from `consumed_samples` (saved in checkpoints) continues
exactly where the run stopped, whatever the dp size was before and after, as long as
`consumed_samples` is a multiple of the new `micro_batch_size x dp_size`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class MegatronPretrainingSampler:
    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples = {total_samples})")
        if consumed_samples >= total_samples:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must be less than the dataset's "
                f"{total_samples} samples: the run has used the whole dataset"
            )
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need micro_batch_size > 0 ({micro_batch_size}), dp_size > 0 ({dp_size}) "
                f"and 0 <= dp_rank < dp_size ({dp_rank})"
            )
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.drop_last = drop_last
        self.step = micro_batch_size * dp_size

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size
        batch: list[int] = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == self.step:
                yield batch[lo:hi]
                batch = []
        if batch and not self.drop_last:  # a last, short step: split what is left evenly
            yield batch[lo:hi]


def build_pretraining_data_loader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader | None:
    """A DataLoader yielding this rank's microbatches (dicts of stacked tensors), or None."""
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=False,
        persistent_workers=num_workers > 0,
    )


def cyclic_iter(loader):
    """Iterate a loader forever (validation restarts from its beginning, as Megatron)."""
    while True:
        yield from loader
