"""megatron-core's own torch_dist checkpoints (`dist_checkpointing.save`), read as users have them.

    <load>/iter_0000100/.metadata, __R_S.distcp   DCP files of megatron-core's sharded state dict
    <load>/iter_0000100/common.pt                 non-sharded state (Megatron's training loop: args,
                                                   iteration, ...; a bare `dist_checkpointing.save`
                                                   of a model: empty)
    <load>/iter_0000100/metadata.json             {"sharded_backend": "torch_dist", ...}

What is read: plain ShardedTensors of a GPT model built with the local or the Transformer Engine
spec, any tp x pp of the saver (DCP keeps the full, global tensors). megatron-core stacks the layers
into one tensor per name (`decoder.layers.self_attention.linear_qkv.weight` of shape
[num_layers, 3h, h]) and names the input norms as Transformer Engine fuses them
(`linear_qkv.layer_norm_weight`); both become our per-layer names. Its fused QKV (per query group:
q heads, k, v) and fc1 (SwiGLU: [gate; up]) rows are ours already. `_extra_state` entries (pickled
ShardedObjects) are never read. Refused by name: mixture-of-experts (`experts`) keys, optimizer
states (`optimizer.` keys, saved by megatron-core's distributed optimizer: load with --no-load-optim
or --finetune), flattened-range (`fully_sharded_model_space`) layouts and any tensor whose shape is
not the model's.
"""

from __future__ import annotations

import json
import os
import re

import torch

from megatron_lite.checkpointing.dist_read import DCPTensors, resolve_iteration_dir
from megatron_lite.checkpointing.files import CheckpointError
from megatron_lite.checkpointing.hf_reader import WeightsOnlyReader
from megatron_lite.checkpointing.megatron import _TE_NAMES, config_from_args, load_megatron_file

MCORE_METADATA = "metadata.json"
_STACKED = re.compile(r"^decoder\.layers\.(.+)$")
_REFUSED = {
    "experts": "mixture-of-experts layers are not supported",
    "optimizer.": "megatron-core's optimizer state is not read (load with --no-load-optim or "
    "--finetune)",
}
# the local spec's names -> Transformer Engine's, which megatron-core writes for both
_TE_OF = {ours: te for te, ours in _TE_NAMES.items()}


def is_mcore_dist_dir(iter_dir: str) -> bool:
    path = os.path.join(iter_dir, MCORE_METADATA)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        try:
            return json.load(f).get("sharded_backend") == "torch_dist"
        except (json.JSONDecodeError, AttributeError):
            return False


class McoreDistReader(WeightsOnlyReader):
    """A megatron-core torch_dist checkpoint through the CheckpointReader interface (weights only).

    `config`: our config (plain dict) of the model, needed when `common.pt` carries no `args`
    (a bare `dist_checkpointing.save`); `--load` passes the run's own."""

    weights_only = True

    def __init__(self, load_dir: str, iteration: int | None = None, config: dict | None = None):
        self.dir = resolve_iteration_dir(load_dir, iteration)
        common_path = os.path.join(self.dir, "common.pt")
        common = load_megatron_file(common_path) if os.path.isfile(common_path) else {}
        args = common.get("args")
        if args is not None:
            config = config_from_args(args)
        if config is None:
            raise CheckpointError(
                f"{self.dir}: a megatron-core torch_dist checkpoint without args in common.pt; "
                "give the model's flags (--load does: the run's own model settings are used)"
            )
        self.config = config
        # Megatron's loop keeps it in common.pt; a bare save has only the directory's name
        named = re.search(r"iter_(\d+)", os.path.basename(self.dir.removesuffix(".old")))
        self.iteration = int(common.get("iteration") or (named.group(1) if named else 0))
        self.consumed_samples = int(getattr(args, "consumed_train_samples", 0) or 0)
        self.vocab_size: int | None = None
        self.tp = self.pp = 1  # DCP holds global tensors: read as if saved at tp = pp = 1
        self.layout = {"tp": None, "pp": None, "dp": None, "vpp": None}
        self.tensors = DCPTensors(self.dir)
        self._stacked: dict[str, torch.Tensor] = {}
        keys = self.tensors.keys()
        for key in keys:
            for part, why in _REFUSED.items():
                if part in key:
                    if part == "optimizer.":
                        continue  # weights load without it
                    raise CheckpointError(f"{self.dir}: {key}: {why}")
        self._keys = set(keys)
        self._has_optim = any(k.startswith("optimizer.") for k in keys)
        self._names = [n for k in keys for n in self._ours(k)]

    def _ours(self, key: str) -> list[str]:
        """Our names for megatron-core key `key` (a stacked layer key: one per layer)."""
        if key.startswith("optimizer.") or "_extra_state" in key:
            return []
        m = _STACKED.match(key)
        if not m:
            return [key]
        rest = _TE_NAMES.get(m.group(1), m.group(1))
        n = self.config["model"]["num_layers"]
        return [f"decoder.layers.{i}.{rest}" for i in range(n)]

    def file(self, tp_rank: int = 0, pp_rank: int = 0) -> dict:  # noqa: ARG002
        return {"optimizer": None, "opt_param_scheduler": None, "rng_state": None, "extra": {}}

    def full_tensor(self, name: str, state_key: str | None = None) -> torch.Tensor:
        if state_key is not None:
            raise CheckpointError(f"{self.dir}: megatron-core optimizer state is not read")
        m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", name)
        if not m:
            return self.tensors.full(name)
        layer, rest = int(m.group(1)), m.group(2)
        key = f"decoder.layers.{_TE_OF.get(rest, rest)}"
        if key not in self._keys:  # saved under the local spec's name
            key = f"decoder.layers.{rest}"
        if key not in self._keys:
            raise CheckpointError(f"{self.dir} holds no tensor {key} (for {name})")
        if key not in self._stacked:
            stacked = self.tensors.full(key)
            n = self.config["model"]["num_layers"]
            if stacked.dim() < 1 or stacked.shape[0] != n:
                raise CheckpointError(
                    f"{self.dir}: {key} has shape {list(stacked.shape)}, not [num_layers={n}, ...] "
                    "(only megatron-core's stacked plain ShardedTensors are supported)"
                )
            self._stacked[key] = stacked
        return self._stacked[key][layer]
