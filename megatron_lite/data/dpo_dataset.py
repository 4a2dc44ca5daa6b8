"""Preference pairs for DPO (`--dpo`), and the frozen reference's log-probabilities beside them.

On disk (tools/preprocess_sft_data.py --task dpo): Megatron `.bin/.idx` tokens where each document
is one pair, two sequences (chosen, then rejected), and the `_loss_mask` pair of files marking each
sequence's response tokens. `{prefix}_reference.npy` ([pairs, 2] float64: the reference model's
log-probability of the chosen and the rejected response) and `{prefix}_reference.json` (the
checkpoint, the --seq-length and a digest of the pairs' files it was computed with: a reference of
other data, even with as many pairs, is refused) are written once by tools/dpo_reference.py from
the starting checkpoint: the reference never changes during training, so computing it once
replaces a second, frozen model in memory and its forward passes at every step.

A sample is one pair: tokens, labels, loss_mask and position_ids of shape [2, seq_length] (each
sequence in its own right-padded row, cut to seq_length + 1 tokens) and `reference_logps` [2].
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from megatron_lite.data.conversations import loss_mask_prefix
from megatron_lite.data.indexed_dataset import data_file_path, index_file_path
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


def data_digest(prefix: str) -> str:
    """sha256 of the pairs' token and loss-mask files (`.bin` and `.idx`): what binds a reference."""
    h = hashlib.sha256()
    for p in (prefix, loss_mask_prefix(prefix)):
        for path in (index_file_path(p), data_file_path(p)):
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def _read_reference(npy: str, meta: str, rebuild: str) -> tuple[np.ndarray, dict]:
    """The stored arrays and metadata, or a DataError naming the file that cannot be read."""
    try:
        logps = np.load(npy, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{npy}: not a reference log-probability array ({e}): {rebuild}") from None
    if not isinstance(logps, np.ndarray) or logps.dtype.kind != "f":
        raise DataError(f"{npy}: holds {getattr(logps, 'dtype', type(logps))}, expected float64 "
                        f"log-probabilities: {rebuild}")  # fmt: skip
    try:
        with open(meta, encoding="utf-8") as f:
            info = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{meta}: not the reference's metadata ({e}): {rebuild}") from None
    if not isinstance(info, dict):
        raise DataError(f"{meta}: expected a JSON object, found {type(info).__name__}: {rebuild}")
    return logps, info


def load_reference(prefix: str, num_pairs: int, seq_length: int) -> np.ndarray:
    """The stored reference log-probabilities of the pairs at `prefix`, checked to fit them."""
    npy, meta = reference_paths(prefix)
    rebuild = (
        f"compute the reference log-probabilities once with the starting checkpoint: "
        f"python tools/dpo_reference.py --load CHECKPOINT --data-path {prefix}"
    )
    if not os.path.isfile(npy) or not os.path.isfile(meta):
        raise DataError(f"--dpo: {npy} not found: {rebuild}")
    logps, info = _read_reference(npy, meta, rebuild)
    if logps.shape != (num_pairs, 2):
        raise DataError(
            f"{npy}: shape {logps.shape}, but {prefix} holds {num_pairs} pairs: rerun "
            "tools/dpo_reference.py on this data"
        )
    if info.get("data_digest") != data_digest(prefix):
        raise DataError(
            f"{npy} was computed from other pairs than {prefix}'s (its data digest differs, or "
            f"{meta} has none): {rebuild}"
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
