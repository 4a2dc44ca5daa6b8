"""Checkpoints of the real GPT, DDP and optimizer (plain and distributed) reshard between layouts.

Each layout takes one optimizer step on gradients that are a function of the parameter name only,
saves, and another layout loads: the full parameters and the full optimizer states (assembled from the
live ranks of each run, not from the files) must be identical.
"""

import pytest
import torch
import torch.distributed as dist
from factory import make_config

from megatron_lite import checkpointing as ckpt
from megatron_lite.distributed import wrap_model_chunks, zero_grad_buffers
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.model.gpt import build_model_chunks
from megatron_lite.optim import build_lr_scheduler, build_optimizer
from megatron_lite.parallel_state import ParallelState
from megatron_lite.tensor_parallel.random import get_rng_tracker, set_random_seed
from megatron_lite.tensor_parallel.utils import full_from_shards, full_shape, name_seed, shard_of
from megatron_lite.training import optimizer_step

VOCAB = 100  # padded to 104 (tp1), 112 (tp2), 128 (tp4)


def _setup(tp, pp, dp_opt=False, bf16=False, seed=1234):
    cfg = make_config(
        dist.get_world_size(), num_layers=4, hidden_size=16, num_attention_heads=4,
        swiglu=True,  # fc1 is sharded with partition_stride 2
        make_vocab_size_divisible_by=8, tp=tp, pp=pp, use_distributed_optimizer=dp_opt,
        vocab_size=VOCAB, lr=1e-2, bf16=bf16, lr_warmup_iters=2,
        global_batch_size=8, train_iters=10, seed=seed,
    )  # fmt: skip
    ps = ParallelState.build(tp, pp)
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(VOCAB))
    if bf16:
        chunks = [c.to(torch.bfloat16) for c in chunks]
    chunks = wrap_model_chunks(cfg, chunks, ps)
    opt = build_optimizer(cfg, chunks, ps)
    return cfg, ps, chunks, opt, build_lr_scheduler(cfg, opt)


def _snapshot(ps, chunks, opt, sched):
    """This rank's parameters and optimizer state with their tags (collective for ZeRO-1)."""
    per_param = opt.per_param_state_dict()
    if ps.dp_rank != 0:
        return None
    params = {}
    for c in chunks:
        for name, p in c.module.named_parameters():
            params[name] = (p.detach().float().clone(), p.partition_dim, p.partition_stride)
    # numpy, not tensors: tensors would travel back through shared memory of an exited process
    return {
        "tp_rank": ps.tp_rank,
        "params": {n: (t.numpy(), d, s) for n, (t, d, s) in params.items()},
        "optim": {n: {k: t.float().numpy() for k, t in st.items()} for n, st in per_param.items()},
        "scalars": opt.state_dict(),
        "sched": sched.state_dict(),
    }


def _train_and_save(root, tp, pp, dp_opt=False, bf16=False):
    cfg, ps, chunks, opt, sched = _setup(tp, pp, dp_opt, bf16)
    for step in range(2):
        zero_grad_buffers(chunks)
        for c in chunks:
            for name, p in c.module.named_parameters():
                # a gradient that depends only on the (tied-)name: every layout sees the same model
                gen = torch.Generator().manual_seed(name_seed(step, getattr(p, "init_name", name)))
                full = torch.randn(full_shape(p, ps.tp_size), generator=gen)
                dim = p.partition_dim
                p.main_grad.copy_(shard_of(full, dim, p.partition_stride, ps.tp_rank, ps.tp_size))
        assert optimizer_step(chunks, opt)[0]
        sched.step(cfg.train.global_batch_size)
    ckpt.save_checkpoint(root, 2, chunks, opt, sched, cfg, ps, 16)
    return _snapshot(ps, chunks, opt, sched)


def _load(root, tp, pp, dp_opt=False, bf16=False):
    cfg, ps, chunks, opt, sched = _setup(tp, pp, dp_opt, bf16, seed=99)  # other values until loaded
    out = ckpt.load_checkpoint(root, chunks, opt, sched, cfg, ps)
    assert (out["iteration"], out["consumed_samples"], out["optimizer_loaded"]) == (2, 16, True)
    return _snapshot(ps, chunks, opt, sched)


def _full(snaps, part, key=None):
    """{name: full tensor} assembled from the dp-rank-0 snapshots of every (tp, pp) rank."""
    snaps = sorted((s for s in snaps if s is not None), key=lambda s: s["tp_rank"])
    shards, tags = {}, {}
    for s in snaps:
        for name, (_, dim, stride) in s["params"].items():
            t = s["params"][name][0] if part == "params" else s["optim"][name][key]
            shards.setdefault(name, []).append(torch.from_numpy(t))
            tags[name] = (dim, stride)
    out = {n: full_from_shards(sh, *tags[n]) for n, sh in shards.items()}
    return {
        n: t[:VOCAB] if "word_embeddings" in n or "output_layer" in n else t for n, t in out.items()
    }


def _assert_same_model_and_optimizer(src, dst, master=False):
    keys = ["params", ("optim", "exp_avg"), ("optim", "exp_avg_sq")] + (
        [("optim", "master")] if master else []
    )
    for k in keys:
        a = _full(src, *([k] if isinstance(k, str) else k))
        b = _full(dst, *([k] if isinstance(k, str) else k))
        if "output_layer.weight" in b and "output_layer.weight" not in a:  # tied, saved at pp 1
            a["output_layer.weight"] = a["embedding.word_embeddings.weight"]
        a = {n: t for n, t in a.items() if n in b}
        assert sorted(a) == sorted(b), k
        for name in a:
            assert torch.equal(a[name], b[name]), (k, name)
    assert {s["scalars"]["num_steps"] for s in dst if s} == {2}
    assert {s["sched"]["num_steps"] for s in dst if s} == {
        2 * 8
    }  # samples: 2 steps of global batch 8


def test_gpt_tp2_pp2_loads_into_tp1_pp1_and_tp4(tmp_path):
    src = run_distributed(_train_and_save, 4, str(tmp_path), 2, 2, timeout=90)
    assert all(abs(st["exp_avg"]).sum() > 0 for s in src if s for st in s["optim"].values())
    for tp, world in ((1, 1), (4, 4)):
        dst = run_distributed(_load, world, str(tmp_path), tp, 1, timeout=90)
        _assert_same_model_and_optimizer(src, dst)


@pytest.mark.parametrize("bf16", [False, True])
def test_distributed_optimizer_tp2_dp2_loads_into_pp2_dp2_and_one_rank(tmp_path, bf16):
    src = run_distributed(_train_and_save, 4, str(tmp_path), 2, 1, True, bf16, timeout=90)
    dst = run_distributed(_load, 4, str(tmp_path), 1, 2, True, bf16, timeout=90)
    _assert_same_model_and_optimizer(src, dst, master=bf16)
    dst = run_distributed(_load, 1, str(tmp_path), 1, 1, False, bf16, timeout=90)
    _assert_same_model_and_optimizer(src, dst, master=bf16)


def test_fp32_and_bf16_checkpoints_cross_load_through_the_fp32_masters(tmp_path):
    fp32, bf16 = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    src = run_distributed(_train_and_save, 2, fp32, 2, 1, timeout=90)
    dst = run_distributed(_load, 1, fp32, 1, 1, False, True, timeout=90)  # into bf16
    for name, t in _full(src, "params").items():
        assert torch.equal(_full(dst, "optim", "master")[name], t), name
    src = run_distributed(_train_and_save, 2, bf16, 1, 1, True, True, timeout=90)
    dst = run_distributed(_load, 1, bf16, 1, 1, False, False, timeout=90)  # into fp32
    masters = _full(src, "optim", "master")
    for name, t in _full(dst, "params").items():
        assert torch.equal(masters[name], t), name


def _tracker_round_trip(root):
    cfg, ps, chunks, opt, sched = _setup(2, 1)
    set_random_seed(1234 + 10 * ps.dp_rank, ps.tp_rank, ps.pp_rank)
    ckpt.save_checkpoint(root, 1, chunks, opt, sched, cfg, ps, 0)
    with get_rng_tracker().fork():
        before = torch.rand(4)
    set_random_seed(5, 0, 0)
    assert ckpt.load_checkpoint(root, chunks, opt, sched, cfg, ps)["rng_restored"]
    with get_rng_tracker().fork():
        after = torch.rand(4)
    assert torch.equal(before, after)
    return before.tolist()


def test_tp_rng_tracker_state_of_every_rank_is_restored(tmp_path):
    draws = run_distributed(_tracker_round_trip, 4, str(tmp_path), timeout=90)
    assert len({tuple(d) for d in draws}) == 4  # tp and dp ranks each had their own stream
