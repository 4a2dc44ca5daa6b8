"""Point-to-point transfers between neighbouring pipeline stages, device-agnostic.

Every exchange is one `batch_isend_irecv` call holding all sends and receives a rank makes at that
point (blocking send-then-receive on both sides deadlocks). Tensors live on whatever device the caller's
buffers are on, so the same code runs on gloo/CPU and NCCL/CUDA; nothing here talks to CUDA.

A failing stage must not leave its peers blocked for the whole collective timeout. The failing rank
writes its error into the process group's key-value store (`signal_abort`) and raises; its process
exits, which on gloo at once fails the transfers its neighbours wait on, and they raise
`PipelineAborted` with the first failure's message and exit too, down the pipeline. A watchdog thread
on every rank polls that key: when it appears it aborts the rank's process groups (what unblocks
NCCL transfers), and a rank still blocked in a pipeline transfer `_EXIT_GRACE_S` later exits with the
message (a gloo rank waiting on a live but stuck peer), as NCCL's own watchdog would. Call
`stop_watchdog()` before destroying the process group.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

ABORT_KEY = "megatron_lite/pipeline_abort"
_MAX_DIMS = 8  # variable-shape mode: a shape travels as [ndim, d0, ..., d7]
_POLL_S = 0.5
_EXIT_GRACE_S = 10.0
_waiting = 0  # pipeline transfers this process is blocked in (read by the watchdog)
_watched: list[dist.ProcessGroup] = []
_watchdog_pid: int | None = None
_watchdog: threading.Thread | None = None
_stop_watching = threading.Event()


class PipelineAborted(RuntimeError):
    """Another rank's pipeline stage failed; the message carries its error."""


def _store() -> dist.Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default group: nothing to signal through
        return None


def abort_message(quiet: bool = True) -> str | None:
    """The first failure signalled by any rank, or None (also when the store is unreachable,
    unless `quiet` is False)."""
    try:
        store = _store()
        if store is not None and store.check([ABORT_KEY]):
            return store.get(ABORT_KEY).decode(errors="replace")
    except Exception:
        if not quiet:
            raise
    return None


def signal_abort(message: str) -> None:
    """Tell every rank that this one failed (best effort: never raises)."""
    try:
        store = _store()
        if store is not None and not store.check([ABORT_KEY]):
            store.set(ABORT_KEY, message)
    except Exception:
        pass


def abort_groups(groups: Iterable[dist.ProcessGroup | None]) -> None:
    """Abort `groups`, failing every transfer pending on them here and at their peers (gloo)."""
    for g in groups:
        if g is not None:
            try:
                g.abort()
            except Exception:
                pass


def watch_groups(groups: Iterable[dist.ProcessGroup | None]) -> None:
    """Abort these groups as soon as any rank signals a failure (a daemon thread per process)."""
    global _watchdog_pid, _watchdog
    if not dist.is_initialized():
        return
    _watched.extend(g for g in groups if g is not None and g not in _watched)
    if _watchdog_pid == os.getpid():
        return
    _watchdog_pid = os.getpid()

    def watch() -> None:
        try:
            while abort_message(quiet=False) is None:
                if _stop_watching.wait(_POLL_S):
                    return
        except Exception:  # the store went away: the job is ending anyway
            return
        abort_groups(list(_watched))
        if _stop_watching.wait(_EXIT_GRACE_S) or not _waiting:
            return
        print(f"pipeline aborted, exiting a rank stuck in p2p: {abort_message()}", file=sys.stderr)
        os._exit(1)

    _stop_watching.clear()
    _watchdog = threading.Thread(target=watch, name="pipeline-abort-watchdog", daemon=True)
    _watchdog.start()


def stop_watchdog() -> None:
    """Stop the watchdog before the process group is destroyed (a thread still inside a store call
    while the store is torn down aborts the process)."""
    global _watchdog_pid, _watchdog
    if _watchdog is not None and _watchdog_pid == os.getpid():
        _stop_watching.set()
        _watchdog.join()
    _watchdog, _watchdog_pid = None, None
    _watched.clear()


def wait_all(reqs: Sequence[dist.Work]) -> None:
    global _waiting
    _waiting += 1
    try:
        for r in reqs:
            r.wait()
    finally:
        _waiting -= 1


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
