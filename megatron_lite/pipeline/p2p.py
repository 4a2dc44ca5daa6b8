"""Point-to-point transfers between neighbouring pipeline stages, device-agnostic.

Every exchange is one `batch_isend_irecv` call holding all sends and receives a rank makes at that
point (blocking send-then-receive on both sides deadlocks). Tensors live on whatever device the caller's
buffers are on, so the same code runs on gloo/CPU and NCCL/CUDA; nothing here talks to CUDA.

Transfers know nothing of failures: `pipeline/abort.py` turns a failed stage into an error on
every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

_MAX_DIMS = 8  # variable-shape mode: a shape travels as [ndim, d0, ..., d7]


def _exchange(
    sends: Sequence[tuple[torch.Tensor, int]],
    recvs: Sequence[torch.Tensor | None],
    recv_peers: Sequence[int],
    group: dist.ProcessGroup | None,
) -> None:
    ops = [dist.P2POp(dist.isend, t, peer, group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for t, peer in zip(recvs, recv_peers)]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def communicate(
    sends: Sequence[tuple[torch.Tensor, int]],
    recv_peers: Sequence[int],
    *,
    shape: Sequence[int] | None,
    dtype: torch.dtype,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> list[torch.Tensor]:
    """Send each `(tensor, global_rank)` and receive one tensor from each peer in `recv_peers`, all in
    one batch. With `shape` given every received tensor has it; with `shape=None` (variable-shape mode)
    the shapes travel first, in a batch paired exactly like the data batch."""
    if shape is None:
        shapes = [_encode_shape(t.shape, device) for t, _ in sends]
        boxes = [torch.empty(_MAX_DIMS + 1, dtype=torch.int64, device=device) for _ in recv_peers]
        _exchange(list(zip(shapes, (peer for _, peer in sends))), boxes, recv_peers, group)
        recv_shapes = [_decode_shape(b) for b in boxes]
    else:
        recv_shapes = [tuple(shape)] * len(recv_peers)
    bufs = [torch.empty(s, dtype=dtype, device=device) for s in recv_shapes]
    _exchange([(t.contiguous(), peer) for t, peer in sends], bufs, recv_peers, group)
    return bufs


def _encode_shape(shape: torch.Size, device: torch.device) -> torch.Tensor:
    if len(shape) > _MAX_DIMS:
        raise ValueError(f"variable-shape p2p supports up to {_MAX_DIMS} dims, got {tuple(shape)}")
    padded = [len(shape), *shape] + [0] * (_MAX_DIMS - len(shape))
    return torch.tensor(padded, dtype=torch.int64, device=device)


def _decode_shape(box: torch.Tensor) -> tuple[int, ...]:
    vals = box.tolist()
    return tuple(vals[1 : 1 + vals[0]])
