"""Sampling a token from logits, and the answer of one generated sequence.

temperature 0 (or top_k 1) is greedy; otherwise the logits are scaled, filtered (top-k, top-p) and
one token drawn with the sequence's own generator, in fp32 on the CPU so that every device draws
alike and a seed gives the same tokens everywhere (`generate`, `generate_batch`, the server).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """temperature 0 (or top_k 1) is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool)) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """Next token ids [b] from logits [b, vocab] (fp32 on the CPU, so every device draws alike)."""
    logits = logits.float().cpu()
    if params.greedy:
        return logits.argmax(-1)
    # scaled from the max (0 there, <= 0 elsewhere): any temperature > 0 stays finite, and one so
    # small that every other token underflows to -inf is greedy (1e-40 used to give NaN probs)
    logits = (logits - logits.max(-1, keepdim=True).values) / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1:
        # keep the most likely tokens until their mass reaches top_p (always the first one)
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -math.inf))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class GenerationOutput:
    tokens: list[int]  # the new tokens (the end-of-document token included when it stopped there)
    finish_reason: str  # "eod", "length", "stop" (or "cancelled": the server's client went away)
    step_logits: list[torch.Tensor] | None = None  # [vocab] fp32 per step (last stage), on request
