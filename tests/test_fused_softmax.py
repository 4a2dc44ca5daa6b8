"""The fused scaled-masked-softmax kernels equal the plain torch path (values and gradients) for every
mask type and dtype, and the wrapper declines to the torch path where the kernel does not apply."""

import pytest
import torch

from megatron_lite import _extensions
from megatron_lite.model import fused_softmax
from megatron_lite.model.fused_softmax import FusedScaleMaskSoftmax, torch_softmax

TOLS = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=4e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}


def _mask(kind: str, b: int, sq: int, sk: int, gen):
    if kind == "padding":
        return torch.rand(b, 1, sq, sk, generator=gen) < 0.3
    if kind == "padding-broadcast":
        m = torch.rand(1, 1, sq, sk, generator=gen) < 0.3
        m[..., 0, :] = True  # one fully masked row: uniform output, zero gradient
        return m
    return None  # "causal" or "none"


def _both_paths(x, mask, kind, scale=0.37):
    mask_type = "causal" if kind == "causal" else "padding"
    fused = FusedScaleMaskSoftmax(mask_type, fusion=True, scale=scale)
    outs = []
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    for path in ("fused", "torch"):
        xi = x.clone().requires_grad_()
        if path == "fused":
            y = fused(xi, mask)
        else:
            y = torch_softmax(xi, mask, scale, causal=kind == "causal")
        y.backward(g)
        outs.append((y.detach(), xi.grad))
    return fused, outs


@pytest.fixture(params=["simd", "portable"])
def kernel_rows(request):
    """Run each kernel test with the AVX2 rows (where the CPU has them) and the portable rows."""
    ext = _extensions.load("_fused_kernels")
    assert ext is not None, "csrc/fused_kernels.cpp was not built: run `make build`"
    before = ext.set_simd_enabled(request.param == "simd")
    yield request.param
    ext.set_simd_enabled(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["causal", "padding", "padding-broadcast", "none"])
def test_fused_kernel_matches_torch_path(dtype, kind, kernel_rows):
    gen = torch.Generator().manual_seed(0)
    for b, np_, sq, sk in ((2, 3, 16, 16), (1, 2, 37, 37), (2, 1, 5, 130)):
        if kind == "causal" and sq != sk:
            continue
        x = (torch.randn(b, np_, sq, sk, generator=gen) * 4).to(dtype)
        mask = _mask(kind, b, sq, sk, gen)
        module, ((y, gx), (y_ref, gx_ref)) = _both_paths(x, mask, kind)
        assert module.is_kernel_available(x, mask)
        assert y.dtype == dtype and gx.dtype == dtype
        torch.testing.assert_close(y, y_ref, **TOLS[dtype])
        torch.testing.assert_close(gx, gx_ref, **TOLS[dtype])
        if kind == "causal":
            assert torch.all(y.float().triu(1) == 0) and torch.all(gx.float().triu(1) == 0)
        if mask is not None:
            assert torch.all(gx.float()[mask.expand_as(gx)] == 0)
        torch.testing.assert_close(y.float().sum(-1), torch.ones(b, np_, sq), **TOLS[dtype])


def test_fused_path_declines_where_the_kernel_does_not_apply(monkeypatch):
    calls = []
    for fn in ("ScaledMaskedSoftmax", "ScaledUpperTriangMaskedSoftmax", "ScaledSoftmax"):
        real = getattr(fused_softmax, fn).apply
        monkeypatch.setattr(
            getattr(fused_softmax, fn), "apply", lambda *a, _r=real: calls.append(1) or _r(*a)
        )
    gen = torch.Generator().manual_seed(2)
    cases = [  # (input, mask, mask type, fusion flag)
        (torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=gen), None, "causal", True),
        (torch.randn(2, 8, 8, generator=gen), None, "causal", True),  # not 4-D
        (torch.randn(1, 2, 4, 8, generator=gen), None, "causal", True),  # causal needs sq == sk
        (torch.randn(1, 1, 2, fused_softmax.MAX_KEYS + 1, generator=gen), None, "padding", True),
        (torch.randn(2, 2, 8, 8, generator=gen), torch.rand(2, 2, 8, 8) < 0.5, "padding", True),
        (torch.randn(2, 2, 8, 8, generator=gen), None, "causal", False),  # fusion disabled
    ]
    for x, mask, mask_type, fusion in cases:
        module = FusedScaleMaskSoftmax(mask_type, fusion=fusion, scale=0.5)
        assert not module.is_kernel_available(x, mask), (x.shape, x.dtype, mask_type, fusion)
        xi = x.clone().requires_grad_()
        y = module(xi, mask)
        y.sum().backward()
        want = torch_softmax(x, mask, 0.5, causal=mask_type == "causal")
        torch.testing.assert_close(y, want)
    assert calls == []
    x = torch.randn(2, 2, 8, 8, generator=gen)
    FusedScaleMaskSoftmax("causal", fusion=True, scale=0.5)(x, None)
    assert calls == [1]  # and it does take the kernel where it applies


def test_without_the_extension_the_torch_path_runs(monkeypatch):
    monkeypatch.setattr(fused_softmax, "_kernels", lambda: None)
    x = torch.randn(2, 2, 8, 8)
    module = FusedScaleMaskSoftmax("causal", fusion=True, scale=0.5)
    assert not module.is_kernel_available(x, None)
    torch.testing.assert_close(module(x, None), torch_softmax(x, None, 0.5, causal=True))
