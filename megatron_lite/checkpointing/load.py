"""Load: full tensors from any saved layout, this rank's shards of them, exact resume."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from megatron_lite.checkpointing.experts import moe_differences
from megatron_lite.checkpointing.files import (
    FORMAT_VERSION,
    LATEST_FILE,
    MODEL_FILE,
    CheckpointError,
    barrier,
    chunk_params,
    chunk_tensors,
    iteration_dir,
    mp_rank_name,
    read_latest_iteration,
    safe_load,
    shard_info_of,
)
from megatron_lite.checkpointing.rng import set_rng_state
from megatron_lite.checkpointing.torch_format import TORCH_FORMAT_VERSION, from_file
from megatron_lite.config import Config, ModelConfig, flag_name
from megatron_lite.config.model import SHAPE_FIELDS
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tensor_parallel.utils import full_from_shards, shard_of, tags_of

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
# Read: full tensors from any source layout


class CheckpointReader:
    """One saved iteration: its layout and config, and full (unsharded) tensors by global name.

    Files are opened lazily, memory-mapped, and only those that hold a requested name; this is the
    one reassembly path, used by `load_checkpoint` and by the offline convert/reshard tools.
    """

    _LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

    def __init__(self, load_dir: str, iteration: int | None = None):
        if not os.path.isdir(load_dir):
            raise CheckpointError(f"checkpoint directory {load_dir} does not exist")
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
        if first.get("format_version") not in (FORMAT_VERSION, TORCH_FORMAT_VERSION):
            raise CheckpointError(
                f"{self.dir}: checkpoint format {first.get('format_version')!r}, "
                f"this version reads {FORMAT_VERSION} and {TORCH_FORMAT_VERSION}"
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
            state = safe_load(self.path(tp_rank, pp_rank))
            if not isinstance(state, dict) or "shard_info" not in state:
                raise CheckpointError(
                    f"{self.path(tp_rank, pp_rank)} is a torch file but not a megatron_lite "
                    "checkpoint (no 'shard_info' entry)"
                )
            # either file version: Megatron-LM's layout (stage-local names) or our first
            self._files[key], self._index[key] = from_file(state, pp_rank, self.path(*key))
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
    from megatron_lite.checkpointing.dist_read import open_dist_checkpoint

    reader = open_dist_checkpoint(load_dir, iteration) or CheckpointReader(load_dir, iteration)
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
            flag = flag_name(ModelConfig, f)
            if flag != "--" + f.replace("_", "-"):
                flag += f" ({f})"
            diffs.append(f"{flag}: checkpoint {a}, this run {b}")
    diffs += moe_differences(reader.config.get("moe") or {}, cfg.moe)
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
    tags = tags_of(t)
    if tags.shared_embedding:
        # the output weight tied to the embedding (pp > 1) exists at pp == 1 only as the embedding
        alias = tags.init_name
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
        for name, t in chunk_tensors(chunk).items():
            src = source_name(reader, name, t)
            t.copy_(_my_shard(reader, src, t, ps, weight_key(reader, src)))


def _load_optimizer(reader: CheckpointReader, optimizer, chunks, ps: ParallelState) -> None:
    if not reader.has_optimizer():
        raise CheckpointError(
            f"{reader.dir} was saved without optimizer state (--no-save-optim); "
            "load it with --no-load-optim or --finetune"
        )
    per_param = {}
    for name, p in chunk_params(chunks).items():
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
    from megatron_lite.checkpointing.hf_reader import open_checkpoint
    from megatron_lite.checkpointing.megatron import MegatronReader

    # ours (either format), Megatron-LM's legacy files or megatron-core's torch_dist
    reader = open_checkpoint(load_dir, iteration, cfg.to_dict())
    if isinstance(reader, MegatronReader) or getattr(reader, "weights_only", False):
        if load_optim and optimizer is not None:
            raise CheckpointError(
                f"--load {load_dir} is a Megatron-LM checkpoint: its weights, iteration and "
                "consumed samples load here, its optimizer state does not; add --no-load-optim "
                "(the optimizer starts fresh) or --finetune"
            )
        load_rng = False  # Megatron's RNG streams are not ours: the run reseeds from --seed
    check_same_model(reader, cfg, vocab_size)
    load_weights(reader, model_chunks, ps)
    optimizer_loaded = load_optim and optimizer is not None
    if optimizer_loaded:
        _load_optimizer(reader, optimizer, model_chunks, ps)
    sched = reader.file()["opt_param_scheduler"]
    if load_optim and opt_param_scheduler is not None and sched is not None:
        opt_param_scheduler.load_state_dict(sched)
    rng_restored = _load_rng(reader, ps) if load_rng else False
    barrier()
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
