"""A KV cache of many sequences, each at its own length: what continuous batching decodes against.

`InferenceParams` (model/transformer.py) keeps one offset for the whole batch, so every sequence of
a batch must start together. Here each of `slots` rows has its own length: a step runs any subset
of rows (`select`), writes each row's new keys/values right after that row's cached ones, and
masks, per row, the slots past its own length. A newcomer's prompt runs as a step of its own row
while the other rows wait; a decode step then runs one token of every active row together.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.model import InferenceParams


class SlotKVCache(InferenceParams):
    """Keys/values [max_len, slots, ng, d] per layer; `lengths[r]` tokens of row r are cached.

    Call `select(rows)` before a step's forward and `advance(n)` after it (n real tokens per row:
    a sequence-parallel step's padding after them is overwritten by the next step).
    """

    def __init__(self, slots: int, max_sequence_length: int):
        super().__init__(slots, max_sequence_length)
        self.lengths = torch.zeros(slots, dtype=torch.long)  # cached tokens per row
        self.rows = torch.zeros(0, dtype=torch.long)  # this step's rows, in batch order
        self.start = torch.zeros(0, dtype=torch.long)  # their lengths when the step began

    def reset(self, row: int) -> None:
        """Row `row` holds no tokens (a new sequence takes it)."""
        self.lengths[row] = 0

    def select(self, rows: list[int]) -> None:
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.start = self.lengths[self.rows]

    def advance(self, n: int | torch.Tensor) -> None:
        """The step's rows hold `n` (per row: [b]) more tokens."""
        self.lengths[self.rows] += n

    def position_ids(self, s: int, device: torch.device | None = None) -> torch.Tensor:
        """[b, s]: each row continues from its own length."""
        return (self.start[:, None] + torch.arange(s)[None]).to(device)

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor, s: int):
        """[s, b, 1, d]: each row's own positions of the tables [max_len, 1, 1, d]."""
        pos = self.position_ids(s, cos.device).T  # [s, b]
        return cos[:, 0, 0][pos][:, :, None], sin[:, 0, 0][pos][:, :, None]

    def update(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [s, b, ng, d] after each row's cached tokens; -> the rows' keys and values
        [T, b, ng, d], T = the longest row's length after the step (shorter rows: masked)."""
        s, b = k.shape[:2]
        end = int(self.start.max()) + s
        if end > self.max_sequence_length:
            raise ValueError(
                f"KV cache holds {self.max_sequence_length} tokens per sequence; this step needs {end}"
            )
        if layer not in self.key_value_memory:  # zeros: a masked slot must not hold a NaN
            shape = (self.max_sequence_length, self.max_batch_size, *k.shape[2:])
            self.key_value_memory[layer] = (k.new_zeros(shape), v.new_zeros(shape))
        k_cache, v_cache = self.key_value_memory[layer]
        rows = self.rows.to(k.device)
        pos = self.position_ids(s, k.device).T  # [s, b]
        k_cache[pos, rows[None]] = k
        v_cache[pos, rows[None]] = v
        return k_cache[:end, rows], v_cache[:end, rows]

    def causal_mask(self, s: int, device: torch.device) -> torch.Tensor:
        """[b, 1, s, T], True = masked: query i of row r (at position start[r] + i) sees that row's
        keys up to its own position and nothing past it."""
        end = int(self.start.max()) + s
        own = self.position_ids(s, device)[:, None, :, None]  # [b, 1, s, 1]
        return torch.arange(end, device=device)[None, None, None] > own
