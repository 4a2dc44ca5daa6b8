"""On a GPU: the CUDA fused softmax kernels equal the torch path, and the GPT trains the same with the
fused, SDPA and unfused attention paths."""

import pytest
import torch
from factory import NO_DROPOUT, tiny_config

from megatron_lite import _extensions
from megatron_lite.model import build_model_chunks
from megatron_lite.model.fused_softmax import FusedScaleMaskSoftmax, torch_softmax
from megatron_lite.parallel_state import ParallelState

pytestmark = pytest.mark.gpu
TOLS = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=4e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}


CASES = [
    (kind, shape)
    for kind in ("causal", "padding", "none")
    for shape in ((2, 4, 64, 64), (1, 2, 1000, 1000), (2, 2, 8, 4096))
    if kind != "causal" or shape[2] == shape[3]  # causal needs sq == sk
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,shape", CASES)
def test_cuda_kernel_matches_torch_path(dtype, kind, shape):
    ext = _extensions.load("_fused_kernels")
    assert ext is not None and ext.has_cuda, "the extension was built without CUDA"
    b, np_, sq, sk = shape
    x = (torch.randn(shape, device="cuda") * 4).to(dtype)
    mask = (torch.rand(b, 1, sq, sk, device="cuda") < 0.3) if kind == "padding" else None
    module = FusedScaleMaskSoftmax("causal" if kind == "causal" else "padding", True, 0.3)
    assert module.is_kernel_available(x, mask)
    g = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = module(xa, mask)
    yb = torch_softmax(xb, mask, 0.3, causal=kind == "causal")
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(ya, yb, **TOLS[dtype])
    torch.testing.assert_close(xa.grad, xb.grad, **TOLS[dtype])


def test_gpt_loss_is_the_same_for_every_attention_backend_on_cuda():
    losses = {}
    for backend in ("fused", "sdpa", "unfused"):
        cfg = tiny_config(hidden_size=64, seq_length=64, **NO_DROPOUT, attention_backend=backend)
        model = build_model_chunks(cfg, ParallelState.single(), 128, device="cuda")[0]
        torch.manual_seed(0)
        tokens = torch.randint(0, 128, (2, 64), device="cuda")
        losses[backend] = model(tokens, None, None, tokens).mean().item()
    assert abs(losses["fused"] - losses["unfused"]) < 1e-4, losses
    assert abs(losses["sdpa"] - losses["unfused"]) < 1e-4, losses
