"""Tied word embeddings across the pipeline: the first stage's input embedding and the last stage's
output layer are one matrix held twice, kept equal by summing their gradients (Megatron's
embedding group: first + last stage of each pipeline)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def allreduce_embedding_grads(chunks: list[torch.nn.Module], ps: Any) -> None:
    """All-reduce the gradients (`main_grad` when DDP keeps one) of parameters tagged
    `shared_embedding` over `ps.embedding_group`; a no-op off the group or with one stage."""
    if ps.embedding_group is None or len(ps.embedding_ranks) < 2:
        return
    grads = []
    for chunk in chunks:
        for p in chunk.parameters():
            if getattr(p, "shared_embedding", False):
                g = p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
                if g is None:  # no gradient yet this step: the peer's must still be summed in
                    g = p.grad = torch.zeros_like(p)
                grads.append(g)
    if not grads:  # untied embeddings: nothing is shared
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=ps.embedding_group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
