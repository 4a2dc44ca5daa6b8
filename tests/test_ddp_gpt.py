"""The real GPT under our DDP and optimizer: tp x dp and tp x pp x dp give the parameters of one
process training on the whole global batch (fp32), step after step.

The parallel runs go through the pipeline schedules (which enter `no_sync()` for all but each chunk's
last backward), `finalize_model_grads` and `build_optimizer`; the reference is the unsplit model with
torch.optim.AdamW and torch.nn.utils.clip_grad_norm_. Zero-bubble exercises the deferred weight
gradients reaching DDP through the post-accumulate-grad hooks.
"""

from __future__ import annotations

import pytest
import torch
from factory import NO_DROPOUT, tiny_config

from megatron_lite.config import Config
from megatron_lite.distributed import finalize_model_grads, wrap_model_chunks, zero_grad_buffers
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.model import build_model_chunks
from megatron_lite.optim import build_optimizer
from megatron_lite.parallel_state import ParallelState
from megatron_lite.pipeline import get_forward_backward_func
from megatron_lite.tensor_parallel.utils import shard_of
from megatron_lite.training import optimizer_step

VOCAB, SEQ, MBS, MICRO, STEPS = 100, 8, 1, 4, 3
PADDED = 128  # 100 padded to a multiple of 64 x tp, for tp = 1 and 2 alike
EMBED, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


def make_cfg(tp=1, pp=1, **par) -> Config:
    return tiny_config(
        num_layers=4, hidden_size=16, num_attention_heads=2, seq_length=SEQ, **NO_DROPOUT,
        make_vocab_size_divisible_by=64, tp=tp, pp=pp, **par,
        lr=5e-3, weight_decay=0.1, clip_grad=0.5, seed=7, micro_batch_size=MBS,
    )  # fmt: skip


def global_batch(step: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(500 + step)
    tokens = torch.randint(0, VOCAB, (n, MBS, SEQ + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def forward_step(data_iterator, model):
    tokens, labels = next(data_iterator)
    per_token = model(tokens, None, None, labels)
    return per_token, lambda out: (out.mean(), {"lm loss": out.mean().detach()})


def reference(global_micro: int):
    model = build_model_chunks(make_cfg(), ParallelState.single(), PADDED)[0]
    named = dict(model.named_parameters())
    no_wd = {n for n, p in named.items() if p.dim() < 2 or n.endswith(".bias")}
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named.items() if n not in no_wd], "weight_decay": 0.1},
            {"params": [p for n, p in named.items() if n in no_wd], "weight_decay": 0.0},
        ],
        lr=5e-3,
    )
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        for tokens, labels in global_batch(step, global_micro):
            (model(tokens, None, None, labels).mean() / global_micro).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        opt.step()
    return {n: p.detach().clone() for n, p in named.items()}, norms


def _gpt_checks(tp: int, pp: int, variants: list[dict]):
    ps = ParallelState.build(tp, pp)
    ref, ref_norms = reference(ps.dp_size * MICRO)
    for par in variants:
        cfg = make_cfg(tp, pp, **par)
        cfg.finalize(ps.world_size)
        model = wrap_model_chunks(cfg, build_model_chunks(cfg, ps, PADDED), ps)
        opt = build_optimizer(cfg, model, ps)
        fb = get_forward_backward_func(cfg, ps)
        norms = []
        for step in range(STEPS):
            mine = global_batch(step, ps.dp_size * MICRO)[ps.dp_rank * MICRO :][:MICRO]
            zero_grad_buffers(model)
            fb(forward_step, iter(mine), model, MICRO, SEQ, MBS, grad_scale_func=opt.scale_loss)
            if par.get("overlap_grad_reduce") and step > 0:  # step 1 learns, then buckets start
                started = [b.launched for c in model for buf in c.buffers for b in buf.buckets]
                assert any(started), (par, step)  # during backward, before finalize
            finalize_model_grads(model, ps)
            ok, norm = optimizer_step(model, opt)
            assert ok
            norms.append(norm)
        assert norms == pytest.approx(ref_norms, rel=1e-4), par
        for name, p in model[0].module.named_parameters():
            full = ref[EMBED if name == OUTPUT and OUTPUT not in ref else name]
            if getattr(p, "tensor_model_parallel", False):
                full = shard_of(full, p.partition_dim, p.partition_stride, ps.tp_rank, tp)
            torch.testing.assert_close(
                p.detach(), full, rtol=1e-4, atol=1e-5, msg=lambda m, n=name, v=par: f"{v} {n}: {m}"
            )
    return len(variants)


def test_gpt_tp2_dp2_with_sequence_parallel_and_zero1_matches_one_process():
    variants = [
        {},
        {"sequence_parallel": True, "use_distributed_optimizer": True, "overlap_grad_reduce": True},
    ]
    assert run_distributed(_gpt_checks, 4, 2, 1, variants, timeout=300) == [2] * 4


def test_gpt_tp2_pp2_dp2_1f1b_and_zero_bubble_match_one_process():
    variants = [
        {"use_distributed_optimizer": True, "overlap_grad_reduce": True, "ddp_bucket_size": 2000},
        {
            "pipeline_schedule": "zero-bubble",
            "sequence_parallel": True,
            "overlap_grad_reduce": True,
            "ddp_bucket_size": 2000,
        },
    ]
    assert run_distributed(_gpt_checks, 8, 2, 2, variants, timeout=300) == [2] * 8
