"""A KV cache of many sequences, each at its own length: what continuous batching decodes against.

`InferenceParams` (model/transformer.py) keeps one offset for the whole batch, so every sequence of
a batch must start together. Here each of `slots` rows has its own length: a step runs any subset
of rows (`select`) and writes each row's new keys/values right after that row's cached ones. The
attention then sees each row's keys right-aligned, as left padding would lay them out: the step's
queries are the last s of T key columns for every row (T = the longest row's length after the
step), the columns before a shorter row's first token are masked, and a key's distance from a
query in columns is its distance in positions, so the sliding window (which counts columns from the
right) holds for every row.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.model import InferenceParams


class SlotKVCache(InferenceParams):
    """Keys/values [max_len, slots, ng, d] per layer; `lengths[r]` tokens of row r are cached.

    Call `select(rows)` before a step's forward and `advance(n)` after it (n real tokens per row:
    a step's padding after them, sequence-parallel or a shorter prompt's, is overwritten next).
    """

    def __init__(self, slots: int, max_sequence_length: int):
        super().__init__(slots, max_sequence_length)
        self.lengths = torch.zeros(slots, dtype=torch.long)  # cached tokens per row
        self.rows = torch.zeros(0, dtype=torch.long)  # this step's rows, in batch order
        self.start = torch.zeros(0, dtype=torch.long)  # their lengths when the step began
        self._step: dict = {}  # what every layer of this step shares: key columns, the mask

    def reset(self, row: int) -> None:
        """Row `row` holds no tokens (a new sequence takes it)."""
        self.lengths[row] = 0

    def select(self, rows: list[int]) -> None:
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.start = self.lengths[self.rows]
        self._step = {}

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

    def _columns(self, s: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(position of each key column per row [T, b], clamped to 0; the shift [b] of each row:
        its columns before it are not its tokens); once per step, for all the layers."""
        if ("columns", s, device) not in self._step:
            self._step["columns", s, device] = self._key_columns(s, device)
        return self._step["columns", s, device]

    def _key_columns(self, s: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + s
        width = int(end.max())
        if width > self.max_sequence_length:
            raise ValueError(
                f"KV cache holds {self.max_sequence_length} tokens per sequence; this step "
                f"needs {width}"
            )
        shift = (width - end).to(device)
        pos = torch.arange(width, device=device)[:, None] - shift[None]  # [T, b]
        return pos.clamp(min=0), shift

    def update(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [s, b, ng, d] after each row's cached tokens; -> each row's keys and values
        right-aligned, [T, b, ng, d] (a shorter row's first columns: masked)."""
        s = k.shape[0]
        if layer not in self.key_value_memory:  # zeros: a masked column must not hold a NaN
            shape = (self.max_sequence_length, self.max_batch_size, *k.shape[2:])
            self.key_value_memory[layer] = (k.new_zeros(shape), v.new_zeros(shape))
        k_cache, v_cache = self.key_value_memory[layer]
        cols, _ = self._columns(s, k.device)  # checks the length before any write
        block = self._block()
        if block is not None:  # rows side by side, all at one length: views, no gather
            lo, hi = int(self.start[0]), int(self.start[0]) + s
            k_cache[lo:hi, block], v_cache[lo:hi, block] = k, v
            return k_cache[:hi, block], v_cache[:hi, block]
        rows = self.rows.to(k.device)[None]
        new = self.position_ids(s, k.device).T  # [s, b]
        k_cache[new, rows] = k
        v_cache[new, rows] = v
        return k_cache[cols, rows], v_cache[cols, rows]

    def _block(self) -> slice | None:
        """The step's slots as one slice when they are consecutive and equally long (one request,
        or a batch started together): then each row's keys are a view of the cache."""
        if "block" not in self._step:
            r, n = self.rows, len(self.rows)
            same = n > 0 and bool(
                (r == r[0] + torch.arange(n)).all() and (self.start == self.start[0]).all()
            )
            self._step["block"] = slice(int(r[0]), int(r[0]) + n) if same else None
        return self._step["block"]

    def causal_mask(self, s: int, device: torch.device) -> torch.Tensor:
        """[b, 1, s, T], True = masked: query i (column T - s + i) sees the columns up to its own,
        from its row's first token on."""
        if ("mask", s, device) not in self._step:
            self._step["mask", s, device] = self._mask(s, device)
        return self._step["mask", s, device]

    def _mask(self, s: int, device: torch.device) -> torch.Tensor:
        _, shift = self._columns(s, device)
        width = int((self.start + s).max())
        col = torch.arange(width, device=device)
        future = col[None] > (width - s + torch.arange(s, device=device))[:, None]  # [s, T]
        before = col[None] < shift[:, None]  # [b, T]
        return (future[None] | before[:, None])[:, None]
