"""The dense MLP: the transformer layer's feed-forward block and the MoE layer's shared expert
(it lives apart from both so that model/transformer.py and model/moe/ need not import each other)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.comm import Group
from megatron_lite.config import Config
from megatron_lite.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


class MLP(nn.Module):
    """h -> ffn (GeLU) or 2 x ffn (SwiGLU: gate and up stacked, stride 2) -> h."""

    def __init__(self, cfg: Config, tp_group: Group, output_std: float):
        super().__init__()
        m, sp = cfg.model, cfg.parallel.sequence_parallel
        self.swiglu = m.swiglu
        self.gelu_approximate = "tanh" if m.openai_gelu else "none"
        common = dict(tp_group=tp_group, bias=m.add_bias_linear, sequence_parallel=sp)
        self.linear_fc1 = ColumnParallelLinear(
            m.hidden_size,
            m.ffn_hidden_size * (2 if m.swiglu else 1),
            init_std=m.init_method_std,
            stride=2 if m.swiglu else 1,
            **common,
        )
        self.linear_fc2 = RowParallelLinear(
            m.ffn_hidden_size, m.hidden_size, init_std=output_std, skip_bias_add=True, **common
        )

    def forward(self, x: torch.Tensor):
        h, _ = self.linear_fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        return self.linear_fc2(h)
