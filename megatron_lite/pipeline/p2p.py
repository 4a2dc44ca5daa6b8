"""Point-to-point transfers between neighbouring pipeline stages, device-agnostic.

Every exchange is one `batch_isend_irecv` call holding all sends and receives a rank makes at that
point (blocking send-then-receive on both sides deadlocks). Tensors live on whatever device the caller's
buffers are on, so the same code runs on gloo/CPU and NCCL/CUDA; nothing here talks to CUDA.

A failing stage must not leave its peers blocked for the whole collective timeout. `signal_abort`
writes the error into the process group's key-value store, and `wait_all` polls that key while it waits,
so every rank of the job raises `PipelineAborted` within about a second. (On gloo a dead peer's closed
sockets already fail the receives of its neighbours; NCCL needs the store, or the launcher.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

ABORT_KEY = "megatron_lite/pipeline_abort"
_MAX_DIMS = 8  # variable-shape mode: a shape travels as [ndim, d0, ..., d7]
_ABORT_POLL_S = 0.5


class PipelineAborted(RuntimeError):
    """Another rank's pipeline stage failed; the message carries its error."""


def _store() -> dist.Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default group or a backend without a store: nothing to signal through
        return None


def signal_abort(message: str) -> None:
    """Tell every rank that this one failed (best effort: never raises)."""
    try:
        store = _store()
        if store is not None:
            store.set(ABORT_KEY, message)
    except Exception:
        pass


def check_abort() -> None:
    store = _store()
    if store is not None and store.check([ABORT_KEY]):
        raise PipelineAborted(store.get(ABORT_KEY).decode(errors="replace"))


def wait_all(reqs: Sequence[dist.Work]) -> None:
    """Wait for `reqs`, raising `PipelineAborted` if another rank signalled a failure meanwhile."""
    pending = list(reqs)
    sleep, last_check = 0.0, time.monotonic()
    while pending:
        pending = [r for r in pending if not r.is_completed()]
        if not pending:
            break
        if time.monotonic() - last_check > _ABORT_POLL_S:
            check_abort()
            last_check = time.monotonic()
        time.sleep(sleep)  # back off up to 2 ms: spinning ranks would starve computing ones
        sleep = min(2e-3, sleep * 2 + 1e-5)
    for r in reqs:
        r.wait()  # completed; raises if the transfer failed (e.g. a peer died)


def _exchange(
    sends: Sequence[tuple[torch.Tensor, int]],
    recvs: Sequence[torch.Tensor | None],
    recv_peers: Sequence[int],
    group: dist.ProcessGroup | None,
) -> None:
    ops = [dist.P2POp(dist.isend, t, peer, group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for t, peer in zip(recvs, recv_peers)]
    if ops:
        wait_all(dist.batch_isend_irecv(ops))


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
