"""A failing pipeline stage must not leave its peers blocked for the whole collective timeout.

The failing rank writes its error into the process group's key-value store (`signal_abort`) and
raises; its process exits, which on gloo at once fails the transfers its neighbours wait on, and they
raise `PipelineAborted` with the first failure's message and exit too, down the pipeline. A watchdog
thread on every rank polls that key: when it appears it aborts the rank's process groups (what
unblocks NCCL transfers), and a rank still blocked in a pipeline transfer `EXIT_GRACE_S` later exits
with the message (a gloo rank waiting on a live but stuck peer), as NCCL's own watchdog would.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator

import torch.distributed as dist

ABORT_KEY = "megatron_lite/pipeline_abort"
POLL_S = 0.5
EXIT_GRACE_S = 10.0


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


class AbortWatchdog:
    """Aborts the watched groups when any rank signals a failure (one daemon thread per process);
    `blocked()` marks the time this process spends waiting in a pipeline transfer."""

    def __init__(self) -> None:
        self._groups: list[dist.ProcessGroup] = []
        self._pid: int | None = None  # the process whose thread runs (a forked child starts anew)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._blocked = 0

    def watch(self, groups: Iterable[dist.ProcessGroup | None]) -> None:
        if not dist.is_initialized():
            return
        self._groups.extend(g for g in groups if g is not None and g not in self._groups)
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="pipeline-abort-watchdog", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            while abort_message(quiet=False) is None:
                if self._stop.wait(POLL_S):
                    return
        except Exception:  # the store went away: the job is ending anyway
            return
        abort_groups(list(self._groups))
        if self._stop.wait(EXIT_GRACE_S) or not self._blocked:
            return
        print(f"pipeline aborted, exiting a rank stuck in p2p: {abort_message()}", file=sys.stderr)
        os._exit(1)

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        self._blocked += 1
        try:
            yield
        finally:
            self._blocked -= 1

    def stop(self) -> None:
        """Stop the thread before the process group is destroyed (a thread still inside a store
        call while the store is torn down aborts the process)."""
        if self._thread is not None and self._pid == os.getpid():
            self._stop.set()
            self._thread.join()
        self._thread, self._pid = None, None
        self._groups.clear()


# One per process, as the thread it runs: it watches this process's store and aborts its groups.
WATCHDOG = AbortWatchdog()
