"""A Hugging Face model directory (config.json + safetensors) read as a megatron_lite checkpoint.

`HFReader` reads a HF directory through the CheckpointReader interface (full tensors by our global
names, by the rules of `hf_rules.py`), so the loader's reshard path (`checkpointing.shard_from_reader`)
imports HF weights into any tp x pp. `hf_export.export_hf` writes any reader to HF format one tensor
at a time.
"""

from __future__ import annotations

import json
import os

import torch

from megatron_lite.checkpointing import CheckpointError, CheckpointReader
from megatron_lite.checkpointing.hf_rules import (
    LAYER_NAME,
    OUTPUT_WEIGHT,
    SPECIAL_TOKENS,
    Rule,
    config_from_hf,
    rules_for,
)
from megatron_lite.config import precision_of
from megatron_lite.device import PRECISION_DTYPES

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def training_dtype(cfg: dict) -> torch.dtype:
    """The model weights' dtype in a run of this config (masters stay fp32)."""
    o = cfg.get("optim", {})
    return PRECISION_DTYPES[precision_of(o.get("bf16", False), o.get("fp16", False))]


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


class WeightsOnlyReader:
    """What a reader of weights alone (an HF model, a megatron-core torch_dist save) answers the
    loader: one "file" holding every name in `self._names`, and no optimizer state."""

    _names: list[str]

    def names(self) -> list[str]:
        return list(self._names)

    def locate(self, name: str) -> int | None:
        return 0 if name in self._names else None

    def has_optimizer(self) -> bool:
        return False

    def optimizer_state_keys(self, name: str) -> list[str]:  # noqa: ARG002
        return []


class HFReader(WeightsOnlyReader):
    """A HF model directory seen as a one-stage megatron_lite checkpoint without optimizer state."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.dir = path
        with open(os.path.join(path, "config.json")) as f:
            self.hf = json.load(f)
        self.config = config_from_hf(self.hf)
        self.vocab_size: int = self.hf["vocab_size"]
        self.iteration, self.consumed_samples = 0, 0
        self.layout = {"tp": 1, "pp": 1, "dp": 1, "vpp": None}
        self.tp = self.pp = 1
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise CheckpointError(
                f"{path}: no model.safetensors (or index); only safetensors weights are read"
            )
        self._where: dict[str, object] = {}
        for name in files:
            handle = safe_open(os.path.join(path, name), framework="pt")
            for key in handle.keys():
                self._where[key] = handle
        m = self.config["model"]
        self._glob, self._layer, self._prefix = rules_for(m, self.config.get("moe"))
        self._names = self._our_names(m)

    def _our_names(self, m: dict) -> list[str]:
        def present(rule: Rule, prefix: str) -> bool:
            return all(prefix + h in self._where for h in rule.hf)

        names = [n for n, r in self._glob.items() if n != OUTPUT_WEIGHT and present(r, "")]
        for i in range(m["num_layers"]):
            prefix = self._prefix.format(i)
            names += [
                f"decoder.layers.{i}.{n}" for n, r in self._layer.items() if present(r, prefix)
            ]
        if m["untie_embeddings_and_output_weights"]:
            names.append(OUTPUT_WEIGHT)
        # the final norm after the layers, as the model's state dict orders them
        return sorted(names, key=lambda n: ("final_layernorm" in n) + 2 * (n == OUTPUT_WEIGHT))

    def file(self, tp_rank: int = 0, pp_rank: int = 0) -> dict:  # noqa: ARG002
        # the special token ids have no place in our config: an import keeps them in `extra`
        special = {k: self.hf.get(k) for k in SPECIAL_TOKENS}
        return {"optimizer": None, "opt_param_scheduler": None, "extra": {"hf": special}}

    def _get(self, hf_name: str) -> torch.Tensor:
        if hf_name not in self._where:
            raise CheckpointError(f"{self.dir} holds no tensor named {hf_name}")
        return self._where[hf_name].get_tensor(hf_name)

    def full_tensor(self, name: str, state_key: str | None = None) -> torch.Tensor:
        if state_key is not None:
            raise CheckpointError(f"{self.dir} is a Hugging Face model: no optimizer state")
        match = LAYER_NAME.match(name)
        rule = self._layer.get(match.group(2)) if match else self._glob.get(name)
        if rule is None or name not in self._names:
            raise CheckpointError(f"{self.dir} holds no tensor named {name}")
        prefix = self._prefix.format(match.group(1)) if match else ""
        return rule.join([self._get(prefix + h) for h in rule.hf]).contiguous()


def open_checkpoint(
    path: str, iteration: int | None = None, config: dict | None = None
) -> CheckpointReader | HFReader:
    """A reader for a megatron_lite checkpoint directory (either --ckpt-format), a HF model
    directory or a Megatron-LM (legacy `torch` format) checkpoint directory."""
    from megatron_lite.checkpointing.megatron import MegatronReader, is_megatron_dir

    if is_hf_dir(path):
        return HFReader(path)
    from megatron_lite.checkpointing.dist_read import open_dist_checkpoint

    dist_reader = open_dist_checkpoint(path, iteration, config)
    if dist_reader is not None:
        return dist_reader
    if is_megatron_dir(path, iteration):
        return MegatronReader(path, iteration)
    return CheckpointReader(path, iteration)
