"""Reading torch_dist checkpoints (see dist.py for the layout): DCP's metadata through a restricted
Unpickler, full tensors assembled from any saving layout, and our files as a CheckpointReader."""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint.filesystem import FileSystemReader

from megatron_lite.checkpointing.dist import (
    COMMON_FILE,
    METADATA_FILE,
    SAFE_METADATA_GLOBALS,
    is_dist_checkpoint,
    rng_file,
)
from megatron_lite.checkpointing.files import (
    FORMAT_VERSION,
    LATEST_FILE,
    CheckpointError,
    iteration_dir,
    read_latest_iteration,
    safe_load,
)

# ---------------------------------------------------------------------------------------------------
# Load


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" not in SAFE_METADATA_GLOBALS:
            raise CheckpointError(
                f"DCP metadata refers to {module}.{name}, which is not allowed (only DCP's "
                "metadata classes, torch.Size, dtypes and memory formats are): refusing to load it"
            )
        return super().find_class(module, name)


def read_metadata(iter_dir: str) -> dcp_md.Metadata:
    path = os.path.join(iter_dir, METADATA_FILE)
    try:
        with open(path, "rb") as f:
            md = _SafeUnpickler(f).load()
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(md, dcp_md.Metadata):
        raise CheckpointError(f"{path} is not DCP metadata (a {type(md).__name__})")
    return md


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read once, through the restricted Unpickler."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.metadata = read_metadata(path)

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_md.Metadata:  # noqa: ARG002
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = dcp_md.StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


def resolve_iteration_dir(load_dir: str, iteration: int | None) -> str:
    if iteration is None:
        iteration = read_latest_iteration(load_dir)
        if iteration is None:
            raise CheckpointError(f"no {LATEST_FILE} in {load_dir}: nothing to load")
    d = iteration_dir(load_dir, iteration)
    if not os.path.isdir(d) and os.path.isdir(d + ".old"):
        d += ".old"
    return d


class DCPTensors:
    """Full tensors by key from a DCP directory (the chunks of any saving layout, assembled)."""

    def __init__(self, iter_dir: str) -> None:
        self.dir = iter_dir
        self.storage = SafeFileSystemReader(iter_dir)
        self.metadata = self.storage.metadata.state_dict_metadata

    def keys(self) -> list[str]:
        return [k for k, v in self.metadata.items() if isinstance(v, dcp_md.TensorStorageMetadata)]

    def read(self, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fill tensors shaped like the saved ones (full, or any slice-sized target DCP plans)."""
        dcp.load(wanted, storage_reader=self.storage, no_dist=True)
        return wanted

    def full(self, key: str) -> torch.Tensor:
        md = self.metadata.get(key)
        if not isinstance(md, dcp_md.TensorStorageMetadata):
            raise CheckpointError(f"{self.dir} holds no tensor {key}")
        t = torch.empty(md.size, dtype=md.properties.dtype)
        return self.read({key: t})[key]


class DistReader:
    """Our torch_dist checkpoint through the CheckpointReader interface (see load.py)."""

    def __init__(self, load_dir: str, iteration: int | None = None) -> None:
        self.dir = resolve_iteration_dir(load_dir, iteration)
        if not is_dist_checkpoint(self.dir):
            raise CheckpointError(f"{self.dir} is not a torch_dist checkpoint (no {METADATA_FILE})")
        common_path = os.path.join(self.dir, COMMON_FILE)
        if not os.path.isfile(common_path):
            raise CheckpointError(
                f"{self.dir} is a torch_dist checkpoint without {COMMON_FILE}: not written by "
                "megatron_lite (megatron-core's own: see megatron_lite.checkpointing.mcore_dist)"
            )
        self.common = safe_load(common_path)
        if self.common.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{self.dir}: checkpoint format {self.common.get('format_version')!r}, "
                f"this version reads {FORMAT_VERSION}"
            )
        self.tensors = DCPTensors(self.dir)
        self.layout: dict = self.common["layout"]
        self.config: dict = self.common["config"]
        self.iteration: int = self.common["iteration"]
        self.consumed_samples: int = self.common["consumed_samples"]
        self.vocab_size: int | None = self.common["vocab_size"]
        self.tp, self.pp = self.layout["tp"], self.layout["pp"]
        self._optim: dict[str, list[str]] = {}
        self._names: list[str] = []
        for key in self.tensors.keys():
            kind, _, rest = key.partition("/")
            if kind == "model":
                self._names.append(rest)
            elif kind == "optim":
                name, _, state = rest.rpartition("/")
                self._optim.setdefault(name, []).append(state)

    def names(self) -> list[str]:
        return list(self._names)

    def locate(self, name: str) -> int | None:
        return 0 if name in self._names else None

    def has_optimizer(self) -> bool:
        return self.common["optimizer"] is not None

    def optimizer_state_keys(self, name: str) -> list[str]:
        return list(self._optim.get(name, []))

    def full_tensor(self, name: str, state_key: str | None = None) -> torch.Tensor:
        return self.tensors.full(
            f"model/{name}" if state_key is None else f"optim/{name}/{state_key}"
        )

    def file(self, tp_rank: int = 0, pp_rank: int = 0) -> dict:
        """The plain entries as a torch-format file has them; RNG states of (tp_rank, pp_rank)."""
        rng = None
        if self.common["has_rng"]:
            rng = [
                safe_load(os.path.join(self.dir, rng_file(tp_rank, pp_rank, d)))
                for d in range(self.layout["dp"])
            ]
        return {
            "optimizer": self.common["optimizer"],
            "opt_param_scheduler": self.common["opt_param_scheduler"],
            "rng_state": rng,
            "extra": self.common["extra"],
        }


def open_dist_checkpoint(load_dir: str, iteration: int | None = None, config: dict | None = None):
    """A reader when `load_dir`'s (latest) iteration is a torch_dist checkpoint, ours (DistReader)
    or megatron-core's (McoreDistReader, given `config` where its files carry no args); else None."""
    from megatron_lite.checkpointing.mcore_dist import McoreDistReader, is_mcore_dist_dir

    try:
        d = resolve_iteration_dir(load_dir, iteration)
    except (CheckpointError, OSError):
        return None
    if not is_dist_checkpoint(d):
        return None
    if is_mcore_dist_dir(d):
        return McoreDistReader(load_dir, iteration, config)
    return DistReader(load_dir, iteration)
