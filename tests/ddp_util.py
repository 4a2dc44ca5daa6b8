"""A tiny tagged model for the DDP/optimizer tests: tied embedding, tp-split MLP blocks, two stages.

    embedding E[tokens] -> block 0 -> block 1 -> logits = h @ E^T

Each block is x + W2 gelu(W1 (x * g) + b1) + b2 with W1 column-split and W2 row-split over tp, and the
scale g applied on sequence shards (Megatron's sequence parallelism: its gradient is a partial sum per
tp rank, tagged `sequence_parallel`). With pp = 2 the first stage holds E and block 0, the last block 1
and its own copy of E (tagged `shared_embedding`). Every layout starts from the same full tensors
(seeded), so a name means the same tensor everywhere and the unsplit model is the reference.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

H, FFN, VOCAB, SEQ = 8, 16, 12, 4


class _ScatterSeq(torch.autograd.Function):
    """Forward: keep this tp rank's sequence slice. Backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n, r = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(n, dim=0)[r].contiguous()

    @staticmethod
    def backward(ctx, g):
        n = dist.get_world_size(ctx.group)
        out = torch.empty((g.shape[0] * n, *g.shape[1:]), dtype=g.dtype)
        dist.all_gather_into_tensor(out, g.contiguous(), group=ctx.group)
        return out, None


class _GatherSeq(torch.autograd.Function):
    """Forward: all-gather sequence slices. Backward: reduce-scatter (the consumers are tp-split)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        out = torch.empty((x.shape[0] * n, *x.shape[1:]), dtype=x.dtype)
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        n = dist.get_world_size(ctx.group)
        out = torch.empty((g.shape[0] // n, *g.shape[1:]), dtype=g.dtype)
        dist.reduce_scatter_tensor(out, g.contiguous(), group=ctx.group)
        return out, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def full_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """The unsplit model, by global name (block i's tensors are `layers.{i}.*`)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=gen) * scale

    t = {"embedding.weight": rnd(VOCAB, H, scale=0.5)}
    for i in range(2):
        t |= {
            f"layers.{i}.g": 1.0 + rnd(H, scale=0.1),
            f"layers.{i}.w1": rnd(FFN, H, scale=0.3),
            f"layers.{i}.b1": rnd(FFN, scale=0.1),
            f"layers.{i}.w2": rnd(H, FFN, scale=0.3),
            f"layers.{i}.b2": rnd(H, scale=0.1),
        }
    return t


PARTITION_DIM = {"w1": 0, "b1": 0, "w2": 1}  # everything else is replicated over tp


def shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    dim = PARTITION_DIM.get(name.rsplit(".", 1)[-1], -1)
    return full if dim < 0 else full.chunk(tp_size, dim=dim)[tp_rank]


def _param(full: torch.Tensor, name: str, tp_rank: int, tp_size: int, **tags) -> nn.Parameter:
    p = nn.Parameter(shard(name, full, tp_rank, tp_size).clone())
    dim = PARTITION_DIM.get(name.rsplit(".", 1)[-1], -1)
    p.tensor_model_parallel = dim >= 0 and tp_size > 1
    p.partition_dim = dim if p.tensor_model_parallel else -1
    p.partition_stride = 1
    p.sequence_parallel = name.endswith(".g") and tp_size > 1
    p.shared_embedding = tags.get("shared_embedding", False)
    return p


class Block(nn.Module):
    def __init__(self, i: int, t: dict, tp_rank: int, tp_size: int, tp_group) -> None:
        super().__init__()
        self.tp_group = tp_group if tp_size > 1 else None
        for k in ("g", "w1", "b1", "w2", "b2"):
            name = f"layers.{i}.{k}"
            setattr(self, k, _param(t[name], name, tp_rank, tp_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [s, b, h], replicated over tp
        a = x
        if self.tp_group is not None:
            a = _ScatterSeq.apply(x, self.tp_group)  # [s/tp, b, h]
        a = a * self.g
        if self.tp_group is not None:
            a = _GatherSeq.apply(a, self.tp_group)  # [s, b, h]
        u = F.gelu(F.linear(a, self.w1, self.b1))  # [s, b, ffn/tp]
        v = F.linear(u, self.w2)
        if self.tp_group is not None:
            v = _ReduceFromTP.apply(v, self.tp_group)
        return x + v + self.b2


class ToyNet(nn.Module):
    """This pipeline stage's part of the toy ('all' = the whole model, tied embedding)."""

    def __init__(self, ps, stage: str = "all", seed: int = 0, dtype=torch.float32) -> None:
        super().__init__()
        t = full_tensors(seed)
        self.stage = stage
        tp_rank, tp_size = ps.tp_rank, ps.tp_size
        first, last = stage in ("all", "first"), stage in ("all", "last")
        shared = stage != "all"
        if first:
            self.embedding = nn.Module()
            self.embedding.weight = _param(
                t["embedding.weight"], "embedding", tp_rank, tp_size, shared_embedding=shared
            )
        self.layers = nn.ModuleDict(
            {
                str(i): Block(i, t, tp_rank, tp_size, ps.tp_group)
                for i in ((0, 1) if stage == "all" else (0,) if first else (1,))
            }
        )
        if last and shared:
            self.output = nn.Module()
            self.output.weight = _param(
                t["embedding.weight"], "output", tp_rank, tp_size, shared_embedding=True
            )
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """tokens [s, b] (first stage) or hidden [s, b, h] -> hidden, or logits [s, b, V] (last)."""
        if self.stage != "last":
            x = F.embedding(x, self.embedding.weight)
        for layer in self.layers.values():
            x = layer(x)
        if self.stage == "first":
            return x
        w = self.embedding.weight if self.stage == "all" else self.output.weight
        return F.linear(x, w)


def reference_name(name: str) -> str:
    """The unsplit model's name for a stage's parameter (the last stage's output is the embedding)."""
    return "embedding.weight" if name == "output.weight" else name


def batch(step: int, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens and labels [s, global_batch] for one step (the same on every rank)."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (SEQ, global_batch), generator=gen)
    labels = torch.randint(0, VOCAB, (SEQ, global_batch), generator=gen)
    return tokens, labels


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
