"""`--ckpt-format torch` files in Megatron-LM's legacy layout, which its `load_checkpoint` reads.

What Megatron-LM reads from a `model_optim_rng.pt`: `model` (or `model0`, `model1`, ... under virtual
pipelining) with megatron-core's names and layers numbered from 0 in every pipeline stage and chunk,
`iteration`, `checkpoint_version` (3.0: it then compares tp and pp with `args`), `args` (an
`argparse.Namespace`: `check_checkpoint_args` compares the model's shape, padded vocabulary and
layout, and resumes `consumed_train_samples`), and, unless --no-load-optim / --no-load-rng /
--finetune, `optimizer`, `opt_param_scheduler` and `rng_state`. Our optimizer and RNG states are laid
out differently, so they go under `lite_optimizer` and `lite_rng_state`: Megatron, not finding its
own, stops and asks for --no-load-optim / --no-load-rng. Our own entries (`shard_info` keyed by global
names, `format_version`, `config`, `layout`, ...) are keys Megatron ignores.

Our `args` holds plain values only, and our loader allows `argparse.Namespace` and nothing else
(`files.ARGS_GLOBALS`); a Namespace with a value that is not plain, or one anywhere but `args`, is
refused (`files.safe_load`).
Version 1 files (`model` a list of chunk dicts with global layer numbers) still load.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch

from megatron_lite.checkpointing.files import CheckpointError, is_plain_arg
from megatron_lite.config.model import pad_vocab_size

TORCH_FORMAT_VERSION = 2  # 1: `model` a list of chunk dicts with global layer numbers
CHECKPOINT_VERSION = 3.0  # Megatron-LM's
OPTIMIZER_KEY = "lite_optimizer"  # ours, not Megatron's `optimizer` layout
RNG_KEY = "lite_rng_state"  # ours, not Megatron's `rng_state` layout
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LINEARS = tuple(f".{n}.weight" for n in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))
EXTRA_STATE = "._extra_state"


def layer_offset(num_layers: int, pp: int, vpp: int | None, pp_rank: int, chunk: int) -> int:
    """Global number of the first layer of chunk `chunk` on stage `pp_rank` (even stages: chunk c
    of stage r holds virtual stage c * pp + r, see docs/internals.md)."""
    per_chunk = num_layers // (pp * (vpp or 1))
    return (chunk * pp + pp_rank) * per_chunk


def renumber(name: str, delta: int) -> str:
    """`name` with its layer number shifted by `delta` (names outside decoder.layers unchanged)."""
    m = _LAYER.match(name)
    if not m:
        return name
    return f"decoder.layers.{int(m.group(1)) + delta}.{name[m.end() :]}"


def with_extra_state(tensors: dict[str, Any]) -> dict[str, Any]:
    """`tensors` plus the `_extra_state: None` entries megatron-core's local-spec linear layers
    have in their state dict (a strict `load_state_dict` wants them): each layer's four linears
    and, on the stage that has the final norm, the output layer (tied or not)."""
    out = dict(tensors)
    for name in tensors:
        if name.endswith(_LINEARS):
            out[name.rsplit(".", 1)[0] + "._extra_state"] = None
    if "decoder.final_layernorm.weight" in tensors:
        out["output_layer._extra_state"] = None
    return out


def _model_keys(n_chunks: int) -> list[str]:
    return ["model"] if n_chunks == 1 else [f"model{c}" for c in range(n_chunks)]


def megatron_args(state: dict, ckpt_format: str = "torch") -> argparse.Namespace:
    """Megatron-LM's `args` for a file of `state` (our neutral per-file entries): every plain
    config value under its (Megatron's) name, plus the layout, padded vocabulary and progress."""
    cfg, lay = state["config"], state["layout"]
    values: dict[str, Any] = {}
    for section in cfg.values():
        if isinstance(section, dict):
            for k, v in section.items():
                if is_plain_arg(v):
                    values.setdefault(k, v)
    m = cfg["model"]
    vocab = state["vocab_size"]
    values.update(
        tensor_model_parallel_size=lay["tp"],
        pipeline_model_parallel_size=lay["pp"],
        virtual_pipeline_model_parallel_size=lay["vpp"],
        data_parallel_size=lay["dp"],
        use_distributed_optimizer=lay["use_distributed_optimizer"],
        padded_vocab_size=(
            pad_vocab_size(vocab, m["make_vocab_size_divisible_by"], lay["tp"])
            if vocab is not None
            else None
        ),
        vocab_size=vocab,
        norm_epsilon=m["layernorm_epsilon"],
        # Megatron-LM's argparse default (only --no-position-embedding clears it); its rope runs
        # pass --position-embedding-type rope and keep it, and check_checkpoint_args compares it
        add_position_embedding=True,
        use_rotary_position_embeddings=m["position_embedding_type"] == "rope",
        transformer_impl="local",  # megatron-core's local spec names (no fused TE norms)
        consumed_train_samples=state["consumed_samples"],
        iteration=state["iteration"],
        ckpt_format=ckpt_format,
    )
    return argparse.Namespace(**values)


def to_file(state: dict, models: list[dict[str, torch.Tensor]], pp_rank: int) -> dict:
    """One (tp, pp) file in Megatron-LM's layout from our neutral entries (`state`: config, layout,
    vocab_size, iteration, consumed_samples, shard_info, optimizer, rng_state, ...) and this
    place's chunks (global names): stage-local layer numbers, Megatron's keys beside ours."""
    out = {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng_state")}
    m, lay = state["config"]["model"], state["layout"]
    for c, (key, tensors) in enumerate(zip(_model_keys(len(models)), models, strict=True)):
        delta = -layer_offset(m["num_layers"], lay["pp"], lay["vpp"], pp_rank, c)
        out[key] = with_extra_state({renumber(n, delta): t for n, t in tensors.items()})
    out.update(
        format_version=TORCH_FORMAT_VERSION,
        checkpoint_version=CHECKPOINT_VERSION,
        args=megatron_args(state),
        num_floating_point_operations_so_far=0,
        **{OPTIMIZER_KEY: state.get("optimizer"), RNG_KEY: state.get("rng_state")},
    )
    return out


def from_file(state: dict, pp_rank: int, path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our neutral entries, {global name: tensor}) of a loaded file of either version."""
    if state.get("format_version") != TORCH_FORMAT_VERSION:  # version 1: global names already
        return state, {n: t for m in state["model"] for n, t in m.items()}
    lay, num_layers = state["layout"], state["config"]["model"]["num_layers"]
    keys = _model_keys(lay["vpp"] or 1)
    index = {}
    for c, key in enumerate(keys):
        if key not in state:
            raise CheckpointError(f"{path} has no '{key}' entry (layout {lay})")
        delta = layer_offset(num_layers, lay["pp"], lay["vpp"], pp_rank, c)
        index.update(
            {renumber(n, delta): t for n, t in state[key].items() if not n.endswith(EXTRA_STATE)}
        )
    if set(index) != set(state["shard_info"]):
        odd = sorted(set(index) ^ set(state["shard_info"]))[:3]
        raise CheckpointError(
            f"{path}: its model entries do not match its shard_info once renumbered for pipeline "
            f"rank {pp_rank} (e.g. {odd}); the file is not from stage {pp_rank}"
        )
    neutral = {k: v for k, v in state.items() if k not in (*keys, "args")}
    neutral["optimizer"], neutral["rng_state"] = state[OPTIMIZER_KEY], state[RNG_KEY]
    return neutral, index
