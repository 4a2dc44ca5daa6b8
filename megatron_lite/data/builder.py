"""`build_train_valid_test_datasets`: --data-path / --split / --mock-data -> three datasets.

The index caches are built by one process per node (LOCAL_RANK 0) while the others wait at a
barrier, then the others load them. One builder per node rather than per job keeps this correct
when the cache directory is node-local; on a shared directory the nodes write identical files
atomically (see `cache.py`). A rank that still misses the cache builds the indices itself: the
result is deterministic, only slower.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch.distributed as dist

from megatron_lite.data.blended_dataset import BlendedDataset
from megatron_lite.data.gpt_dataset import (
    SPLIT_NAMES,
    GPTDataset,
    MockGPTLowLevelDataset,
    default_cache_dir,
    split_ranges,
)
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.sft_dataset import MaskedDataset, SFTDataset
from megatron_lite.errors import DataError

logger = logging.getLogger(__name__)
_BLEND_SURPLUS = 0.005  # build 0.5% more samples per blended dataset, as megatron-core


def train_valid_test_num_samples(cfg) -> list[int]:
    """Megatron's sample counts: train iters x global batch; (train iters // eval interval + 1)
    x eval iters x global batch for validation; eval iters x global batch for test."""
    t = cfg.train
    gbs = t.global_batch_size
    if gbs is None:
        raise ValueError("global batch size unknown: call cfg.finalize(world_size) first")
    train_iters = cfg.total_train_iters or 0
    train = t.train_samples if t.train_samples is not None else train_iters * gbs
    valid = (train_iters // t.eval_interval + 1) * t.eval_iters * gbs
    return [train, valid, t.eval_iters * gbs]


def parse_blend(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """['0.7', 'a', '0.3', 'b'] (or one string of them) -> (prefixes, weights); no weights -> None."""
    items = [x for entry in data_path for x in entry.split()]
    if not items:
        raise DataError("--data-path is empty (give one or more dataset prefixes, or --mock-data)")
    if len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            return items, None
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(
                f"--data-path weights must be non-negative with a positive sum: {items}"
            )
        return items[1::2], weights
    return items, None


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def _on_builder_first(build):
    """Run `build()` on local rank 0 first (it writes the caches), then on the other ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return build()
    result = build() if _local_rank() == 0 else None
    dist.barrier()
    return result if _local_rank() == 0 else build()


def _gpt_splits(cfg, tokenizer, prefix, dataset, sizes, cache_dir, split):
    out = []
    for name, rng, n in zip(SPLIT_NAMES, split_ranges(len(dataset), split), sizes):
        if rng is None:
            out.append(None)
            continue
        if rng[0] == rng[1] and name == "train" and n:  # nothing to train on: say so now
            raise DataError(
                f"--split {split} leaves the train split of {prefix} no documents "
                f"({len(dataset)} in the dataset): nothing to train on"
            )
        if rng[0] == rng[1]:  # a positive --split weight that rounds to no documents
            logger.warning(
                "--split %s leaves the %s split of %s no documents (%d in all); it is skipped",
                split,
                name,
                prefix,
                len(dataset),
            )
            out.append(None)
            continue
        ids = np.arange(rng[0], rng[1], dtype=np.int32)
        out.append(_split_dataset(cfg, tokenizer, prefix, dataset, ids, n, name, cache_dir, split))
    return out


def _open(cfg, prefix: str):
    """The files at `prefix`: tokens, or (--sft, --dpo) tokens and loss masks."""
    if cfg.data.sft or cfg.data.dpo:
        return MaskedDataset(prefix)
    return IndexedDataset(prefix)


def _split_dataset(cfg, tokenizer, prefix, dataset, ids, n, name, cache_dir, split):
    """The samples of one split: GPT's, or packed conversations (--sft), or pairs (--dpo)."""
    d, common = cfg.data, dict(seq_length=cfg.model.seq_length, seed=cfg.train.seed)
    if d.sft:
        return SFTDataset(dataset, ids, n, name, tokenizer=tokenizer, **common)
    if d.dpo:
        from megatron_lite.data.dpo_dataset import DPODataset

        return DPODataset(dataset, ids, n, name, tokenizer=tokenizer, **common)
    return GPTDataset(
        dataset,
        prefix,
        ids,
        n,
        name,
        tokenizer=tokenizer,
        split=split,
        cache_dir=cache_dir,
        eod_mask_loss=d.eod_mask_loss,
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        **common,
    )


def _build(cfg, tokenizer, sizes):
    d = cfg.data
    if d.mock_data:
        mock = MockGPTLowLevelDataset(tokenizer)
        return _gpt_splits(cfg, tokenizer, None, mock, sizes, None, "1,1,1")
    if d.data_path:
        return _build_blend(cfg, tokenizer, d.data_path, sizes, d.split)
    # --train-data-path / --valid-data-path / --test-data-path: every document of a split's
    # datasets belongs to that split (a one-hot --split)
    out = []
    for i, paths in enumerate((d.train_data_path, d.valid_data_path, d.test_data_path)):
        one_hot = ",".join("1" if j == i else "0" for j in range(3))
        out.append(_build_blend(cfg, tokenizer, paths, sizes, one_hot)[i] if paths else None)
    return out


def _build_blend(cfg, tokenizer, data_path: list[str], sizes, split: str):
    """Train, valid and test datasets over the (weighted) prefixes of `data_path`."""
    d = cfg.data
    prefixes, weights = parse_blend(data_path)
    if len(prefixes) == 1:
        ds = _open(cfg, prefixes[0])
        cache_dir = default_cache_dir(prefixes[0], d.data_cache_path)
        return _gpt_splits(cfg, tokenizer, prefixes[0], ds, sizes, cache_dir, split)
    if weights is not None:
        total = sum(weights)
        weights = [w / total for w in weights]
        targets = [[math.ceil(n * w) for n in sizes] for w in weights]
        per_dataset = [[math.ceil(t * (1 + _BLEND_SURPLUS)) for t in row] for row in targets]
    else:
        per_dataset = [[None] * 3 for _ in prefixes]
    splits = []
    for p, s in zip(prefixes, per_dataset):
        ds = _open(cfg, p)
        cache_dir = default_cache_dir(p, d.data_cache_path)
        splits.append(_gpt_splits(cfg, tokenizer, p, ds, s, cache_dir, split))
    blend_cache = default_cache_dir(prefixes[0], d.data_cache_path)
    out = []
    for i in range(3):
        keep = [j for j, s in enumerate(splits) if s[i] is not None]
        if not keep:
            out.append(None)
            continue
        parts = [splits[j][i] for j in keep]
        if weights is not None:
            w, size = [weights[j] for j in keep], sum(targets[j][i] for j in keep)
        else:  # no weights: mix in proportion to the datasets' lengths
            w = [len(p) for p in parts]
            size = min(sizes[i], sum(w))
        out.append(BlendedDataset(parts, w, size, blend_cache))
    return out


def build_train_valid_test_datasets(cfg, tokenizer, train_valid_test_num_samples: list[int]):
    """(train, valid, test) datasets; a split with zero weight in --split is None."""
    sizes = list(train_valid_test_num_samples)
    return tuple(_on_builder_first(lambda: _build(cfg, tokenizer, sizes)))
