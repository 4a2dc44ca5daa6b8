"""After the last backward of a step: make every gradient the full-batch gradient of the full model."""

from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron_lite.distributed import comm


def _grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    return p.main_grad if hasattr(p, "main_grad") else p.grad


def _params(chunks, tag: str) -> list[torch.nn.Parameter]:
    return [p for c in chunks for p in c.parameters() if p.requires_grad and getattr(p, tag, False)]


def _allreduce_coalesced(grads: list[torch.Tensor], group) -> None:
    """One all-reduce for many small tensors (flatten, reduce, copy back)."""
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    comm.all_reduce(flat, group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def allreduce_sequence_parallel_grads(chunks, ps) -> None:
    """Sum the partial gradients of `sequence_parallel` parameters (norms, row-parallel biases) over tp.

    Under sequence parallelism each tp rank saw only its slice of the sequence.
    """
    if ps.tp_size == 1:
        return
    grads = [_grad(p) for p in _params(chunks, "sequence_parallel")]
    _allreduce_coalesced([g for g in grads if g is not None], ps.tp_group)


def allreduce_shared_embedding_grads(chunks, ps) -> None:
    """Sum the tied word-embedding gradient of the first and last stage over the embedding group."""
    if ps.embedding_group is None or comm.group_size(ps.embedding_group) == 1:
        return
    grads = [_grad(p) for p in _params(chunks, "shared_embedding")]
    _allreduce_coalesced([g for g in grads if g is not None], ps.embedding_group)


def finalize_model_grads(chunks, ps) -> None:
    """DP reduction, then tp all-reduce of sequence-parallel grads, then the tied-embedding all-reduce.

    The order is safe under the distributed optimizer too: the tp peers hold identical buffer layouts,
    and a shared embedding sits alone in its bucket, so each rank's reduced shard lines up with its peers'.
    """
    for c in chunks:
        if hasattr(c, "finish_grad_sync"):
            c.finish_grad_sync()
    allreduce_sequence_parallel_grads(chunks, ps)
    try:  # the pipeline's version when it exists (it owns the embedding group's semantics)
        from megatron_lite.pipeline import allreduce_embedding_grads
    except ImportError:
        allreduce_embedding_grads = allreduce_shared_embedding_grads
    allreduce_embedding_grads(chunks, ps)
