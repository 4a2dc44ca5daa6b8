"""Mixing datasets by weight (`--data-path 0.7 prefixA 0.3 prefixB`), as megatron-core's
BlendedDataset: sample i comes from the dataset furthest behind its share (`helpers.
build_blending_indices`), and is that dataset's next sample. The two index arrays are cached."""

from __future__ import annotations

import numpy as np
import torch

from megatron_lite.data import helpers
from megatron_lite.data.cache import IndexCache, describe


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(
        self, datasets: list, weights: list[float], size: int, cache_dir: str | None
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        total = float(sum(weights))
        self.datasets, self.size = datasets, int(size)
        self.weights = [float(w) / total for w in weights]
        identifiers = {
            "class": type(self).__name__,
            "datasets": [d.identifiers for d in datasets],
            "weights": self.weights,
            "size": self.size,
        }
        self.description, digest = describe(identifiers)
        self.cache = IndexCache(
            cache_dir, f"{digest}-{type(self).__name__}", ["dataset_index", "dataset_sample_index"]
        )
        self.built_anew = False
        if self.cache.hit():
            self.dataset_index, self.dataset_sample_index = self.cache.load()
        else:
            arrays = helpers.build_blending_indices(np.array(self.weights), self.size)
            self.cache.save(self.description, list(arrays))
            self.dataset_index, self.dataset_sample_index = arrays
            self.built_anew = True
        for d in range(len(datasets)):  # every sample the blend asks for must exist
            wanted = int(np.count_nonzero(self.dataset_index == d))
            if wanted > len(datasets[d]):
                raise ValueError(
                    f"blend wants {wanted} samples from dataset {d} ({datasets[d].path_prefix}) "
                    f"but it has {len(datasets[d])}"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size}")
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]
