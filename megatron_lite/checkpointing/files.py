"""The checkpoint's files: names, plain-data and safe-load rules, durable writes, shard tags."""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import shutil
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.device import comm_device
from megatron_lite.errors import UserError
from megatron_lite.tensor_parallel.utils import tags_of

FORMAT_VERSION = 1
LATEST_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
# The one allow-list of pickled classes: `args` (Megatron-LM's and ours) is an argparse.Namespace;
# Megatron-LM's own files add numpy's array/dtype reconstruction (their RNG state, megatron.py).
ARGS_GLOBALS = [argparse.Namespace]
_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64))]
_RECONSTRUCT = getattr(np, "_core", np.core).multiarray._reconstruct
MEGATRON_GLOBALS = [*ARGS_GLOBALS, _RECONSTRUCT, *_NUMPY_GLOBALS]
_SCALARS = (int, float, bool, str, type(None))
# Test-only: "before_rename" or "before_latest" makes rank 0 write `<save>/.paused` and wait there,
# so a test can kill the process at a known point of a save.
PAUSE_ENV = "MEGATRON_LITE_CKPT_TEST_PAUSE"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unsafe or does not fit this run; the message says which and why."""


# ---------------------------------------------------------------------------------------------------
# Paths


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def mp_rank_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp_size > 1 else "")


def read_latest_iteration(root: str) -> int | None:
    """The iteration named by `<root>/latest_checkpointed_iteration.txt`, or None when there is none."""
    path = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} should hold an iteration number, found {text!r}")
    return int(text)


# ---------------------------------------------------------------------------------------------------
# Shards: where a rank's piece sits in the full tensor


def shard_info_of(t: torch.Tensor, tp_rank: int, tp_size: int) -> dict:
    """Read the parameter tags (see docs/internals.md) into a plain dict."""
    tags = tags_of(t)
    split = tags.tensor_model_parallel
    dim = int(tags.partition_dim) if split else -1
    shape = list(t.shape)
    if dim >= 0:
        shape[dim] *= tp_size
    return {
        "global_shape": shape,
        "partition_dim": dim,
        "partition_stride": int(tags.partition_stride) if split else 1,
        "tp_rank": tp_rank if dim >= 0 else 0,
        "tp_size": tp_size if dim >= 0 else 1,
    }


# ---------------------------------------------------------------------------------------------------
# Plain data, files, fsync


def plain(obj: Any, where: str) -> Any:
    """`obj` as tensors and plain Python types only, or a CheckpointError naming the offender."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        # a view into a bigger buffer (DDP, distributed optimizer) would save the whole buffer
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.clone()
        return t
    if type(obj) in (int, float, bool, str, bytes, type(None)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise CheckpointError(f"{where} has a key of type {type(k).__name__}: {k!r}")
            out[k] = plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold only "
        "tensors and plain Python types (they are loaded with weights_only=True)"
    )


def is_plain_arg(v: Any) -> bool:
    """A value an `args` Namespace may hold in our files: a scalar or a list/tuple of scalars."""
    if isinstance(v, (list, tuple)):
        return all(type(x) in _SCALARS for x in v)
    return type(v) in _SCALARS


def check_namespaces(obj: Any, path: str, where: str = "") -> None:
    """Refuse a Namespace anywhere but the top-level `args`, or one holding a value that is not
    plain: allowing the class must not let other objects in through it."""
    if isinstance(obj, argparse.Namespace):
        if where != "['args']":
            raise CheckpointError(f"refusing to load {path}: a Namespace at {where or 'the top'}")
        for k, v in vars(obj).items():
            if not is_plain_arg(v):
                raise CheckpointError(
                    f"refusing to load {path}: args.{k} is a {type(v).__module__}."
                    f"{type(v).__qualname__}; args may hold plain values only"
                )
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_namespaces(v, path, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_namespaces(v, path, f"{where}[{i}]")


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip archive


def _not_a_checkpoint(path: str) -> CheckpointError | None:
    """Why `path` cannot be a torch.save file, judged by its first bytes; None if it may be one."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return CheckpointError(f"checkpoint file {path} is empty (0 bytes): the save was cut off")
    if head == _ZIP_MAGIC:
        return None
    kind = "a plain pickle" if head[:1] == b"\x80" else "not a torch.save archive"
    return CheckpointError(
        f"checkpoint file {path} is {kind} (starts with {head!r}), not a checkpoint written by "
        "torch.save: refusing to load it"
    )


def safe_load(path: str) -> dict:
    """`torch.load(path, weights_only=True)`, memory-mapped, with `argparse.Namespace` (the `args`
    entry, plain values only) the one class allowed; a CheckpointError naming the file when it is
    missing, empty, truncated, garbage, a plain pickle or holds any other pickled object."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    bad = _not_a_checkpoint(path)
    if bad is not None:
        raise bad
    try:
        with torch.serialization.safe_globals(ARGS_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"refusing to load {path}: it holds a pickled Python object, not only tensors and "
            f"plain types (torch.load weights_only=True said: {first})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint file {path} is corrupt or truncated ({os.path.getsize(path)} bytes; "
            f"torch.load said: {first}); an earlier iteration's checkpoint may be whole"
        ) from None
    check_namespaces(state, path)
    return state


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_latest(root: str, iteration: int) -> None:
    tmp = os.path.join(root, LATEST_FILE + ".tmp")
    write_durably(tmp, lambda f: f.write(f"{iteration}\n".encode()))
    os.replace(tmp, os.path.join(root, LATEST_FILE))
    fsync_dir(root)


def pause_for_test(point: str, root: str) -> None:
    if os.environ.get(PAUSE_ENV) == point:
        with open(os.path.join(root, ".paused"), "w") as f:
            f.write(point)
        while True:
            time.sleep(0.1)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------
# A write that failed (a full disk): every rank stops with one clear error, nothing half-published

_FULL_MARKS = ("unexpected pos", "No space left", "failed writing file")


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (what writing it needs, about)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _why_write_failed(error: BaseException | None, where: str, needed: int) -> str:
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    full = error is not None and (
        getattr(error, "errno", None) == errno.ENOSPC or any(m in str(error) for m in _FULL_MARKS)
    )
    if full or (free is not None and free < max(needed, 2**20)):
        have = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        return f"the disk is full ({have} on {where}; this rank's part needs about {needed / 2**20:.1f} MiB)"
    if error is None:
        return "another rank's write failed (its error is in its own log)"
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def agree_written(error: BaseException | None, tmp: str, what: str, needed: int) -> None:
    """Collective, after every rank wrote its part of `tmp`: if any rank's write failed, every rank
    raises the same kind of CheckpointError and rank 0 removes the partial directory, so the latest
    file still names the previous checkpoint and no rank waits for a peer that stopped."""
    failed = torch.tensor([0.0 if error is None else 1.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        failed = failed.to(comm_device(dist.get_backend()))
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if not failed.item():
        return
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    reason = _why_write_failed(error, os.path.dirname(tmp) or ".", needed)
    raise CheckpointError(
        f"saving {what} failed: {reason}. The partial {tmp} was removed; {LATEST_FILE} still "
        "names the previous checkpoint"
    ) from error


# ---------------------------------------------------------------------------------------------------
# Model chunks


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP-style wrappers (`.module`), whose names are the global names."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def chunk_tensors(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    return unwrap(chunk).state_dict(keep_vars=True)  # keep_vars: parameters keep their tags


def chunk_params(chunks: list[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {n: p for c in chunks for n, p in unwrap(c).named_parameters()}
