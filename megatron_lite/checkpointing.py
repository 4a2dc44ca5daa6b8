"""Checkpoints in Megatron's directory layout: atomic saves, safe loads, any layout into any other.

    <save>/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt   (_PPP only when pp > 1)
    <save>/latest_checkpointed_iteration.txt                  (written last)

Each file is written by dp rank 0 of its (tp, pp) place and holds that place's tensors, keyed by global
parameter names, with a `shard_info` entry per tensor saying where the shard sits in the full tensor.
Loading reassembles each full tensor from the source shards and slices out this rank's shard, so a
checkpoint saved with any tp x pp x dp (distributed optimizer or not) loads into any other layout of
the same model. Files hold only tensors and plain Python types and are read with
`torch.load(weights_only=True)`: a file with a pickled object is refused.

A save goes to `iter_XXXXXXX.tmp`, every file and directory is fsynced, the directory is renamed into
place, and only then is the latest-iteration file replaced (atomically): a job killed at any point
leaves the previous checkpoint whole and named by the latest file.
"""

from __future__ import annotations

import glob
import io
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite import device
from megatron_lite.config import Config, ModelConfig, _flag_name
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tensor_parallel.random import get_rng_tracker
from megatron_lite.tensor_parallel.utils import full_from_shards, shard_of

FORMAT_VERSION = 1
LATEST_FILE = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
# Test-only: "before_rename" or "before_latest" makes rank 0 write `<save>/.paused` and wait there,
# so a test can kill the process at a known point of a save.
PAUSE_ENV = "MEGATRON_LITE_CKPT_TEST_PAUSE"

# Model settings that change a parameter's shape (or existence): a checkpoint must agree on all of them.
SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "swiglu",
    "normalization",
    "position_embedding_type",
    "max_position_embeddings",
    "untie_embeddings_and_output_weights",
    "add_bias_linear",
)


class CheckpointError(RuntimeError):
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
    split = bool(getattr(t, "tensor_model_parallel", False))
    dim = int(getattr(t, "partition_dim", -1)) if split else -1
    shape = list(t.shape)
    if dim >= 0:
        shape[dim] *= tp_size
    return {
        "global_shape": shape,
        "partition_dim": dim,
        "partition_stride": int(getattr(t, "partition_stride", 1)) if split else 1,
        "tp_rank": tp_rank if dim >= 0 else 0,
        "tp_size": tp_size if dim >= 0 else 1,
    }


# The shard rule (Megatron's partition_stride) lives once, with the layers that shard.
slice_shard = shard_of
assemble_full_tensor = full_from_shards


def _fit_shape(full: torch.Tensor, shape: list[int], name: str, vocab_size: int | None):
    """Trim or zero-pad the vocabulary dim (0) when tp changed the padding; refuse anything else."""
    if list(full.shape) == shape:
        return full
    if full.dim() != len(shape) or list(full.shape[1:]) != shape[1:]:
        raise CheckpointError(
            f"parameter {name}: checkpoint shape {list(full.shape)}, this run {shape}"
        )
    if vocab_size is not None and shape[0] < vocab_size:
        raise CheckpointError(
            f"parameter {name}: this run has {shape[0]} vocabulary rows, fewer than the "
            f"checkpoint's vocabulary size {vocab_size}"
        )
    rows = min(shape[0], full.shape[0])  # rows past the true vocabulary are padding either way
    out = full.new_zeros(shape)
    out[:rows] = full[:rows]
    return out


# ---------------------------------------------------------------------------------------------------
# Plain data, files, fsync


def _plain(obj: Any, where: str) -> Any:
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
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold only "
        "tensors and plain Python types (they are loaded with weights_only=True)"
    )


def safe_load(path: str) -> dict:
    """`torch.load(path, weights_only=True)`, memory-mapped; clear errors for missing/unsafe files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"refusing to load {path}: it holds a pickled Python object, not only tensors and "
            f"plain types (torch.load weights_only=True said: {first})"
        ) from None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_latest(root: str, iteration: int) -> None:
    tmp = os.path.join(root, LATEST_FILE + ".tmp")
    _write_durably(tmp, lambda f: f.write(f"{iteration}\n".encode()))
    os.replace(tmp, os.path.join(root, LATEST_FILE))
    _fsync_dir(root)


def _test_pause(point: str, root: str) -> None:
    if os.environ.get(PAUSE_ENV) == point:
        with open(os.path.join(root, ".paused"), "w") as f:
            f.write(point)
        while True:
            time.sleep(0.1)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------
# RNG states (every rank's: tp ranks differ in the tracker, dp ranks may differ too)


def get_rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "random": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(gauss)],
        **device.rng_state(),
    }
    state["tp_tracker"] = get_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["random"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    device.set_rng_state(state)
    if "tp_tracker" in state:
        get_rng_tracker().set_states(state["tp_tracker"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _gather_rng_states(ps: ParallelState) -> list[dict] | None:
    """Every dp rank's RNG state, in dp-rank order, on dp rank 0 (None elsewhere).

    States travel as torch.save bytes (read back with weights_only=True), not as pickled objects.
    """
    state = _plain(get_rng_state(), "rng_state")
    if ps.dp_size == 1 or ps.dp_group is None:
        return [state]
    buf = io.BytesIO()
    torch.save(state, buf)
    dev = device.get_device() if ps.backend == "nccl" else torch.device("cpu")
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(ps.dp_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=dev), group=ps.dp_group)
    longest = int(max(sizes).item())
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: data.numel()] = data.to(dev)
    blobs = [torch.empty_like(padded) for _ in range(ps.dp_size)]
    dist.all_gather(blobs, padded, group=ps.dp_group)  # a few KiB per rank
    if ps.dp_rank != 0:
        return None
    return [
        torch.load(io.BytesIO(b[: int(n.item())].cpu().numpy().tobytes()), weights_only=True)
        for b, n in zip(blobs, sizes)
    ]


# ---------------------------------------------------------------------------------------------------
# Save


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP-style wrappers (`.module`), whose names are the global names."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def _chunk_tensors(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    return _unwrap(chunk).state_dict(keep_vars=True)  # keep_vars: parameters keep their tags


def _chunk_params(chunks: list[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {n: p for c in chunks for n, p in _unwrap(c).named_parameters()}


def _model_state(chunks: list[torch.nn.Module], ps: ParallelState) -> tuple[list[dict], dict]:
    models, shard_info = [], {}
    for i, chunk in enumerate(chunks):
        tensors = _chunk_tensors(chunk)
        models.append(_plain(dict(tensors), f"model chunk {i}"))
        for name, t in tensors.items():
            shard_info[name] = shard_info_of(t, ps.tp_rank, ps.tp_size)
    return models, shard_info


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    opt_param_scheduler: Any,
    cfg: Config,
    ps: ParallelState,
    consumed_samples: int,
    extra: dict | None = None,
    *,
    vocab_size: int | None = None,
) -> str:
    """Save on every rank (collective); returns the iteration directory.

    `vocab_size` is the true (unpadded) vocabulary, recorded so that a layout with another padding
    can load the embedding; it defaults to `cfg.data.vocab_size`. `extra`: plain data to keep.
    """
    ck = cfg.checkpoint
    for chunk in model_chunks:  # parameters still arriving (--overlap-param-gather): land them
        getattr(chunk, "finish_param_sync", lambda: None)()
    # Collectives first, on every rank: the distributed optimizer gathers its dp shards, RNG states
    # go to dp rank 0.
    optim = None
    if optimizer is not None and not ck.no_save_optim:
        optim = {
            "param_state": optimizer.per_param_state_dict(),
            "state_dict": optimizer.state_dict(),
        }
    rng = _gather_rng_states(ps) if not ck.no_save_rng else None

    final = iteration_dir(save_dir, iteration)
    tmp = final + ".tmp"
    if ps.rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        os.makedirs(tmp)
    _barrier()
    if ps.dp_rank == 0:
        models, shard_info = _model_state(model_chunks, ps)
        state = {
            "format_version": FORMAT_VERSION,
            "iteration": int(iteration),
            "consumed_samples": int(consumed_samples),
            "config": cfg.to_dict(),
            "layout": {
                "tp": ps.tp_size,
                "pp": ps.pp_size,
                "dp": ps.dp_size,
                "vpp": len(model_chunks) if len(model_chunks) > 1 else None,
                "use_distributed_optimizer": cfg.parallel.use_distributed_optimizer,
            },
            "vocab_size": vocab_size if vocab_size is not None else cfg.data.vocab_size,
            "model": models,
            "shard_info": shard_info,
            "optimizer": _plain(optim, "optimizer"),
            "opt_param_scheduler": _plain(
                opt_param_scheduler.state_dict() if opt_param_scheduler is not None else None,
                "opt_param_scheduler",
            ),
            "rng_state": rng,
            "extra": _plain(extra, "extra"),
        }
        d = os.path.join(tmp, mp_rank_name(ps.tp_rank, ps.pp_rank, ps.pp_size))
        os.makedirs(d)
        _write_durably(os.path.join(d, MODEL_FILE), lambda f: torch.save(state, f))
        _fsync_dir(d)
    _barrier()
    if ps.rank == 0:
        _fsync_dir(tmp)
        _test_pause("before_rename", save_dir)
        old = final + ".old"
        if os.path.exists(final):  # saving the same iteration again: keep the old one until renamed
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(save_dir)
        shutil.rmtree(old, ignore_errors=True)
        _test_pause("before_latest", save_dir)
        _write_latest(save_dir, iteration)
        for stale in glob.glob(os.path.join(save_dir, "iter_*.tmp")):  # from saves that were killed
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


# ---------------------------------------------------------------------------------------------------
# Read: full tensors from any source layout


class CheckpointReader:
    """One saved iteration: its layout and config, and full (unsharded) tensors by global name.

    Files are opened lazily, memory-mapped, and only those that hold a requested name; this is the
    one reassembly path, used by `load_checkpoint` and by the offline convert/reshard tools.
    """

    _LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

    def __init__(self, load_dir: str, iteration: int | None = None):
        if iteration is None:
            iteration = read_latest_iteration(load_dir)
            if iteration is None:
                raise CheckpointError(f"no {LATEST_FILE} in {load_dir}: nothing to load")
        self.dir = iteration_dir(load_dir, iteration)
        if not os.path.isdir(self.dir) and os.path.isdir(self.dir + ".old"):
            self.dir += ".old"  # killed while replacing a re-saved iteration: the old copy is whole
        if not os.path.isdir(self.dir):
            raise CheckpointError(
                f"checkpoint directory {self.dir} (iteration {iteration}) does not exist"
            )
        self._pp_suffix = not os.path.isdir(os.path.join(self.dir, mp_rank_name(0, 0, 1)))
        self._files: dict[tuple[int, int], dict] = {}
        self._index: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        first = self._file(0, 0)
        if first.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{self.dir}: checkpoint format {first.get('format_version')!r}, "
                f"this version reads {FORMAT_VERSION}"
            )
        self.layout: dict = first["layout"]
        self.config: dict = first["config"]
        self.iteration: int = first["iteration"]
        self.consumed_samples: int = first["consumed_samples"]
        self.vocab_size: int | None = first["vocab_size"]
        self.tp, self.pp = self.layout["tp"], self.layout["pp"]

    def path(self, tp_rank: int, pp_rank: int) -> str:
        name = mp_rank_name(tp_rank, pp_rank, 2 if self._pp_suffix else 1)
        return os.path.join(self.dir, name, MODEL_FILE)

    def _file(self, tp_rank: int, pp_rank: int) -> dict:
        key = (tp_rank, pp_rank)
        if key not in self._files:
            self._files[key] = safe_load(self.path(tp_rank, pp_rank))
            self._index[key] = {n: t for m in self._files[key]["model"] for n, t in m.items()}
        return self._files[key]

    def file(self, tp_rank: int = 0, pp_rank: int = 0) -> dict:
        """The raw contents of one source file (scalars, optimizer state_dict, RNG states, ...)."""
        return self._file(tp_rank, pp_rank)

    def _candidate_stages(self, name: str) -> list[int]:
        m = self._LAYER.search(name)
        if m:  # chunk c of stage r holds layers [(c * pp + r) * L, ...): see docs/internals.md
            per_chunk = self.config["model"]["num_layers"] // (self.pp * (self.layout["vpp"] or 1))
            first = [(int(m.group(1)) // per_chunk) % self.pp]
        else:  # embedding on the first stage, final norm and output layer on the last
            first = [0, self.pp - 1]
        return first + [s for s in range(self.pp) if s not in first]

    def locate(self, name: str) -> int | None:
        """The source pipeline stage that holds `name`, or None when no stage does."""
        for stage in self._candidate_stages(name):
            if name in self._file(0, stage)["shard_info"]:
                return stage
        return None

    def names(self) -> list[str]:
        """Every saved tensor name, in stage order."""
        return [n for s in range(self.pp) for n in self._file(0, s)["shard_info"]]

    def has_optimizer(self) -> bool:
        return self._file(0, 0)["optimizer"] is not None

    def full_tensor(self, name: str, state_key: str | None = None) -> torch.Tensor:
        """The full tensor `name` (or its optimizer state `state_key`) assembled from its tp shards."""
        stage = self.locate(name)
        if stage is None:
            raise CheckpointError(f"{self.dir} holds no tensor named {name}")
        info = self._file(0, stage)["shard_info"][name]
        shards = []
        for tp_rank in range(info["tp_size"] if info["partition_dim"] >= 0 else 1):
            self._file(tp_rank, stage)
            if state_key is None:
                shards.append(self._index[(tp_rank, stage)][name])
            else:
                state = self._files[(tp_rank, stage)]["optimizer"]
                if state is None or name not in state["param_state"]:
                    raise CheckpointError(
                        f"{self.path(tp_rank, stage)}: no optimizer state for {name}"
                    )
                shards.append(state["param_state"][name][state_key])
        full = assemble_full_tensor(shards, info["partition_dim"], info["partition_stride"])
        if list(full.shape) != info["global_shape"]:
            raise CheckpointError(
                f"{self.dir}: shards of {name} make shape {list(full.shape)}, "
                f"recorded {info['global_shape']}"
            )
        return full

    def optimizer_state_keys(self, name: str) -> list[str]:
        stage = self.locate(name)
        opt = self._file(0, stage)["optimizer"] if stage is not None else None
        return list(opt["param_state"].get(name, {})) if opt else []


def iter_full_state(
    load_dir: str, iteration: int | None = None, *, optimizer: bool = False
) -> Iterator[tuple[str, torch.Tensor | dict[str, torch.Tensor]]]:
    """Yield (name, full tensor), or (name, {state key: full tensor}) with `optimizer`, one at a time."""
    reader = CheckpointReader(load_dir, iteration)
    for name in reader.names():
        if optimizer:
            keys = reader.optimizer_state_keys(name)
            yield name, {k: reader.full_tensor(name, k) for k in keys}
        else:
            yield name, reader.full_tensor(name)


def load_full_state(load_dir: str, iteration: int | None = None) -> dict[str, torch.Tensor]:
    """Every full model tensor of a checkpoint by global name (for tools; holds it all in memory)."""
    return dict(iter_full_state(load_dir, iteration))


# ---------------------------------------------------------------------------------------------------
# Load


def check_same_model(reader: CheckpointReader, cfg: Config, vocab_size: int | None = None) -> None:
    """Raise naming every shape-defining setting where the checkpoint and this run differ."""
    saved, mine = reader.config["model"], cfg.model
    diffs = []
    for f in SHAPE_FIELDS:
        if f == "max_position_embeddings" and "learned_absolute" not in (
            saved.get("position_embedding_type"),
            mine.position_embedding_type,
        ):
            continue  # rotary embeddings have no position table
        a, b = saved.get(f), getattr(mine, f)
        if a != b:
            flag = _flag_name(ModelConfig, f)
            if flag != "--" + f.replace("_", "-"):
                flag += f" ({f})"
            diffs.append(f"{flag}: checkpoint {a}, this run {b}")
    vocab_size = vocab_size if vocab_size is not None else cfg.data.vocab_size
    if None not in (reader.vocab_size, vocab_size) and reader.vocab_size != vocab_size:
        diffs.append(f"vocabulary size: checkpoint {reader.vocab_size}, this run {vocab_size}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {reader.dir} was saved from a different model: " + "; ".join(diffs)
        )


def source_name(reader: CheckpointReader, name: str, t: torch.Tensor) -> str:
    """The saved name holding this model tensor (the embedding, for a tied output weight at pp > 1)."""
    if reader.locate(name) is not None:
        return name
    if getattr(t, "shared_embedding", False):
        # the output weight tied to the embedding (pp > 1) exists at pp == 1 only as the embedding
        alias = getattr(t, "init_name", None)
        if alias is not None and reader.locate(alias) is not None:
            return alias
        for n in reader.names():
            if n.endswith("word_embeddings.weight"):
                return n
    raise CheckpointError(f"{reader.dir} holds no tensor named {name}, which this model has")


def shard_from_reader(
    reader, src: str, t: torch.Tensor, tp_rank: int, tp_size: int, key: str | None = None
) -> torch.Tensor:
    """The shard of source tensor `src` (or its optimizer state `key`) that a tensor tagged like `t`
    holds at (tp_rank, tp_size): the one reshard path, used online here and offline by the tools.

    `reader` is a CheckpointReader or anything with its interface (the Hugging Face reader)."""
    info = shard_info_of(t, tp_rank, tp_size)
    full = _fit_shape(reader.full_tensor(src, key), info["global_shape"], src, reader.vocab_size)
    return slice_shard(full, info["partition_dim"], info["partition_stride"], tp_rank, tp_size)


def _my_shard(reader, src: str, t: torch.Tensor, ps: ParallelState, key: str | None = None):
    return shard_from_reader(reader, src, t, ps.tp_rank, ps.tp_size, key)


def weight_key(reader, src: str) -> str | None:
    """The fp32 master, where saved, is the exact weight (the model copy may be bf16/fp16)."""
    return "master" if "master" in reader.optimizer_state_keys(src) else None


@torch.no_grad()
def load_weights(reader, chunks: list[torch.nn.Module], ps: ParallelState) -> None:
    """Copy this rank's shard of every model tensor from `reader` (weights only, no collectives)."""
    for chunk in chunks:
        for name, t in _chunk_tensors(chunk).items():
            src = source_name(reader, name, t)
            t.copy_(_my_shard(reader, src, t, ps, weight_key(reader, src)))


def _load_optimizer(reader: CheckpointReader, optimizer, chunks, ps: ParallelState) -> None:
    if not reader.has_optimizer():
        raise CheckpointError(
            f"{reader.dir} was saved without optimizer state (--no-save-optim); "
            "load it with --no-load-optim or --finetune"
        )
    per_param = {}
    for name, p in _chunk_params(chunks).items():
        src = source_name(reader, name, p)
        keys = reader.optimizer_state_keys(src)
        per_param[name] = {k: _my_shard(reader, src, p, ps, k) for k in keys}
        if "master" not in keys:  # saved in fp32: the model weights are the masters
            per_param[name]["master"] = _my_shard(reader, src, p, ps).float()
    # scalar parts (steps, loss scaler) are the same on every rank: take the nearest source file
    f = reader.file(min(ps.tp_rank, reader.tp - 1), min(ps.pp_rank, reader.pp - 1))
    optimizer.load_state_dict(f["optimizer"]["state_dict"])
    optimizer.load_per_param_state_dict(per_param)


def _load_rng(reader: CheckpointReader, ps: ParallelState) -> bool:
    lay = reader.layout
    if (lay["tp"], lay["pp"], lay["dp"]) != (ps.tp_size, ps.pp_size, ps.dp_size):
        warnings.warn(
            f"checkpoint layout tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} differs from this "
            f"run's tp={ps.tp_size} pp={ps.pp_size} dp={ps.dp_size}: RNG states not restored",
            stacklevel=3,
        )
        return False
    states = reader.file(ps.tp_rank, ps.pp_rank)["rng_state"]
    if states is None:
        warnings.warn(f"{reader.dir} was saved without RNG states (--no-save-rng)", stacklevel=3)
        return False
    set_rng_state(states[ps.dp_rank])
    return True


def load_checkpoint(
    load_dir: str,
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    opt_param_scheduler: Any,
    cfg: Config,
    ps: ParallelState,
    *,
    load_optim: bool = True,
    load_rng: bool = True,
    finetune: bool = False,
    iteration: int | None = None,
    vocab_size: int | None = None,
) -> dict:
    """Load the latest (or `iteration`'s) checkpoint into this rank's chunks, from any layout.

    Every rank calls it (the distributed optimizer keeps its dp shard). `cfg.checkpoint`'s
    --no-load-optim, --no-load-rng and --finetune apply as well as the keyword arguments; finetune
    loads weights only and restarts at iteration 0. With no latest file in `load_dir` nothing is
    loaded and `loaded` is False (a fresh run that shares --save and --load). Returns a dict with
    iteration, consumed_samples, loaded, optimizer_loaded, rng_restored, layout, config, extra.
    """
    ck = cfg.checkpoint
    finetune = finetune or ck.finetune
    load_optim = load_optim and not ck.no_load_optim and not finetune
    load_rng = load_rng and not ck.no_load_rng and not finetune
    if iteration is None:
        iteration = read_latest_iteration(load_dir)
        if iteration is None:
            if not os.path.isdir(load_dir):
                raise CheckpointError(f"--load directory {load_dir} does not exist")
            return {"iteration": 0, "consumed_samples": 0, "loaded": False}
    reader = CheckpointReader(load_dir, iteration)
    check_same_model(reader, cfg, vocab_size)
    load_weights(reader, model_chunks, ps)
    optimizer_loaded = load_optim and optimizer is not None
    if optimizer_loaded:
        _load_optimizer(reader, optimizer, model_chunks, ps)
    sched = reader.file()["opt_param_scheduler"]
    if load_optim and opt_param_scheduler is not None and sched is not None:
        opt_param_scheduler.load_state_dict(sched)
    rng_restored = _load_rng(reader, ps) if load_rng else False
    _barrier()
    return {
        "iteration": 0 if finetune else reader.iteration,
        "consumed_samples": 0 if finetune else reader.consumed_samples,
        "loaded": True,
        "optimizer_loaded": optimizer_loaded,
        "rng_restored": rng_restored,
        "layout": reader.layout,
        "config": reader.config,
        "extra": reader.file()["extra"],
    }
