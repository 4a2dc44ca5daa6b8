"""On CUDA without apex the inner optimizer is torch's fused AdamW; on CPU the default (foreach)."""

import sys
from unittest import mock

import torch

from megatron_lite.config import OptimConfig
from megatron_lite.optim import optimizer as opt_mod


class _CudaLooking(torch.Tensor):
    is_cuda = property(lambda self: True)


def test_cuda_without_apex_uses_torchs_fused_adamw():
    p = torch.zeros(4).as_subclass(_CudaLooking).requires_grad_()
    with mock.patch.dict(sys.modules, {"apex": None, "apex.optimizers": None}):
        inner = opt_mod._inner_optimizer(OptimConfig(lr=1e-3), [{"params": [p]}])
    assert isinstance(inner, torch.optim.AdamW) and inner.defaults["fused"] is True
    cpu = opt_mod._inner_optimizer(OptimConfig(lr=1e-3), [{"params": [torch.zeros(4)]}])
    assert not cpu.defaults["fused"]
