"""This rank's experts: `local_experts.{E}` keyed by *global* expert index E (as layers are keyed by
global layer number), so names, initial values and checkpoints are the same in every ep layout.

Each expert is an MLP split over tp like the dense one (fc1 by output rows, fc2 by input columns),
with no communication of its own: the MoE layer all-reduces the combined output over tp once, and
all-reduces the expert inputs' gradient once, instead of once per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.comm import Group, group_rank, group_size
from megatron_lite.config import Config
from megatron_lite.tensor_parallel.utils import (
    set_default_attributes,
    set_tensor_model_parallel_attributes,
)


def _param(shape: tuple[int, ...], init_std, tp_dim: int, stride: int = 1) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    set_tensor_model_parallel_attributes(p, tp_dim >= 0, tp_dim, stride)
    p.init_std = init_std
    p.expert_parallel = True
    set_default_attributes(p)
    return p


class ExpertLinear(nn.Module):
    """weight [out, in] (this tp rank's shard) and an optional bias; `forward` is F.linear."""

    def __init__(
        self, out_features: int, in_features: int, init_std, tp_dim: int, stride: int, bias: bool
    ):
        super().__init__()
        self.weight = _param((out_features, in_features), init_std, tp_dim, stride)
        self.bias = None
        if bias:  # fc1's bias is split with its rows; fc2's is whole (added on tp rank 0 only)
            self.bias = _param((out_features,), "zeros", 0 if tp_dim == 0 else -1, stride)
            self.bias.sequence_parallel = tp_dim != 0  # its tp-partial gradients are summed

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias if add_bias else None)


class Expert(nn.Module):
    def __init__(self, cfg: Config, tp_size: int, output_std: float):
        super().__init__()
        m = cfg.model
        ffn = cfg.moe_ffn_hidden_size // tp_size
        self.swiglu = m.swiglu
        self.gelu_approximate = "tanh" if m.openai_gelu else "none"
        rows = ffn * (2 if m.swiglu else 1)
        stride = 2 if m.swiglu else 1
        bias = m.add_bias_linear
        self.linear_fc1 = ExpertLinear(rows, m.hidden_size, m.init_method_std, 0, stride, bias)
        self.linear_fc2 = ExpertLinear(m.hidden_size, ffn, output_std, 1, 1, bias)

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h, approximate=self.gelu_approximate)


class LocalExperts(nn.Module):
    """Experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of one MoE layer."""

    def __init__(self, cfg: Config, ep_rank: int, ep_size: int, tp_group: Group, output_std: float):
        super().__init__()
        per_rank = cfg.moe.num_experts // ep_size
        self.first = ep_rank * per_rank
        self.num_local = per_rank
        self.grouped_gemm = cfg.moe.moe_grouped_gemm
        self.fc2_bias_here = group_rank(tp_group) == 0  # fc2's bias once in the tp sum
        tp = group_size(tp_group)
        self.local_experts = nn.ModuleDict(
            {str(self.first + i): Expert(cfg, tp, output_std) for i in range(per_rank)}
        )

    def forward(
        self, x: torch.Tensor, counts: list[int], pad_to: int | None = None
    ) -> torch.Tensor:
        """x [N, h]: each local expert's tokens in turn (`counts` rows each) -> [N, h], partial
        over tp. `pad_to`: run each expert on exactly that many rows (zeros appended), as
        --moe-pad-expert-input-to-capacity asks; the padding rows' outputs are dropped."""
        experts = list(self.local_experts.values())
        if self._grouped_ok(x, pad_to):
            return self._grouped(x, counts, experts)
        outs = []
        for expert, chunk in zip(experts, x.split(counts)):
            n = len(chunk)
            if pad_to is not None and pad_to > n:
                chunk = torch.cat([chunk, chunk.new_zeros(pad_to - n, chunk.shape[1])])
            h = expert.activation(expert.linear_fc1(chunk))
            outs.append(expert.linear_fc2(h, add_bias=self.fc2_bias_here)[:n])
        return torch.cat(outs) if outs else x[:0]

    def _grouped_ok(self, x: torch.Tensor, pad_to: int | None) -> bool:
        """torch's grouped matmul (torch._grouped_mm, CPU and CUDA) fits: no biases, no padding,
        rows a multiple of 16 bytes (its kernels' limits); else the loop."""
        if not (self.grouped_gemm and hasattr(torch, "_grouped_mm")) or pad_to is not None:
            return False
        first = next(iter(self.local_experts.values()))
        fc1, fc2 = first.linear_fc1, first.linear_fc2
        dims = (*fc1.weight.shape, *fc2.weight.shape)
        aligned = all(n * x.element_size() % 16 == 0 for n in dims)
        return fc1.bias is None and aligned and x.dtype in (torch.float32, torch.bfloat16)

    def _grouped(self, x: torch.Tensor, counts: list[int], experts: list[Expert]) -> torch.Tensor:
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        w1 = torch.stack([e.linear_fc1.weight for e in experts]).transpose(1, 2)  # [E, h, f]
        w2 = torch.stack([e.linear_fc2.weight for e in experts]).transpose(1, 2)  # [E, f, h]
        h = experts[0].activation(torch._grouped_mm(x, w1, offs=offs))
        return torch._grouped_mm(h, w2, offs=offs)
