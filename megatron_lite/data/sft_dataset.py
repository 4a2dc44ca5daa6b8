"""Supervised fine-tuning data (`--sft`): whole conversations packed into `seq_length` rows.

On disk (written by tools/preprocess_sft_data.py), Megatron's `.bin/.idx` format twice:
`{prefix}.bin/.idx` the tokens, one sequence per conversation (what Megatron's GPT reader reads),
and `{prefix}_loss_mask.bin/.idx` a 0/1 uint8 sequence of the same length per conversation, 1 on
the assistant's tokens (their end token included).

A sample is a row of `seq_length + 1` tokens holding whole conversations, in a seeded random
order, packed next-fit (a conversation that does not fit in the row's free space starts the next
row; one longer than a row is cut to it); the rest of the row is padding. Packed conversations do
not see each other: position ids restart and attention stays within each conversation (Megatron's
--reset-position-ids / --reset-attention-mask, at conversation rather than end-of-document
boundaries, since a conversation holds an end token per turn). Only assistant tokens count in the
loss, and never a label across a boundary.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from megatron_lite.data.conversations import loss_mask_prefix
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.errors import DataError

logger = logging.getLogger(__name__)


class MaskedDataset:
    """A token `.bin/.idx` pair and its loss masks; item i is document i's sequences, each
    (ids, mask) (one per SFT conversation, two per DPO pair: chosen, rejected)."""

    def __init__(self, prefix: str) -> None:
        self.path_prefix = prefix
        self.tokens, self.masks = IndexedDataset(prefix), IndexedDataset(loss_mask_prefix(prefix))
        t, m = self.tokens, self.masks
        if not np.array_equal(t.sequence_lengths, m.sequence_lengths) or not np.array_equal(
            t.document_indices, m.document_indices
        ):
            raise DataError(
                f"{loss_mask_prefix(prefix)}: its sequences differ from {prefix}'s: the pair was "
                "not written together (rerun tools/preprocess_sft_data.py)"
            )

    def __len__(self) -> int:
        return self.tokens.num_documents

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (all its sequences)."""
        ends = np.concatenate(([0], np.cumsum(self.tokens.sequence_lengths, dtype=np.int64)))
        return ends[self.tokens.document_indices[1:]] - ends[self.tokens.document_indices[:-1]]

    def __getitem__(self, doc: int) -> list[tuple[np.ndarray, np.ndarray]]:
        lo, hi = self.tokens.document_indices[doc], self.tokens.document_indices[doc + 1]
        return [(self.tokens.get(int(i)), self.masks.get(int(i))) for i in range(lo, hi)]

    def check_vocab(self, seqs: list[tuple[np.ndarray, np.ndarray]], vocab_size: int, docs) -> None:
        """DataError when a token id is outside the vocabulary (data of another tokenizer)."""
        top = max((int(t.max()) for t, _ in seqs if len(t)), default=0)
        if top >= vocab_size:
            raise DataError(
                f"{self.path_prefix}: document(s) {list(docs)} hold token id {top}, outside the "
                f"tokenizer's vocabulary of {vocab_size}: the data was made with another "
                "tokenizer (rerun tools/preprocess_sft_data.py with this one)"
            )


def pack_next_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Row starts (indices into `lengths`, plus the end) of next-fit packing into `capacity`."""
    starts, used = [0], 0
    for i, n in enumerate(np.minimum(lengths, capacity).tolist()):
        if used + n > capacity:
            starts.append(i)
            used = 0
        used += n
    starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


def packed_sample(
    conversations: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """One training row from whole conversations, each (ids, 0/1 mask), cut to fit.

    tokens/labels [s], loss_mask [s] (the label is an assistant token of the same conversation),
    position_ids [s] (restarting per conversation), attention_mask [1, s, s] (True = masked).
    """
    cap = seq_length + 1
    ids, mask, seg, used = [], [], [], 0
    for k, (t, m) in enumerate(conversations):
        n = min(len(t), cap - used)
        ids.append(np.asarray(t[:n], np.int64))
        mask.append(np.asarray(m[:n], np.float32))
        seg.append(np.full(n, k, np.int64))
        used += n
    pad = cap - used  # padding: one more segment, never in the loss
    ids.append(np.full(pad, pad_id, np.int64))
    mask.append(np.zeros(pad, np.float32))
    seg.append(np.full(pad, len(conversations), np.int64))
    row, row_mask, row_seg = np.concatenate(ids), np.concatenate(mask), np.concatenate(seg)
    seg_in = row_seg[:-1]
    loss_mask = row_mask[1:] * (row_seg[1:] == seg_in)
    positions = np.arange(seq_length)
    first = np.searchsorted(seg_in, seg_in, side="left")  # segments are sorted: first index
    allowed = (positions[None, :] <= positions[:, None]) & (seg_in[None, :] == seg_in[:, None])
    return {
        "tokens": torch.from_numpy(row[:-1].copy()),
        "labels": torch.from_numpy(row[1:].copy()),
        "loss_mask": torch.from_numpy(loss_mask.astype(np.float32)),
        "position_ids": torch.from_numpy(positions - first),
        "attention_mask": torch.from_numpy(~allowed[None]),
    }


class MaskedSplit(torch.utils.data.Dataset):
    """What the SFT and DPO samples of one split share: the files, the split's documents
    (`document_ids`, checked non-empty), the row length and the padding id; `_index` builds the
    sample order from `num_samples` and `seed`."""

    def __init__(
        self,
        dataset: MaskedDataset,
        document_ids: np.ndarray,
        num_samples: int | None,
        split_name: str,
        *,
        seq_length: int,
        seed: int,
        tokenizer,
    ) -> None:
        self.dataset, self.split_name = dataset, split_name
        self.path_prefix = dataset.path_prefix
        self.seq_length, self.pad_id = seq_length, int(tokenizer.eod)
        self.vocab_size = tokenizer.vocab_size
        self.identifiers = {"class": type(self).__name__, "dataset_path": self.path_prefix}
        document_ids = np.asarray(document_ids, dtype=np.int64)
        if len(document_ids) == 0:
            raise DataError(f"the {split_name} split of {self.path_prefix} has no documents")
        self._index(document_ids, num_samples, np.random.RandomState(seed))

    def _index(self, document_ids: np.ndarray, num_samples: int | None, rng) -> None:
        raise NotImplementedError


class SFTDataset(MaskedSplit):
    """Rows of packed conversations from the sequences `document_ids` of `prefix`'s files."""

    def _index(self, document_ids: np.ndarray, num_samples: int | None, rng) -> None:
        seq_length, prefix, dataset = self.seq_length, self.path_prefix, self.dataset
        if np.any(np.diff(dataset.tokens.document_indices) != 1):
            raise DataError(
                f"{prefix}: documents of more than one sequence (DPO pairs?): --sft trains on "
                "conversations from tools/preprocess_sft_data.py --task sft (pairs need --dpo)"
            )
        lengths = dataset.document_lengths()
        long = int(np.count_nonzero(lengths[document_ids] > seq_length + 1))
        if long:
            logger.warning(
                "%s: %d of %d %s conversations are longer than --seq-length %d + 1 and are cut",
                prefix, long, len(document_ids), self.split_name, seq_length,
            )  # fmt: skip
        # epochs (each its own shuffle, packed on its own) until there are num_samples rows
        orders, starts, offset, rows = [], [np.zeros(1, np.int64)], 0, 0
        while rows == 0 or (num_samples is not None and rows < num_samples):
            order = document_ids.copy()
            rng.shuffle(order)
            orders.append(order)
            starts.append(pack_next_fit(lengths[order], seq_length + 1)[1:] + offset)
            offset, rows = offset + len(order), rows + len(starts[-1])
        self.order, self.row_starts = np.concatenate(orders), np.concatenate(starts)

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    def conversations(self, idx: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The (ids, mask) of the conversations packed in row `idx`."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for a dataset of {len(self)}")
        docs = self.order[self.row_starts[idx] : self.row_starts[idx + 1]]
        out = [seq for d in docs for seq in self.dataset[int(d)]]
        self.dataset.check_vocab(out, self.vocab_size, docs.tolist())
        return out

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return packed_sample(self.conversations(int(idx)), self.seq_length, self.pad_id)
