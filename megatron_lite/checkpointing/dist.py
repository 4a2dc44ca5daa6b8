"""`--ckpt-format torch_dist`: checkpoints through `torch.distributed.checkpoint` (DCP).

    <save>/iter_0000100/.metadata          DCP's index: every tensor's global shape and its chunks
    <save>/iter_0000100/__R_0.distcp       rank R's chunks (every rank writes its own)
    <save>/iter_0000100/common.pt          plain data (iteration, config, layout, schedule, ...)
    <save>/iter_0000100/rng_TT_PPP_DDD.pt  each rank's RNG state
    <save>/latest_checkpointed_iteration.txt

Tensors are keyed by global names, `model/<name>` and `optim/<name>/<state>` (exp_avg, exp_avg_sq,
master), at their full (tp = 1) shape; each rank writes the chunks it owns, with their offsets in the
full tensor: the tp shard of a parameter (split in `partition_stride` pieces where it has one), and
under `--use-distributed-optimizer` the dp rank's flat slice of the optimizer state, cut into
rectangular boxes. Nothing is gathered. Loading reads, per tensor, the full tensor (DCP assembles it
from whichever chunks cover it) and slices this rank's shard out with the loader `--ckpt-format torch`
uses, so any tp x pp x dp loads into any other.

Safety: DCP's tensor data is read with `torch.load(weights_only=True)`; its `.metadata` is a pickle,
read here with an Unpickler that allows only `SAFE_METADATA_GLOBALS` (DCP's metadata dataclasses,
torch.Size, dtypes, memory formats) and refuses anything else by name. `common.pt` and the RNG files
are read with `weights_only=True`. No byte (pickled object) entries are ever loaded.
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from megatron_lite.checkpointing.async_save import _PENDING
from megatron_lite.checkpointing.files import (
    agree_written,
    barrier,
    chunk_params,
    chunk_tensors,
    iteration_dir,
    pause_for_test,
    plain,
    shard_info_of,
    tensor_bytes,
    write_durably,
)
from megatron_lite.checkpointing.rng import get_rng_state

COMMON_FILE = "common.pt"
METADATA_FILE = ".metadata"
SAFE_METADATA_GLOBALS = frozenset(
    {
        "torch.distributed.checkpoint.metadata.Metadata",
        "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
        "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
        "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
        "torch.distributed.checkpoint.metadata.TensorProperties",
        "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
        "torch.distributed.checkpoint.metadata.MetadataIndex",
        "torch.distributed.checkpoint.metadata.StorageMeta",
        "torch.distributed.checkpoint.filesystem._StorageInfo",
        # megatron-core keeps its save plans in the metadata (plain DCP dataclasses)
        "torch.distributed.checkpoint.planner.SavePlan",
        "torch.distributed.checkpoint.planner.WriteItem",
        "torch.distributed.checkpoint.planner.WriteItemType",
        "torch.distributed.checkpoint.planner.TensorWriteData",
        "torch.distributed.checkpoint.planner.BytesIOWriteData",
        "torch.distributed.checkpoint.filesystem._StoragePrefix",
        "torch.Size",
        "torch.layout",
        "torch.strided",
        "torch.memory_format",
        "torch.contiguous_format",
        "torch.serialization._get_layout",
        "collections.OrderedDict",
        "pathlib.PosixPath",  # the checkpoint_id DCP records (a path; builds nothing else)
        "pathlib.WindowsPath",
        "builtins.set",
        *(f"torch.{n}" for n in ("float32", "float16", "bfloat16", "float64", "int64", "int32")),
        *(f"torch.{n}" for n in ("uint8", "int8", "int16", "bool")),
    }
)
# Test-only pause point (files.PAUSE_ENV): rank 0 stops in the background writer, its data written
# but the save not finalized.
ASYNC_PAUSE = "async_write"

Box = tuple[list[int], list[int]]  # offsets, sizes


def is_dist_checkpoint(iter_dir: str) -> bool:
    return os.path.isfile(os.path.join(iter_dir, METADATA_FILE))


def rng_file(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"rng_{tp_rank:02d}_{pp_rank:03d}_{dp_rank:03d}.pt"


# ---------------------------------------------------------------------------------------------------
# Chunks: where a rank's data sits in the full tensor


def flat_boxes(shape: list[int], start: int, end: int) -> list[Box]:
    """The flat range [start, end) of a tensor of `shape` as rectangular boxes (row-major)."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [([start], [end - start])]
    row = 1
    for s in shape[1:]:
        row *= s
    first, last = start // row, (end - 1) // row
    if first == last:
        return [
            ([first, *o], [1, *s])
            for o, s in flat_boxes(shape[1:], start - first * row, end - first * row)
        ]
    boxes, full_from, full_to = [], first, last + 1
    if start % row:
        boxes += flat_boxes(shape, start, (first + 1) * row)
        full_from = first + 1
    if end % row:
        full_to = last
    if full_to > full_from:
        boxes.append(([full_from] + [0] * (len(shape) - 1), [full_to - full_from, *shape[1:]]))
    if end % row:
        boxes += flat_boxes(shape, last * row, end)
    return boxes


def global_boxes(box: Box, info: dict) -> list[Box]:
    """A box in this rank's tp shard -> boxes in the full tensor (`shard_info_of`'s `info`)."""
    dim, tp = info["partition_dim"], info["tp_size"]
    if dim < 0 or tp == 1:
        return [box]
    offsets, sizes = box
    piece = info["global_shape"][dim] // (tp * info["partition_stride"])  # rows per stride piece
    out, at, stop = [], offsets[dim], offsets[dim] + sizes[dim]
    while at < stop:
        k, within = divmod(at, piece)
        n = min(stop - at, piece - within)
        o, s = list(offsets), list(sizes)
        o[dim], s[dim] = (k * tp + info["tp_rank"]) * piece + within, n
        out.append((o, s))
        at += n
    return out


def _cut(t: torch.Tensor, local: Box) -> torch.Tensor:
    for d, (o, s) in enumerate(zip(*local)):
        t = t.narrow(d, o, s)
    return t


def add_chunks(
    out: dict,
    fqn: str,
    local: torch.Tensor,
    info: dict,
    boxes: list[Box] | None = None,
    origin: list[int] | None = None,
) -> None:
    """Add to `out[fqn]` CPU copies of `boxes` of this rank's tp shard (default: all of `local`),
    each at its place in the full tensor. `local` holds the shard's region starting at `origin`
    (default: all of it); `info` is `shard_info_of`'s (where the shard sits in the full tensor)."""
    entry = out.setdefault(fqn, (list(info["global_shape"]), []))
    d = info["partition_dim"]
    origin = origin or [0] * local.dim()
    for box in boxes if boxes is not None else [([0] * local.dim(), list(local.shape))]:
        at = box[0][d] if d >= 0 else 0
        for g in global_boxes(box, info):
            o = list(box[0])
            if d >= 0:  # where this piece of the full tensor starts in the local shard
                o[d] = at
                at += g[1][d]
            rel = [a - b for a, b in zip(o, origin)]
            piece = _cut(local, (rel, g[1])).detach().to("cpu", copy=True).contiguous()
            entry[1].append((g[0], piece))


def model_chunks(chunks: list[torch.nn.Module], ps) -> dict:
    """`model/<name>` -> (full shape, [(offsets, CPU tensor)]): dp rank 0's tp shards (a tensor not
    split over tp from tp rank 0 only)."""
    out: dict = {}
    if ps.dp_rank != 0 or ps.cp_rank != 0:  # cp ranks hold the same model: one of them writes
        return out
    for chunk in chunks:
        for name, t in chunk_tensors(chunk).items():
            info = shard_info_of(t, ps.tp_rank, ps.tp_size)
            if info["partition_dim"] < 0 and ps.tp_rank != 0:
                continue
            add_chunks(out, f"model/{name}", t, info)
    return out


def optimizer_chunks(optimizer, params: dict[str, torch.Tensor], ps) -> dict:
    """`optim/<name>/<key>` chunks from this rank's optimizer pieces (its dp slice under ZeRO-1),
    without communication."""
    sd = optimizer.sharded_state_dict()
    distributed = sd["dp_size"] > 1
    out: dict = {}
    if (not distributed and ps.dp_rank != 0) or ps.cp_rank != 0:  # cp ranks: the same shards
        return out
    for name, rng in sd["ranges"].items():
        info = shard_info_of(params[name], ps.tp_rank, ps.tp_size)
        if info["partition_dim"] < 0 and ps.tp_rank != 0:
            continue
        shape = rng["shape"]
        boxes = flat_boxes(shape, rng["start"], rng["end"])
        strides = torch.empty(shape, device="meta").stride()
        for key, flat in sd["state"][name].items():
            for box in boxes:  # a box is contiguous in the flat order: a view of the flat slice
                at = sum(o * st for o, st in zip(box[0], strides)) - rng["start"]
                size = 1
                for n in box[1]:
                    size *= n
                part = flat.detach()[at : at + size].view(box[1])
                add_chunks(out, f"optim/{name}/{key}", part, info, [box], origin=box[0])
    return out


class ChunkSavePlanner(DefaultSavePlanner):
    """DCP's default planner, fed with explicit chunks (global offsets) instead of a state dict."""

    def __init__(self, chunks: dict) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = chunks
        self._data = {(fqn, tuple(o)): t for fqn, (_, pieces) in chunks.items() for o, t in pieces}

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, (shape, pieces) in self._chunks.items():
            for offsets, t in pieces:
                chunk = dcp_md.ChunkStorageMetadata(torch.Size(offsets), t.size())
                items.append(
                    WriteItem(
                        index=dcp_md.MetadataIndex(fqn, torch.Size(offsets)),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk, dcp_md.TensorProperties.create_from_tensor(t), torch.Size(shape)
                        ),
                    )
                )
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: dcp_md.MetadataIndex) -> Any:
        return self._data[(index.fqn, tuple(index.offset))]


# ---------------------------------------------------------------------------------------------------
# Save (synchronous or in a background thread)

_ASYNC_GROUP: list = []


def _async_group():
    """A gloo group of all ranks for the background writer's collectives, apart from training's."""
    if not _ASYNC_GROUP:
        _ASYNC_GROUP.append(dist.new_group(backend="gloo") if dist.is_initialized() else None)
    return _ASYNC_GROUP[0]


def write_dist(
    tmp: str,
    chunks: dict,
    common: dict | None,
    rng: dict | None,
    rng_name: str,
    *,
    group=None,
    no_dist: bool = False,
) -> None:
    """Write this rank's part of a torch_dist checkpoint into `tmp` (collective unless no_dist)."""
    if common is not None:
        write_durably(os.path.join(tmp, COMMON_FILE), lambda f: torch.save(common, f))
    if rng is not None:
        write_durably(os.path.join(tmp, rng_name), lambda f: torch.save(rng, f))
    dcp.save(
        {},
        storage_writer=FileSystemWriter(tmp, thread_count=1, sync_files=True),
        planner=ChunkSavePlanner(chunks),
        process_group=group,
        no_dist=no_dist,
    )


def save_dist(
    save_dir: str,
    iteration: int,
    model: list[torch.nn.Module],
    optimizer: Any,
    common: dict,
    ps,
    *,
    save_optim: bool,
    save_rng: bool,
    async_save: bool,
    publish,
) -> str:
    """Every rank writes its chunks; rank 0 then publishes (`publish()`: rename + latest file),
    at once, or with `async_save` at the next `finalize_async_save()`."""
    final = iteration_dir(save_dir, iteration)
    tmp = final + ".tmp"
    if ps.rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    chunks = model_chunks(model, ps)  # CPU copies: training may go on while they are written
    if optimizer is not None and save_optim:
        chunks.update(optimizer_chunks(optimizer, chunk_params(model), ps))
    # cp ranks share their dp rank's RNG streams (and file name): cp rank 0 writes it
    rng = plain(get_rng_state(), "rng_state") if save_rng and ps.cp_rank == 0 else None
    args = (
        tmp,
        chunks,
        common if ps.rank == 0 else None,
        rng,
        rng_file(ps.tp_rank, ps.pp_rank, ps.dp_rank),
    )
    if not async_save:
        error = None
        try:
            write_dist(*args)
        except (OSError, RuntimeError, CheckpointException) as e:  # a full disk, say
            error = e
        agree_written(error, tmp, f"iteration {iteration} to {save_dir}", tensor_bytes(chunks))
        publish()
        barrier()
        return final
    group = _async_group()

    def work() -> None:
        try:
            write_dist(*args, group=group)
            if ps.rank == 0:
                pause_for_test(ASYNC_PAUSE, save_dir)
        except BaseException as e:  # re-raised by finalize_async_save on the training thread
            _PENDING["error"] = e

    thread = threading.Thread(target=work, name="megatron-lite-async-save", daemon=True)
    _PENDING.update(
        thread=thread, publish=publish, dir=final, error=None, needed=tensor_bytes(chunks)
    )
    thread.start()
    return final
