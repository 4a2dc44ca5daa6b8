"""The one async save in flight (--async-save) and its publication. Apart from dist.py so that a run
that never saves torch_dist does not import torch.distributed.checkpoint (~1 s per process)."""

from __future__ import annotations

from typing import Any

from megatron_lite.checkpointing.files import agree_written, barrier

# thread, publish (rename + latest file), dir, error: set by dist.save_dist, cleared here
_PENDING: dict[str, Any] = {}


def finalize_async_save() -> str | None:
    """Wait for an async save in flight, then publish it (every rank calls it; collective).
    Returns its directory, or None when none was in flight."""
    if not _PENDING:
        return None
    _PENDING["thread"].join()
    error, publish, final = _PENDING["error"], _PENDING["publish"], _PENDING["dir"]
    needed = _PENDING.get("needed", 0)
    _PENDING.clear()
    agree_written(error, final + ".tmp", f"{final} (async)", needed)
    publish()
    barrier()
    return final
