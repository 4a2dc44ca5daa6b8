"""Grouped-query attention through SDPA's own kv-head sharing (`enable_gqa`) equals repeating K/V."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from factory import tiny_config

from megatron_lite.config import Config
from megatron_lite.model import transformer


def _cfg(backend: str) -> Config:
    return tiny_config(
        1,
        num_layers=1,
        hidden_size=64,
        num_attention_heads=8,
        num_query_groups=2,
        group_query_attention=True,
        max_position_embeddings=16,
        attention_dropout=0.0,
        attention_backend=backend,
        vocab_size=64,
        micro_batch_size=2,
    )


@pytest.mark.skipif(not transformer.SDPA_HAS_GQA, reason="this torch's SDPA has no enable_gqa")
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_gqa_matches_repeated_kv(padded):
    attn = transformer.CoreAttention(_cfg("sdpa"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 16, 8, generator=g)
    kv = [torch.randn(2, 2, 16, 8, generator=g) for _ in range(2)]
    mask = torch.ones(16, 16, dtype=torch.bool).triu_(1)[None, None].expand(2, 1, 16, 16)
    mask = mask.clone() if padded else None
    if padded:
        mask[0, :, :, 12:] = True
    outs = []
    for shared in (True, False):
        ins = [t.clone().requires_grad_() for t in (q, *kv)]
        with mock.patch.object(transformer, "SDPA_HAS_GQA", shared):
            out = attn(*ins, mask)
        out.pow(2).sum().backward()
        outs.append((out.detach(), [t.grad for t in ins]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
