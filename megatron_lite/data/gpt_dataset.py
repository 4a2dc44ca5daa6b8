"""Megatron's GPTDataset: fixed-length samples packed across documents, in a seeded random order.

For one split (a contiguous range of the `.bin/.idx` sequences, see `split_ranges`) and a number of
samples wanted, as megatron-core does:
1. epochs = how many passes over the split's tokens give `num_samples * seq_length + 1` tokens;
2. document index: the split's sequence ids repeated per epoch and shuffled by
   `numpy.random.RandomState(seed)`; when more than one epoch is needed and the last one is used
   less than 80%, the first epochs and the last are shuffled separately (so the partial epoch does
   not skew which documents are seen);
3. sample index (`helpers.build_sample_idx`): where each `seq_length + 1`-token sample starts in the
   concatenated stream of documents (consecutive samples overlap by one token: the last label);
4. shuffle index: a permutation of the samples from the same RandomState (again two ranges when the
   last epoch is separate).
The three arrays are cached as `.npy` files (see `cache.py`) and memory-mapped on later runs.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import torch

from megatron_lite.data import helpers
from megatron_lite.data.cache import IndexCache, describe
from megatron_lite.errors import DataError

logger = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "valid", "test")
_LAST_EPOCH_THRESHOLD = 0.80  # a last epoch used less than this much is shuffled on its own


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> normalized [train, valid, test] weights (missing ones are 0)."""
    weights = [float(x) for x in re.findall(r"[.0-9]+", split)]
    if not 0 < len(weights) <= 3 or sum(weights) <= 0:
        raise DataError(f"--split must be 1 to 3 numbers with a positive sum, got {split!r}")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """Each split's [begin, end) fraction of the documents, None for an empty split."""
    bounds, acc = [], 0.0
    for w in parse_split(split):
        bounds.append((acc, acc + w) if w > 0 else None)
        acc += w
    return bounds


def split_ranges(num_sequences: int, split: str) -> list[tuple[int, int] | None]:
    """Sequence id ranges [begin, end) per split: round(fraction * count), as Megatron."""
    return [
        None if b is None else (int(round(b[0] * num_sequences)), int(round(b[1] * num_sequences)))
        for b in split_matrix(split)
    ]


def tokenizer_identity(tokenizer) -> dict:
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
    }


class GPTDataset(torch.utils.data.Dataset):
    """Samples of `seq_length` tokens (+1 for the labels) from sequences `document_ids` of `dataset`.

    Item: dict of `tokens`, `labels` (tokens shifted by one), `loss_mask` (float, 0 on eod tokens
    under eod_mask_loss), `position_ids`, and under reset_attention_mask an `attention_mask`
    [1, s, s] bool, True where attention is masked (Megatron's convention).
    """

    def __init__(
        self,
        dataset,
        path_prefix: str | None,
        document_ids: np.ndarray,
        num_samples: int | None,
        split_name: str,
        *,
        seq_length: int,
        seed: int,
        tokenizer,
        split: str,
        cache_dir: str | None = None,
        eod_mask_loss: bool = False,
        reset_position_ids: bool = False,
        reset_attention_mask: bool = False,
    ) -> None:
        self.dataset, self.path_prefix = dataset, path_prefix
        self.document_ids = np.asarray(document_ids, dtype=np.int32)
        self.num_samples, self.split_name = num_samples, split_name
        self.seq_length, self.seed, self.eod = seq_length, seed, tokenizer.eod
        self.vocab_size = tokenizer.vocab_size
        self.eod_mask_loss = eod_mask_loss
        self.reset_position_ids, self.reset_attention_mask = (
            reset_position_ids,
            reset_attention_mask,
        )
        self.identifiers = {
            "class": type(self).__name__,
            "dataset_path": path_prefix,
            "num_samples": num_samples,
            "index_split": split_name,
            "random_seed": seed,
            "sequence_length": seq_length,
            "split": split,
            "split_matrix": split_matrix(split),
            "tokenizer": tokenizer_identity(tokenizer),
            "add_extra_token_to_sequence": True,
        }
        self.description, digest = describe(self.identifiers)
        base = f"{digest}-{type(self).__name__}-{split_name}"
        names = ["document_index", "sample_index", "shuffle_index"]
        self.cache = IndexCache(cache_dir, base, names)
        self.built_anew = False
        if self.cache.hit():
            self.document_index, self.sample_index, self.shuffle_index = self.cache.load()
        else:
            arrays = self._build_indices()
            self.cache.save(self.description, arrays)
            self.document_index, self.sample_index, self.shuffle_index = arrays
            self.built_anew = True

    def _build_indices(self) -> list[np.ndarray]:
        sizes = np.asarray(self.dataset.sequence_lengths)
        tokens_per_epoch = int(sizes[self.document_ids].sum(dtype=np.int64))
        if tokens_per_epoch <= self.seq_length:
            raise DataError(
                f"the {self.split_name} split of {self.path_prefix} has {tokens_per_epoch} tokens in "
                f"{len(self.document_ids)} documents: too few for one sample of --seq-length "
                f"{self.seq_length} + 1; use more data or change --split"
            )
        num_epochs = 1
        if self.num_samples is not None:
            while num_epochs * tokens_per_epoch < self.num_samples * self.seq_length + 1:
                num_epochs += 1
        separate_last = False
        if num_epochs > 1:
            samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // self.seq_length
            samples_from_last = self.num_samples - samples_before_last
            samples_per_epoch = (tokens_per_epoch - 1) // self.seq_length
            separate_last = samples_from_last < int(_LAST_EPOCH_THRESHOLD * samples_per_epoch)
        rng = np.random.RandomState(self.seed)
        if separate_last:
            document_index = np.concatenate(
                [
                    _shuffled_epochs(self.document_ids, num_epochs - 1, rng),
                    _shuffled_epochs(self.document_ids, 1, rng),
                ]
            )
        else:
            document_index = _shuffled_epochs(self.document_ids, num_epochs, rng)
        sample_index = helpers.build_sample_idx(
            sizes, document_index, self.seq_length, num_epochs, tokens_per_epoch, True, 1
        )
        num_built = sample_index.shape[0] - 1
        first_range = samples_before_last if separate_last else num_built
        shuffle_index = _shuffled_range(first_range, num_built, rng)
        logger.info(
            "built %s %s indices: %d samples, %d epochs",
            self.path_prefix,
            self.split_name,
            num_built,
            num_epochs,
        )
        return [document_index, sample_index, shuffle_index]

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The `seq_length + 1` tokens of sample `idx` (after the shuffle), as int64."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for a dataset of {len(self)}")
        i = int(self.shuffle_index[idx])
        (beg, beg_off), (end, end_off) = self.sample_index[i], self.sample_index[i + 1]
        doc = self.document_index
        if beg == end:
            parts = [self.dataset.get(int(doc[beg]), int(beg_off), int(end_off - beg_off + 1))]
        else:
            parts = [self.dataset.get(int(doc[beg]), int(beg_off))]
            parts += [self.dataset.get(int(doc[j])) for j in range(beg + 1, end)]
            parts.append(self.dataset.get(int(doc[end]), 0, int(end_off + 1)))
        text = np.concatenate(parts).astype(np.int64)
        if text.size and not 0 <= int(text.min()) <= int(text.max()) < self.vocab_size:
            self._bad_token_id(
                idx, text, list(dict.fromkeys(int(doc[j]) for j in range(beg, end + 1)))
            )
        return text

    def _bad_token_id(self, idx: int, text: np.ndarray, docs: list[int]) -> None:
        bad = int(text.max()) if text.max() >= self.vocab_size else int(text.min())
        raise DataError(
            f"{self.path_prefix}: {self.split_name} sample {idx} (documents {docs}) holds token id "
            f"{bad}, outside the tokenizer's vocabulary of {self.vocab_size}: the data was made "
            "with another tokenizer (check --tokenizer-type and its files, or rerun "
            "tools/preprocess_data.py with this one)"
        )

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        text = self.sample_tokens(int(idx))
        tokens, labels = text[:-1], text[1:]
        item = {
            "tokens": torch.from_numpy(tokens.copy()),
            "labels": torch.from_numpy(labels.copy()),
        }
        item.update(
            ltor_masks_and_position_ids(
                tokens,
                self.eod,
                self.eod_mask_loss,
                self.reset_position_ids,
                self.reset_attention_mask,
            )
        )
        return item


def _shuffled_epochs(document_ids: np.ndarray, num_epochs: int, rng) -> np.ndarray:
    index = np.tile(document_ids, num_epochs).astype(np.int32)
    rng.shuffle(index)
    return index


def _shuffled_range(first: int, total: int, rng) -> np.ndarray:
    """[0, first) shuffled, then [first, total) shuffled (uint32 unless the range is huge)."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    head = np.arange(first, dtype=dtype)
    rng.shuffle(head)
    if first == total:
        return head
    tail = np.arange(first, total, dtype=dtype)
    rng.shuffle(tail)
    return np.concatenate([head, tail])


def ltor_masks_and_position_ids(
    tokens: np.ndarray,
    eod: int,
    eod_mask_loss: bool,
    reset_position_ids: bool,
    reset_attention_mask: bool,
) -> dict[str, torch.Tensor]:
    """Loss mask, position ids and (under reset_attention_mask) the per-document causal mask.

    A document's segment ends with (and includes) its eod token: positions restart after each eod
    under reset_position_ids, and a token attends only within its segment under
    reset_attention_mask.
    """
    s = len(tokens)
    is_eod = tokens == eod
    loss_mask = np.ones(s, dtype=np.float32)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    positions = np.arange(s, dtype=np.int64)
    segment = None
    if reset_position_ids or reset_attention_mask:
        eod_at = np.flatnonzero(is_eod)
        segment = np.searchsorted(eod_at, positions, side="left")  # eods strictly before
    out = {"loss_mask": torch.from_numpy(loss_mask)}
    if reset_position_ids:
        starts = np.where(segment > 0, eod_at[np.maximum(segment - 1, 0)] + 1, 0)
        out["position_ids"] = torch.from_numpy(positions - starts)
    else:
        out["position_ids"] = torch.from_numpy(positions)
    if reset_attention_mask:
        allowed = (positions[None, :] <= positions[:, None]) & (
            segment[None, :] == segment[:, None]
        )
        out["attention_mask"] = torch.from_numpy(~allowed[None])
    return out


class MockGPTLowLevelDataset:
    """Deterministic synthetic documents (the `.bin/.idx` reader's interface) for --mock-data:
    100,000 documents of 1 to 4095 tokens (numpy default_rng(0), as megatron-core's mock), each a
    run of ids counting up from 1 (wrapping below the vocabulary size) and ending in eod."""

    size, max_sequence_length = 100_000, 4096

    def __init__(self, tokenizer) -> None:
        rng = np.random.default_rng(0)
        self.sequence_lengths = rng.integers(
            1, self.max_sequence_length, size=self.size, dtype=np.int32
        )
        self.eod = tokenizer.eod
        self.wrap = max(1, min(tokenizer.vocab_size, self.max_sequence_length) - 2)

    def __len__(self) -> int:
        return self.size

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        n = int(self.sequence_lengths[idx])
        doc = np.empty(n, dtype=np.int64)
        doc[:-1] = 1 + (np.arange(n - 1) + idx) % self.wrap
        doc[-1] = self.eod
        if length is None:
            length = n - offset
        return doc[offset : offset + length]


def default_cache_dir(path_prefix: str, data_cache_path: str | None) -> str:
    """--data-cache-path, else `{prefix}/cache/GPTDataset_indices` (megatron-core's default)."""
    if data_cache_path:
        return data_cache_path
    return os.path.join(path_prefix, "cache", "GPTDataset_indices")
