"""Run a function on N ranks of a real gloo process group, for tests and benchmarks.

    results = run_distributed(check_something, world_size=4, timeout=60)

Ranks are forked from a fork server that imported torch once (a rank costs ~0.1 s instead of ~2 s), and
run single-threaded, as torchrun does. A rank that raises sends its traceback back and the call raises
`DistributedError` with it at once, killing the other ranks; a rank that hangs fails the call after
`timeout` seconds (collectives time out too), so a broken test never hangs CI. `fn` must be a
module-level function (it is pickled by name); it reads its rank from torch.distributed.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist

from megatron_lite.parallel_state import free_port

_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "numpy", "megatron_lite"]
_ctx = None


class DistributedError(RuntimeError):
    """One or more ranks failed; the message carries the first failing rank's traceback."""


def _context():
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(_PRELOAD)
    return _ctx


def _worker(fn, rank, world_size, port, backend, timeout, env, conn, args, kwargs) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(
            {
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                **env,
            }
        )
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        out = fn(*args, **kwargs)
        # plain pickle, by value: multiprocessing's pickler would share tensors through memory
        # that dies with this process
        conn.send_bytes(pickle.dumps(("ok", out)))
        conn.close()
    except BaseException:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        conn.close()
        os._exit(1)
    os._exit(0)  # skip interpreter teardown (and gloo's) in the forked child


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Call `fn(*args, **kwargs)` on `world_size` ranks; return the per-rank results in rank order."""
    ctx = _context()
    port = free_port()
    procs, readers = [], {}
    for rank in range(world_size):
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_worker,
            name=f"rank{rank}",
            daemon=True,
            args=(fn, rank, world_size, port, backend, timeout, env or {}, w, args, kwargs),
        )
        p.start()
        w.close()
        procs.append(p)
        readers[r] = rank
    results: list[Any] = [None] * world_size
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout + 10  # the collectives' own timeout fires first
    try:
        while readers and not failures:
            ready = wait(list(readers), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for r in ready:
                rank = readers.pop(r)
                try:
                    status, payload = pickle.loads(r.recv_bytes())  # from our own ranks
                except EOFError:
                    procs[rank].join(5)
                    status, payload = (
                        "error",
                        (f"rank {rank} died (exit code {procs[rank].exitcode}) without reporting"),
                    )
                if status == "ok":
                    results[rank] = payload
                else:
                    failures[rank] = payload
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    if failures:
        first = min(failures)
        raise DistributedError(
            f"{len(failures)} rank(s) failed ({sorted(failures)}); rank {first}:\n{failures[first]}"
        )
    if readers:
        raise DistributedError(
            f"ranks {sorted(readers.values())} of {world_size} did not finish "
            f"within {timeout:.0f} s (hang or deadlock)"
        )
    return results
