"""After the last backward of a step: make every gradient the full-batch gradient of the full model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_lite import comm
from megatron_lite.tensor_parallel.utils import tag_of

if TYPE_CHECKING:
    from megatron_lite.parallel_state import ParallelState


def grad_of(p: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient a step reads: DDP's `main_grad` (a view of its buffer) where DDP keeps one, else
    autograd's `.grad`."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


def _params(chunks: list[torch.nn.Module], tag: str) -> list[torch.nn.Parameter]:
    return [p for c in chunks for p in c.parameters() if p.requires_grad and tag_of(p, tag)]


def _allreduce_coalesced(grads: list[torch.Tensor], group: comm.Group) -> None:
    """One all-reduce for many small tensors (flatten, reduce, copy back)."""
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    comm.all_reduce(flat, group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def allreduce_sequence_parallel_grads(chunks: list[torch.nn.Module], ps: ParallelState) -> None:
    """Sum the partial gradients of `sequence_parallel` parameters (norms, row-parallel biases) over tp.

    Under sequence parallelism each tp rank saw only its slice of the sequence.
    """
    if ps.tp_size == 1:
        return
    grads = [grad_of(p) for p in _params(chunks, "sequence_parallel")]
    _allreduce_coalesced([g for g in grads if g is not None], ps.tp_group)


def allreduce_embedding_grads(chunks: list[torch.nn.Module], ps: ParallelState) -> None:
    """Tied word embeddings across the pipeline: the first stage's input embedding and the last
    stage's output layer are one matrix held twice, kept equal by summing the gradients of the
    parameters tagged `shared_embedding` over the embedding group (Megatron's: first + last stage
    of each pipeline). A no-op off the group, with one stage, or with untied embeddings."""
    if ps.embedding_group is None or comm.group_size(ps.embedding_group) < 2:
        return
    grads = []
    for p in _params(chunks, "shared_embedding"):
        g = grad_of(p)
        if g is None:  # no gradient yet this step: the peer's must still be summed in
            g = p.grad = torch.zeros_like(p)
        grads.append(g)
    _allreduce_coalesced(grads, ps.embedding_group)


def finalize_model_grads(chunks: list[torch.nn.Module], ps: ParallelState) -> None:
    """DP reduction, then tp all-reduce of sequence-parallel grads, then the tied-embedding all-reduce.

    The order is safe under the distributed optimizer too: the tp peers hold identical buffer layouts,
    and a shared embedding sits alone in its bucket, so each rank's reduced shard lines up with its peers'.
    """
    for c in chunks:
        if hasattr(c, "finish_grad_sync"):
            c.finish_grad_sync()
    allreduce_sequence_parallel_grads(chunks, ps)
    allreduce_embedding_grads(chunks, ps)
