"""--ckpt-format torch_dist (torch.distributed.checkpoint): any layout into any other, async save,
safe metadata, and megatron-core's own dist_checkpointing files.

The state round-trips reuse test_checkpointing_gpt's setup: one layout takes two optimizer steps on
name-derived gradients and saves; another loads; the full parameters and optimizer states assembled
from the live ranks must be identical.
"""

import os

import torch
from test_checkpointing_gpt import _assert_same_model_and_optimizer, _setup, _snapshot

from megatron_lite import checkpointing as ckpt
from megatron_lite.checkpointing import dist as ckdist
from megatron_lite.distributed import zero_grad_buffers
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.tensor_parallel.utils import full_shape, name_seed, shard_of
from megatron_lite.training import optimizer_step


def _dist_setup(tp, pp, dp_opt=False, seed=1234):
    cfg, ps, chunks, opt, sched = _setup(tp, pp, dp_opt, seed=seed)
    cfg.checkpoint.ckpt_format = "torch_dist"
    return cfg, ps, chunks, opt, sched


def _train_and_save(root, tp, pp, dp_opt=False):
    cfg, ps, chunks, opt, sched = _dist_setup(tp, pp, dp_opt)
    for step in range(2):
        zero_grad_buffers(chunks)
        for c in chunks:
            for name, p in c.module.named_parameters():
                gen = torch.Generator().manual_seed(name_seed(step, getattr(p, "init_name", name)))
                full = torch.randn(full_shape(p, ps.tp_size), generator=gen)
                p.main_grad.copy_(
                    shard_of(full, p.partition_dim, p.partition_stride, ps.tp_rank, ps.tp_size)
                )
        assert optimizer_step(chunks, opt)[0]
        sched.step(cfg.train.global_batch_size)
    ckpt.save_checkpoint(root, 2, chunks, opt, sched, cfg, ps, 16)
    files = sorted(os.listdir(ckpt.iteration_dir(root, 2)))
    return _snapshot(ps, chunks, opt, sched), files


def _load(root, tp, pp, dp_opt=False):
    cfg, ps, chunks, opt, sched = _dist_setup(tp, pp, dp_opt, seed=99)
    out = ckpt.load_checkpoint(root, chunks, opt, sched, cfg, ps)
    assert (out["iteration"], out["consumed_samples"], out["optimizer_loaded"]) == (2, 16, True)
    return _snapshot(ps, chunks, opt, sched)


def test_flat_ranges_become_boxes_that_tile_the_range():
    shape = [5, 3, 4]
    for start, end in [(0, 60), (7, 8), (5, 47), (12, 36), (13, 59)]:
        mark = torch.zeros(shape, dtype=torch.int64)
        for o, s in ckdist.flat_boxes(shape, start, end):
            ckdist._cut(mark, (o, s)).add_(1)
        want = torch.zeros(60, dtype=torch.int64)
        want[start:end] = 1
        assert torch.equal(mark.view(-1), want), (start, end)


def test_tp2_pp2_dp2_zero1_loads_into_tp1_and_tp4_pp1(tmp_path):
    out = run_distributed(_train_and_save, 8, str(tmp_path), 2, 2, True, timeout=150)
    src = [s for s, _ in out]
    files = out[0][1]
    assert ".metadata" in files and "common.pt" in files
    assert sum(f.endswith(".distcp") for f in files) == 8  # every rank wrote its own shards
    assert sum(f.startswith("rng_") for f in files) == 8
    dst = run_distributed(_load, 1, str(tmp_path), 1, 1, False, timeout=90)
    _assert_same_model_and_optimizer(src, dst)
    dst = run_distributed(_load, 4, str(tmp_path), 4, 1, False, timeout=90)
    _assert_same_model_and_optimizer(src, dst)
