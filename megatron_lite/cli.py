"""What every entry point does around its main: user errors as one line from one rank, and no rank
outliving the torchrun agent that started it.

    sys.exit(run_main(main))

A `UserError` (bad flags, files, values: megatron_lite.errors) prints `error: <message>` on stderr and
exits 2, as argparse does for flag errors. Under a launcher only one rank prints it: the first to
claim it in the job's key-value store (torchrun's lives in its agent), or, before the process group
exists, `LOCAL_RANK` 0 (every rank of a node then has the same error). The others wait (up to
`REPORT_WAIT_S`) until the printer says it has printed before they exit: torchrun stops the whole job
when the first rank exits, and a loser exiting at once could take the printer down before its line is
out (they print the line themselves when no word comes). A rank that then fails only
because a peer stopped with a user error (a broken collective, a pipeline abort) exits 1 without a
traceback of its own. Any other exception is a bug: it propagates with its traceback.

Under torchrun a daemon thread watches the parent pid: when the agent is gone (kill -9 of the agent,
a lost node shell) the rank says so and exits at once instead of training on unsupervised.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from megatron_lite.errors import UserError

USER_ERROR_KEY = "megatron_lite/user_error"
USER_ERROR_PRINTED_KEY = "megatron_lite/user_error_printed"
REPORT_WAIT_S = 10.0
PRE_GROUP_GRACE_S = 2.0
EXIT_USER_ERROR = 2
PARENT_POLL_S = 0.2


def _store():
    """The default process group's key-value store, or None (no group, or torch not imported)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _claim_report(message: str) -> bool:
    """True on the one rank that should print this user error."""
    store = _store()
    if store is None:
        return os.environ.get("LOCAL_RANK", "0") == "0"
    try:
        return store.add(USER_ERROR_KEY, 1) == 1
    except Exception:  # the store is gone (its host rank exited): better twice than never
        return True


def _announce_printed(message: str) -> None:
    """After the printer's line is out: the other ranks may exit, and pipeline peers blocked in a
    transfer learn of it and stop (pipeline/abort.py)."""
    store = _store()
    if store is None:
        return
    # lazy: every tool imports cli before torch; only a failing distributed run needs it
    from megatron_lite.pipeline.abort import signal_abort

    try:
        store.set(USER_ERROR_PRINTED_KEY, "1")
    except Exception:
        pass
    signal_abort(f"a rank stopped with: error: {message}")


def _printed_elsewhere() -> bool:
    """Whether the rank that claimed the report has printed it (waits up to REPORT_WAIT_S)."""
    store = _store()
    if store is None:  # before the group: LOCAL_RANK 0 of every node prints; give it a moment
        time.sleep(PRE_GROUP_GRACE_S)
        return True
    try:
        store.wait([USER_ERROR_PRINTED_KEY], timedelta(seconds=REPORT_WAIT_S))
        return True
    except Exception:  # no word (the printer died, the store is gone): better twice than never
        return False


def _peer_reported() -> bool:
    """Whether another rank of this job already stopped with a user error."""
    store = _store()
    try:
        return store is not None and store.check([USER_ERROR_KEY])
    except Exception:
        return False


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    if "Original Traceback" in text:  # re-raised by a DataLoader worker: the original message
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(type(e).__module__) else last
    return " ".join(text.split("\n")).strip() or type(e).__name__


def report_user_error(e: Exception) -> int:
    """Print `error: <message>` (one line, on one rank); return the exit code."""
    message = _one_line(e)
    if _claim_report(message):
        print(f"error: {message}", file=sys.stderr, flush=True)
        _announce_printed(message)
    elif not _printed_elsewhere():
        print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def run_main(main: Callable[..., int], *args, **kwargs) -> int:
    """`main(*args, **kwargs)`'s exit code; user errors reported as above, bugs re-raised."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: stop when the agent dies
        exit_with_parent()
    try:
        return main(*args, **kwargs)
    except UserError as e:
        return report_user_error(e)
    except Exception:
        if _parent_gone():  # a peer that noticed first has exited, failing our collective
            _exit_parent_gone()
        if _peer_reported():  # a consequence of a peer's user error, already reported
            return 1
        raise


_watched_parent: int | None = None
_exit_lock = threading.Lock()


def _parent_gone() -> bool:
    return _watched_parent is not None and os.getppid() != _watched_parent


def _exit_parent_gone() -> None:
    with _exit_lock:  # the watcher and the main thread may both get here: one line
        print(
            f"rank {os.environ.get('RANK', '?')}: the launching agent (pid {_watched_parent}) "
            "is gone; stopping",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)


def exit_with_parent(poll_s: float = PARENT_POLL_S) -> threading.Thread:
    """A daemon thread that ends this process (exit 1) as soon as its parent process is gone.

    Polling os.getppid() (the parent changes to a reaper when it dies) works whichever agent thread
    started us; a parent-death signal (prctl PR_SET_PDEATHSIG) fires when that thread exits instead.
    """
    global _watched_parent
    _watched_parent = os.getppid()

    def watch() -> None:
        while not _parent_gone():
            time.sleep(poll_s)
        _exit_parent_gone()

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread
