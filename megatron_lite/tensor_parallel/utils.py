"""Parameter tags and shard arithmetic shared by the layers, initialization and checkpoints.

Shards follow Megatron's `partition_stride` rule: the partition dim of the full tensor is cut into
`stride * tp_size` equal chunks and tp rank r holds chunks r, r + tp, r + 2 tp, ... concatenated.
Stride 1 is the plain contiguous split; the SwiGLU fc1 weight ([gate; up] stacked) uses stride 2 so
each rank holds matching gate and up rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class ParamTags:
    """How a parameter is sharded and shared (docs/internals.md); the defaults are a replicated,
    untied parameter's, so a tensor without tags (a plain module, a loaded full tensor) reads as one."""

    tensor_model_parallel: bool = False
    partition_dim: int = -1
    partition_stride: int = 1
    sequence_parallel: bool = False
    shared_embedding: bool = False
    init_name: str | None = None
    init_rows: int | None = None  # rows drawn at init (the true vocabulary); the rest start zero
    expert_parallel: bool = False  # an MoE expert's: split over ep, gradients reduced over edp


_DEFAULTS = {f.name: f.default for f in fields(ParamTags)}


def tags_of(t: torch.Tensor) -> ParamTags:
    """The tags of `t` (the one reader of the attributes the layers set)."""
    return ParamTags(**{name: getattr(t, name, d) for name, d in _DEFAULTS.items()})


def tag_of(t: torch.Tensor, name: str):
    """One tag of `t`, without building the others (for per-step loops over every parameter)."""
    return getattr(t, name, _DEFAULTS[name])


def set_tensor_model_parallel_attributes(
    param: torch.Tensor, is_parallel: bool, partition_dim: int, stride: int = 1
) -> None:
    param.tensor_model_parallel = is_parallel
    param.partition_dim = partition_dim if is_parallel else -1
    param.partition_stride = stride


def set_default_attributes(param: torch.Tensor) -> None:
    """Every tag of docs/internals.md, with the defaults of a replicated parameter."""
    for f in fields(ParamTags):
        if f.name not in ("init_name", "init_rows") and not hasattr(param, f.name):
            setattr(param, f.name, f.default)


def shard_of(full: torch.Tensor, dim: int, stride: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """tp rank `tp_rank`'s shard of the full tensor (see the module docstring for `stride`)."""
    if dim < 0 or tp_size == 1:
        return full
    chunks = full.chunk(stride * tp_size, dim=dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=dim)


def full_from_shards(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of `shard_of`: the full tensor from every rank's shard, in tp-rank order."""
    if dim < 0 or len(shards) == 1:
        return shards[0]
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(len(shards))], dim=dim)


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    tags = tags_of(param)
    if tags.tensor_model_parallel:
        shape[tags.partition_dim] *= tp_size
    return tuple(shape)


def name_seed(seed: int, name: str) -> int:
    """A generator seed from (seed, global parameter name), stable across processes and runs."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def initialize_parameter(
    param: torch.Tensor, name: str, seed: int, tp_rank: int, tp_size: int
) -> None:
    """Fill `param` with its shard of the full tensor drawn from a (seed, name) generator.

    The parameter's `init_std` tag says how: a float draws N(0, std^2); "ones"/"zeros" are constant.
    `init_name` (if set) overrides the name, so a tied output weight draws the embedding's values;
    `init_rows` (if set) draws only that many leading rows (the true vocabulary), the rest are zero.
    """
    how = getattr(param, "init_std", 0.0)
    if how == "ones":
        param.fill_(1.0)
        return
    if how == "zeros" or how == 0.0:
        param.zero_()
        return
    tags = tags_of(param)
    gen = torch.Generator().manual_seed(name_seed(seed, tags.init_name or name))
    full = torch.zeros(full_shape(param, tp_size), dtype=torch.float32)
    # only the real rows are drawn, so they do not depend on how much padding follows them
    full[: tags.init_rows].normal_(0.0, float(how), generator=gen)
    shard = shard_of(
        full,
        param.partition_dim if param.tensor_model_parallel else -1,
        param.partition_stride,
        tp_rank,
        tp_size,
    )
    param.copy_(shard)
