"""Scale, mask and softmax attention scores in one fused kernel, or in plain torch ops.

`FusedScaleMaskSoftmax` takes scores [b, np, sq, sk] and either no mask (causal type: the upper
triangle is masked; padding type: nothing is) or a bool mask [b or 1, 1, sq, sk] with True = masked.
The fused kernels (csrc/fused_kernels.cpp for CPU, csrc/fused_softmax_cuda.cu for CUDA) run when the
extension is built and the shapes fit (`is_kernel_available`); everything else takes the torch path,
which is the reference the kernels are tested against. Masked scores become -10000 (Megatron's
convention: a fully masked row gives a uniform distribution) and get a zero gradient; the math runs in
fp32 for bf16/fp16 inputs on both paths.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite import _extensions

MASK_VALUE = -10000.0
MAX_KEYS = 16384  # longest row the kernels take (the CUDA kernel keeps a row in registers)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernels():
    return _extensions.load("_fused_kernels")


class ScaledUpperTriangMaskedSoftmax(torch.autograd.Function):
    """softmax(scale * x) with keys after the query masked (causal); x [..., s, s]."""

    @staticmethod
    def forward(ctx, x, scale):
        out = _kernels().scaled_upper_triang_masked_softmax_forward(x.contiguous(), scale)
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        k = _kernels()
        return k.scaled_upper_triang_masked_softmax_backward(
            grad.contiguous(), out, ctx.scale
        ), None


class ScaledMaskedSoftmax(torch.autograd.Function):
    """softmax(scale * x masked_fill(mask, -10000)); x [b, np, sq, sk], mask [b or 1, 1, sq, sk]."""

    @staticmethod
    def forward(ctx, x, mask, scale):
        mask = mask.contiguous()
        out = _kernels().scaled_masked_softmax_forward(x.contiguous(), mask, scale)
        ctx.save_for_backward(out, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        out, mask = ctx.saved_tensors
        k = _kernels()
        return k.scaled_masked_softmax_backward(grad.contiguous(), out, mask, ctx.scale), None, None


class ScaledSoftmax(torch.autograd.Function):
    """softmax(scale * x), no mask."""

    @staticmethod
    def forward(ctx, x, scale):
        out = _kernels().scaled_softmax_forward(x.contiguous(), scale)
        ctx.save_for_backward(out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return _kernels().scaled_softmax_backward(grad.contiguous(), out, ctx.scale), None


_causal_masks: dict[tuple, torch.Tensor] = {}


def causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """[sq, sk] bool, True above the diagonal (cached)."""
    key = (sq, sk, str(device))
    if key not in _causal_masks:
        _causal_masks[key] = torch.ones(sq, sk, dtype=torch.bool, device=device).triu_(1)
    return _causal_masks[key]


_window_masks: dict[tuple, torch.Tensor] = {}


def window_mask(sq: int, sk: int, left: int, device: torch.device) -> torch.Tensor:
    """[sq, sk] bool, True = masked, for queries at the last sq of sk positions: query i (at
    position sk - sq + i) sees itself and the `left` keys before it, nothing after. Cached for
    training's square masks (decoding steps each have another sk: not worth keeping)."""
    key = (sq, sk, left, str(device))
    if key in _window_masks:
        return _window_masks[key]
    q = torch.arange(sk - sq, sk, device=device)[:, None]
    k = torch.arange(sk, device=device)[None]
    mask = (k > q) | (k < q - left)
    if sq == sk:
        _window_masks[key] = mask
    return mask


def with_window(
    mask: torch.Tensor | None, sq: int, sk: int, left: int, device: torch.device
) -> torch.Tensor:
    """`mask` (None: causal; or bool [b or 1, 1, sq, sk], True = masked) with the sliding window
    added: Megatron's --window-size left,0 (flash-attention's window semantics)."""
    window = window_mask(sq, sk, left, device)[None, None]
    return window if mask is None else mask | window


def torch_softmax(
    x: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool
) -> torch.Tensor:
    """The reference path: scale, mask fill and softmax as separate autograd ops (fp32 math)."""
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if scale != 1.0:
        x = x * scale
    if causal and mask is None:
        mask = causal_mask(x.shape[-2], x.shape[-1], x.device)
    if mask is not None:
        x = x.masked_fill(mask, MASK_VALUE)
    return torch.softmax(x, dim=-1).to(dtype)


class FusedScaleMaskSoftmax(nn.Module):
    """Fused scale + mask + softmax where the kernel applies, the torch path elsewhere.

    attn_mask_type: "causal" (no mask tensor needed) or "padding". An explicit mask always wins.
    `fusion=False` (--no-masked-softmax-fusion) forces the torch path.
    """

    def __init__(self, attn_mask_type: str = "causal", fusion: bool = True, scale: float = 1.0):
        super().__init__()
        if attn_mask_type not in ("causal", "padding"):
            raise ValueError(
                f"attn_mask_type must be 'causal' or 'padding', got {attn_mask_type!r}"
            )
        self.attn_mask_type, self.fusion, self.scale = attn_mask_type, fusion, float(scale)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, fusion: bool | None = None
    ) -> torch.Tensor:
        """`fusion` overrides the module's setting for this call (the attention backend's choice)."""
        if self.is_kernel_available(x, mask, fusion):
            return self.forward_fused_softmax(x, mask)
        return torch_softmax(x, mask, self.scale, self.attn_mask_type == "causal")

    def is_kernel_available(
        self, x: torch.Tensor, mask: torch.Tensor | None, fusion: bool | None = None
    ) -> bool:
        if (
            not (self.fusion if fusion is None else fusion)
            or x.dim() != 4
            or x.dtype not in _KERNEL_DTYPES
        ):
            return False
        b, np_, sq, sk = x.shape
        if not (0 < sk <= MAX_KEYS and sq > 0 and b * np_ > 0):
            return False
        kernels = _kernels()
        if kernels is None or not hasattr(kernels, "scaled_masked_softmax_forward"):
            return False  # not built, or built from an older csrc
        if x.device.type == "cuda":
            if not getattr(kernels, "has_cuda", False):
                return False
        elif x.device.type != "cpu":
            return False
        if mask is not None:
            return (
                mask.dtype == torch.bool
                and mask.dim() == 4
                and mask.shape[0] in (1, b)
                and mask.shape[1] == 1
                and tuple(mask.shape[2:]) == (sq, sk)
                and mask.device == x.device
            )
        if self.attn_mask_type == "causal":
            return sq == sk  # the kernel's triangle starts at the first key
        return True

    def forward_fused_softmax(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            return ScaledMaskedSoftmax.apply(x, mask, self.scale)
        if self.attn_mask_type == "causal":
            return ScaledUpperTriangMaskedSoftmax.apply(x, self.scale)
        return ScaledSoftmax.apply(x, self.scale)
