"""Megatron-LM's legacy checkpoints (`--ckpt-format torch`) read as users have them.

    <load>/latest_checkpointed_iteration.txt
    <load>/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt

Each file is a pickled dict: `args` (an `argparse.Namespace`), `checkpoint_version`, `iteration`,
`model` (or `model0`, `model1`, ... under virtual pipelining), `optimizer`, `opt_param_scheduler`,
`rng_state` (with numpy's RNG state) and `num_floating_point_operations_so_far`. Files of pp > 1 number
their layers locally (`mp_rank_00_001` holds `decoder.layers.0.` of its stage); parameter names are
megatron-core's, with Transformer Engine's fused-norm names (`linear_qkv.layer_norm_weight`) where
`--transformer-impl transformer_engine` (Megatron's default) built the model.

Loading stays free of arbitrary unpickling: `torch.load(weights_only=True)` with exactly
`argparse.Namespace` and numpy's array/dtype reconstruction (for the RNG state) allowed, and any other
pickled object refused. What is read: the weights (any tp x pp x vpp, GPT-2 and Llama flavours), the
iteration, the consumed samples and the model settings from `args`. What is not: Megatron's optimizer
state layout (load with --no-load-optim, or --finetune) and its RNG states (not restored).
"""

from __future__ import annotations

import argparse
import os
import pickletools
import re
import zipfile
from typing import Any

import torch

from megatron_lite.checkpointing.files import (
    LATEST_FILE,
    MEGATRON_GLOBALS,
    MODEL_FILE,
    CheckpointError,
    iteration_dir,
    read_latest_iteration,
)
from megatron_lite.checkpointing.hf_rules import OUTPUT_WEIGHT, WORD_EMBEDDING
from megatron_lite.checkpointing.load import assemble_full_tensor
from megatron_lite.checkpointing.torch_format import EXTRA_STATE, layer_offset, renumber
from megatron_lite.config import Config
from megatron_lite.config.model import CHECKPOINT_MODEL_ARGS
from megatron_lite.model.gpt import build_meta_chunk
from megatron_lite.tensor_parallel.utils import ParamTags, tags_of

# Transformer Engine's fused layer-norm parameter names -> the local spec's (ours)
_TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# args that name our settings differently
_ARG_ALIASES = {"layernorm_epsilon": "norm_epsilon"}


def _pickle_ops(path: str):
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        data = z.read(pkl)
    return pickletools.genops(data)


def pickled_globals(path: str) -> set[str]:
    """Every `module.name` a torch zip file's pickle refers to, read without unpickling."""
    return {arg.replace(" ", ".") for op, arg, _ in _pickle_ops(path) if op.name == "GLOBAL"}


def is_megatron_file(path: str) -> bool:
    """Megatron-LM's file: its pickle names an argparse.Namespace, and it is not one of ours (which
    carry `args` too, for Megatron-LM's loader, beside our `shard_info`)."""
    try:
        ops = [(op.name, arg) for op, arg, _ in _pickle_ops(path)]
    except (OSError, zipfile.BadZipFile, StopIteration, ValueError):
        return False
    namespace = ("GLOBAL", "argparse Namespace") in ops
    ours = any(name.endswith("UNICODE") and arg == "shard_info" for name, arg in ops)
    return namespace and not ours


def is_megatron_dir(load_dir: str, iteration: int | None = None) -> bool:
    """Whether `load_dir` holds a Megatron-LM legacy checkpoint (its first file's pickle names an
    argparse.Namespace)."""
    try:
        it = iteration if iteration is not None else read_latest_iteration(load_dir)
    except (OSError, ValueError, CheckpointError):
        return False
    if it is None:
        return False
    d = iteration_dir(load_dir, it)
    return any(
        is_megatron_file(os.path.join(d, n, MODEL_FILE)) for n in ("mp_rank_00", "mp_rank_00_000")
    )


class MegatronValue:
    """Stands in for a value of one of Megatron's own classes in `args` (an enum such as
    `AttnBackend.auto`): built by us from the pickled arguments, so none of its code runs."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __repr__(self) -> str:
        return f"MegatronValue{self.args!r}"


def load_megatron_file(path: str) -> dict:
    # megatron's own classes (enums in args) become inert placeholders; anything else is refused
    try:
        own = [(MegatronValue, g) for g in pickled_globals(path) if g.startswith("megatron.")]
        with torch.serialization.safe_globals([*MEGATRON_GLOBALS, *own]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: not loadable as a Megatron-LM checkpoint: only tensors, plain types, "
            f"argparse.Namespace and numpy arrays are allowed ({type(e).__name__}: {e})"
        ) from e


# what a checkpoint's args decide here: the model's shape and numerics, the tokenizer, the precision
_FROM_ARGS = {
    "model": ("seq_length", *CHECKPOINT_MODEL_ARGS),
    "data": ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size"),
    "optim": ("bf16", "fp16"),
}


def config_from_args(args: argparse.Namespace) -> dict:
    """Our config (plain dict) from a Megatron-LM run's `args`: the settings `_FROM_ARGS` names,
    read under Megatron's names (the same as ours, but `norm_epsilon`)."""
    base = Config().to_dict()
    for section, keys in _FROM_ARGS.items():
        for key in keys:
            for name in (_ARG_ALIASES.get(key, key), key):
                if getattr(args, name, None) is not None:
                    base[section][key] = getattr(args, name)
                    break
    m = base["model"]
    if getattr(args, "num_query_groups", None) is None or not getattr(
        args, "group_query_attention", False
    ):
        m["num_query_groups"] = m["num_attention_heads"]
    if getattr(args, "kv_channels", None) is None:
        m["kv_channels"] = m["hidden_size"] // m["num_attention_heads"]
    if getattr(args, "ffn_hidden_size", None) is None:
        m["ffn_hidden_size"] = 4 * m["hidden_size"]
    return Config.from_dict(base).to_dict()


def _global_name(name: str, offset: int) -> str | None:
    """Megatron's stage-local name -> our global one (None for `_extra_state` entries); `offset`:
    the global number of the chunk's first layer (torch_format.layer_offset)."""
    if name.endswith(EXTRA_STATE):
        return None
    m = _LOCAL_LAYER.match(name)
    if m:
        name = f"decoder.layers.{m.group(1)}.{_TE_NAMES.get(m.group(2), m.group(2))}"
    return renumber(name, offset)


class MegatronReader:
    """A Megatron-LM legacy checkpoint through the CheckpointReader interface (weights only)."""

    def __init__(self, load_dir: str, iteration: int | None = None):
        if iteration is None:
            iteration = read_latest_iteration(load_dir)
            if iteration is None:
                raise CheckpointError(f"no {LATEST_FILE} in {load_dir}: nothing to load")
        self.dir = iteration_dir(load_dir, iteration)
        # the first file names the layout (tp 0 of stage 0: mp_rank_00, or mp_rank_00_000 at pp > 1)
        first_dir = (
            "mp_rank_00"
            if os.path.isdir(os.path.join(self.dir, "mp_rank_00"))
            else "mp_rank_00_000"
        )
        first = load_megatron_file(os.path.join(self.dir, first_dir, MODEL_FILE))
        self.args = first["args"]
        self.config = config_from_args(self.args)
        self.tp = int(self.args.tensor_model_parallel_size)
        self.pp = int(self.args.pipeline_model_parallel_size)
        chunks = sorted(k for k in first if re.fullmatch(r"model\d+", k))
        self.vpp = len(chunks) if chunks else None
        self.layout = {"tp": self.tp, "pp": self.pp, "dp": None, "vpp": self.vpp}
        self.iteration = int(first.get("iteration", 0))
        self.consumed_samples = int(getattr(self.args, "consumed_train_samples", 0) or 0)
        self.vocab_size: int | None = None  # every saved row is a real one: Megatron masks none
        self._check_supported()
        self._stages: dict[int, list[dict[str, torch.Tensor]]] = {}
        self._param_tags: dict[str, ParamTags] | None = None

    def _check_supported(self) -> None:
        a = self.args
        for key in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
            if getattr(a, key, None):
                raise CheckpointError(
                    f"{self.dir}: uneven pipeline stages ({key}) are not supported"
                )
        if getattr(a, "num_experts", None):
            raise CheckpointError(
                f"{self.dir}: mixture-of-experts checkpoints are not supported yet"
            )
        if getattr(a, "expert_model_parallel_size", 1) not in (1, None):
            raise CheckpointError(f"{self.dir}: expert-parallel files are not supported yet")

    def path(self, tp_rank: int, pp_rank: int) -> str:
        name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if self.pp > 1 else "")
        return os.path.join(self.dir, name, MODEL_FILE)

    def _stage(self, pp_rank: int) -> list[dict[str, torch.Tensor]]:
        """Per tp rank, {global name: shard} of pipeline stage `pp_rank`."""
        if pp_rank not in self._stages:
            num_layers = self.config["model"]["num_layers"]
            shards = []
            for tp_rank in range(self.tp):
                sd = load_megatron_file(self.path(tp_rank, pp_rank))
                keys = [f"model{c}" for c in range(self.vpp)] if self.vpp else ["model"]
                named = {}
                for c, key in enumerate(keys):
                    for name, t in sd[key].items():
                        offset = layer_offset(num_layers, self.pp, self.vpp, pp_rank, c)
                        g = _global_name(name, offset)
                        if g is not None:
                            named[g] = t
                shards.append(named)
            self._stages[pp_rank] = shards
        return self._stages[pp_rank]

    def names(self) -> list[str]:
        return [n for s in range(self.pp) for n in self._stage(s)[0]]

    def locate(self, name: str) -> int | None:
        return next((s for s in range(self.pp) if name in self._stage(s)[0]), None)

    def has_optimizer(self) -> bool:
        return False

    def optimizer_state_keys(self, name: str) -> list[str]:  # noqa: ARG002
        return []

    def file(self, tp_rank: int = 0, pp_rank: int = 0) -> dict[str, Any]:  # noqa: ARG002
        return {"optimizer": None, "opt_param_scheduler": None, "rng_state": None, "extra": {}}

    def full_tensor(self, name: str, state_key: str | None = None) -> torch.Tensor:
        if state_key is not None:
            raise CheckpointError(f"{self.dir}: Megatron-LM optimizer state is not read")
        stage = self.locate(name)
        if stage is None:
            raise CheckpointError(f"{self.dir} holds no tensor named {name}")
        shards = [s[name] for s in self._stage(stage)]
        tags = self._tags().get(name)
        if self.tp == 1 or tags is None or not tags.tensor_model_parallel:
            return shards[0]
        return assemble_full_tensor(shards, tags.partition_dim, tags.partition_stride)

    def _tags(self) -> dict[str, ParamTags]:
        """How each tensor is split over tp: the tags of our model of the same config (whose names
        and splits are megatron-core's), built once on the meta device."""
        if self._param_tags is None:
            cfg = Config.from_dict(self.config)
            cfg.parallel.pipeline_model_parallel_size = 1
            cfg.parallel.num_layers_per_virtual_pipeline_stage = None
            model = build_meta_chunk(cfg, 0, cfg.model.make_vocab_size_divisible_by)
            tags = {n: tags_of(t) for n, t in model.state_dict(keep_vars=True).items()}
            # tied at pp > 1, the last stage's copy of the embedding is split as the embedding
            tags.setdefault(OUTPUT_WEIGHT, tags[WORD_EMBEDDING])
            self._param_tags = tags
        return self._param_tags
