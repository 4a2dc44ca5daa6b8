"""Preference pairs for DPO (`--dpo`), and the frozen reference's log-probabilities beside them.

On disk (tools/preprocess_sft_data.py --task dpo): Megatron `.bin/.idx` tokens where each document
is one pair, two sequences (chosen, then rejected), and the `_loss_mask` pair of files marking each
sequence's response tokens. `{prefix}_reference.npy` ([pairs, 2] float64: the reference model's
log-probability of the chosen and the rejected response) and `{prefix}_reference.json` (the
checkpoint and --seq-length it was computed with) are written once by tools/dpo_reference.py from
the starting checkpoint: the reference never changes during training, so computing it once
replaces a second, frozen model in memory and its forward passes at every step.

A sample is one pair: tokens, labels, loss_mask and position_ids of shape [2, seq_length] (each
sequence in its own right-padded row, cut to seq_length + 1 tokens) and `reference_logps` [2].
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from megatron_lite.data.sft_dataset import MaskedSplit
from megatron_lite.errors import DataError


def reference_paths(prefix: str) -> tuple[str, str]:
    """(log-probabilities .npy, metadata .json) of the reference model for pairs at `prefix`."""
    return f"{prefix}_reference.npy", f"{prefix}_reference.json"


def pair_rows(
    sequences: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Rows [n, s] of sequences, each (ids, mask) cut to seq_length + 1 tokens and right-padded:
    causal attention keeps the padding out of the real tokens, so no attention mask is needed."""
    n, cap = len(sequences), seq_length + 1
    ids = np.full((n, cap), pad_id, np.int64)
    mask = np.zeros((n, cap), np.float32)
    for r, (t, m) in enumerate(sequences):
        k = min(len(t), cap)
        ids[r, :k], mask[r, :k] = t[:k], m[:k]
    return {
        "tokens": torch.from_numpy(ids[:, :-1].copy()),
        "labels": torch.from_numpy(ids[:, 1:].copy()),
        "loss_mask": torch.from_numpy(mask[:, 1:].copy()),
        "position_ids": torch.arange(seq_length).expand(n, seq_length).clone(),
    }


def load_reference(prefix: str, num_pairs: int, seq_length: int) -> np.ndarray:
    """The stored reference log-probabilities of the pairs at `prefix`, checked to fit them."""
    npy, meta = reference_paths(prefix)
    if not os.path.isfile(npy) or not os.path.isfile(meta):
        raise DataError(
            f"--dpo: {npy} not found: compute the reference log-probabilities once with the "
            f"starting checkpoint: python tools/dpo_reference.py --load CHECKPOINT --data-path "
            f"{prefix}"
        )
    logps = np.load(npy)
    with open(meta, encoding="utf-8") as f:
        info = json.load(f)
    if logps.shape != (num_pairs, 2):
        raise DataError(
            f"{npy}: shape {logps.shape}, but {prefix} holds {num_pairs} pairs: rerun "
            "tools/dpo_reference.py on this data"
        )
    if info.get("seq_length") != seq_length:
        raise DataError(
            f"{npy} was computed with --seq-length {info.get('seq_length')}, this run has "
            f"--seq-length {seq_length}: rerun tools/dpo_reference.py --seq-length {seq_length}"
        )
    return logps


class DPODataset(MaskedSplit):
    """Pairs `document_ids` of a MaskedDataset in a seeded random order, epoch after epoch."""

    def _index(self, ids: np.ndarray, num_samples: int | None, rng) -> None:
        dataset = self.dataset
        counts = np.diff(dataset.tokens.document_indices)
        if len(counts) and not np.all(counts == 2):
            raise DataError(
                f"{self.path_prefix}: not preference pairs (documents of {sorted(set(counts))} "
                "sequences, expected 2): write it with tools/preprocess_sft_data.py --task dpo"
            )
        self.reference = load_reference(self.path_prefix, len(dataset), self.seq_length)
        epochs = 1 if num_samples is None else -(-num_samples // len(ids))
        self.order = np.concatenate([rng.permutation(ids) for _ in range(epochs)])

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        doc = int(self.order[idx])
        seqs = self.dataset[doc]
        self.dataset.check_vocab(seqs, self.vocab_size, [doc])
        item = pair_rows(seqs, self.seq_length, self.pad_id)
        item["reference_logps"] = torch.from_numpy(self.reference[doc].astype(np.float64))
        return item
