"""DDP, distributed optimizer, mixed precision and clipping on gloo, against one process on the full batch.

The reference is independent of megatron_lite's optimizer: the unsplit toy model (tests/ddp_util.py) on
the whole global batch with torch.optim.AdamW (no decay on 1-D parameters) and
torch.nn.utils.clip_grad_norm_.
"""

from __future__ import annotations

import contextlib
import pickle

import pytest
import torch
import torch.distributed as dist
from factory import make_config

from megatron_lite import comm
from megatron_lite.config import Config
from megatron_lite.distributed import (
    DistributedDataParallel,
    finalize_model_grads,
    zero_grad_buffers,
)
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.optim import build_optimizer
from megatron_lite.parallel_state import ParallelState
from megatron_lite.training import optimizer_step
from tests import ddp_util as toys

LR, WD, CLIP = 1e-2, 0.1, 0.5


def make_cfg(tp=1, pp=1, **kw) -> Config:
    return make_config(tp=tp, pp=pp, **{"lr": LR, "weight_decay": WD, "clip_grad": CLIP, **kw})


def reference(steps: int, global_batch: int, clip: float = CLIP, dtype=torch.float32):
    """Unsplit model, full batch, torch's AdamW: (full tensors by name, grad norms, losses)."""
    model = toys.ToyNet(ParallelState.single(), dtype=dtype)
    params = dict(model.named_parameters())
    groups = [
        {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": WD},
        {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR)
    norms, losses = [], []
    for step in range(steps):
        tokens, labels = toys.batch(step, global_batch)
        opt.zero_grad()
        loss = toys.loss_fn(model(tokens), labels)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        losses.append(loss.item())
        opt.step()
    return {n: p.detach().clone() for n, p in params.items()}, norms, losses


def build(cfg: Config, ps: ParallelState, dtype=torch.float32):
    stage = "all" if ps.pp_size == 1 else "first" if ps.is_first_stage else "last"
    model = DistributedDataParallel(toys.ToyNet(ps, stage, dtype=dtype), cfg, ps)
    return model, build_optimizer(cfg, [model], ps)


def train_step(model, opt, ps, step: int, micro: int, mb: int = 1, inject_inf: bool = False):
    """One step on this dp rank's share of the global batch; -> (success, norm, loss, collectives)."""
    tokens, labels = toys.batch(step, ps.dp_size * micro * mb)
    mine = slice(ps.dp_rank * micro * mb, (ps.dp_rank + 1) * micro * mb)
    tokens, labels = tokens[:, mine], labels[:, mine]
    zero_grad_buffers([model])
    comm.stats.reset()
    loss_sum = 0.0
    for i in range(micro):
        cols = slice(i * mb, (i + 1) * mb)
        sync = contextlib.nullcontext() if i == micro - 1 else model.no_sync()
        with sync:
            loss = _forward_backward(model, opt, ps, tokens[:, cols], labels[:, cols], micro)
        loss_sum += loss
    if model.overlap_grad_reduce and step > 0:  # buckets started during backward (not step 1)
        assert all(b.launched for buf in model.buffers for b in buf.buckets)
    finalize_model_grads([model], ps)
    collectives = comm.stats.calls
    if inject_inf:
        opt.pieces[0].grad[0] = float("inf")
    success, norm = optimizer_step([model], opt)
    return success, norm, loss_sum, collectives


def _forward_backward(model, opt, ps, tokens, labels, micro: int) -> float:
    """Loss / micro backward through one or two pipeline stages (blocking p2p, one microbatch)."""
    if ps.pp_size == 1:
        loss = toys.loss_fn(model(tokens), labels) / micro
        opt.scale_loss(loss).backward()
        return loss.item()
    dtype = next(model.parameters()).dtype
    if ps.is_first_stage:
        h = model(tokens)
        dist.send(h.detach().contiguous(), ps.next_rank)
        g = torch.empty_like(h)
        dist.recv(g, ps.next_rank)
        h.backward(g)
        return 0.0
    h = torch.empty(toys.SEQ, tokens.shape[1], toys.H, dtype=dtype)
    dist.recv(h, ps.prev_rank)
    h.requires_grad_()
    loss = toys.loss_fn(model(h), labels) / micro
    opt.scale_loss(loss).backward()
    dist.send(h.grad.contiguous(), ps.prev_rank)
    return loss.item()


def assert_matches_reference(model, ps, ref: dict, atol=2e-6, rtol=1e-5, what="") -> None:
    for name, p in model.module.named_parameters():
        full = ref[toys.reference_name(name)]
        expect = toys.shard(toys.reference_name(name), full, ps.tp_rank, ps.tp_size)
        torch.testing.assert_close(
            p.detach().float(),
            expect.float(),
            atol=atol,
            rtol=rtol,
            msg=lambda m, n=name: f"{what} {n}: {m}",
        )


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.module.named_parameters()}


# --------------------------------------------------------------------------------------------------
# dp = 4: replicated and distributed optimizer, overlap on/off, several buckets, accumulation


def _dp4_checks(steps: int, micro: int):
    ps = ParallelState.build(1, 1)
    ref, ref_norms, _ = reference(steps, ps.dp_size * micro)
    runs = {}
    for dist_opt, overlap, bucket, gather in [
        (False, False, 200, False),
        (False, True, 200, False),
        (True, False, 200, False),
        (True, True, 200, False),
        (True, True, None, False),
        (True, True, 200, True),  # --overlap-param-gather
    ]:
        cfg = make_cfg(
            use_distributed_optimizer=dist_opt,
            overlap_grad_reduce=overlap,
            ddp_bucket_size=bucket,
            overlap_param_gather=gather,
        )
        model, opt = build(cfg, ps)
        n_buckets = sum(len(b.buckets) for b in model.buffers)
        norms, calls = [], []
        for step in range(steps):
            ok, norm, _, collectives = train_step(model, opt, ps, step, micro)
            assert ok
            norms.append(norm)
            calls.append(collectives)
        what = f"dist_opt={dist_opt} overlap={overlap} bucket={bucket} gather={gather}"
        if gather:  # the last step's all-gathers are still in flight, one per bucket ...
            assert model.params_in_flight() == n_buckets > 1, what
            tokens, _ = toys.batch(0, 1)
            model(tokens)  # ... and a forward lands them (its modules' pre-hooks wait)
            assert model.params_in_flight() == 0, what
        assert_matches_reference(model, ps, ref, what=what)
        assert norms == pytest.approx(ref_norms, rel=1e-5), what
        # each bucket reduced exactly once per step, whatever the number of microbatches
        assert calls == [n_buckets] * steps, (what, calls, n_buckets)
        if gather:
            runs["gather"] = (model, opt, n_buckets)
        else:
            runs[(dist_opt, overlap, bucket)] = (model, opt, n_buckets)

    # overlap changes when, not what: bit-identical parameters
    for a, b in [
        (runs[(False, False, 200)], runs[(False, True, 200)]),
        (runs[(True, False, 200)], runs[(True, True, 200)]),
        (runs[(True, True, 200)], runs["gather"]),
    ]:
        for (n, x), (_, y) in zip(params_of(a[0]).items(), params_of(b[0]).items()):
            assert torch.equal(x, y), f"overlap changed {n}"
    assert runs[(False, True, 200)][2] > 1  # the small bucket size really split the model

    # ZeRO-1: optimizer state per rank is 1/dp of the replicated optimizer's (up to padding)
    full_bytes = runs[(False, True, 200)][1].optimizer_state_bytes()
    shard_bytes = runs[(True, True, 200)][1].optimizer_state_bytes()
    assert shard_bytes <= full_bytes / ps.dp_size + 2 * 4 * 128 * runs[(True, True, 200)][2]
    total = torch.tensor([float(shard_bytes)])
    dist.all_reduce(total)
    assert total.item() == pytest.approx(full_bytes, rel=0.02)

    # the per-parameter state is the same with or without ZeRO-1
    full_state = runs[(False, True, 200)][1].per_param_state_dict()
    gathered = runs[(True, True, 200)][1].per_param_state_dict()
    assert full_state.keys() == gathered.keys()
    for name in full_state:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                gathered[name][key], full_state[name][key], rtol=1e-5, atol=1e-9
            )
    # a model smaller than dp shards: ranks 1-3 own only padding, yet step in lockstep with rank 0
    tiny = torch.nn.Linear(2, 1)
    torch.nn.init.constant_(tiny.weight, 0.5)
    model = DistributedDataParallel(tiny, make_cfg(use_distributed_optimizer=True), ps)
    opt = build_optimizer(make_cfg(use_distributed_optimizer=True), [model], ps)
    assert (len(opt.pieces) == 0) == (ps.dp_rank > 0)
    zero_grad_buffers([model])
    tiny(torch.ones(1, 2)).sum().backward()
    finalize_model_grads([model], ps)
    assert optimizer_step([model], opt) == (True, pytest.approx(3**0.5))
    # AdamW's first step: decoupled decay, then -lr (scale-free, so clipping does not show)
    assert torch.allclose(tiny.weight, torch.full((1, 2), 0.5 * (1 - LR * WD) - LR))
    # tensors cross the pipe as plain pickles (torch's shared-memory pickling needs the rank alive)
    return pickle.dumps((gathered, runs[(True, True, 200)][1].sharded_state_dict()))


def test_dp4_matches_one_process_on_the_global_batch_with_and_without_zero1():
    """dp=4, 2 microbatches each: replicated and distributed optimizer, overlap on/off, buckets."""
    results = [pickle.loads(r) for r in run_distributed(_dp4_checks, 4, 3, 2, timeout=120)]
    from megatron_lite.optim import merge_sharded_state_dicts

    merged = merge_sharded_state_dicts([r[1] for r in results])
    for name, state in results[0][0].items():
        for key, t in state.items():
            assert torch.equal(merged[name][key], t), (name, key)


# --------------------------------------------------------------------------------------------------
# dp = 2: resume from dp=4 state, bf16/fp16 against fp32, loss scaler, found-inf agreement


def _resume(ps, per_param, scalars, dist_opt, start, steps, global_batch, micro, ref_at_start):
    model, opt = build(make_cfg(use_distributed_optimizer=dist_opt), ps)
    with torch.no_grad():
        for n, p in model.module.named_parameters():
            p.copy_(ref_at_start[n])
    opt.load_state_dict(scalars)
    opt.load_per_param_state_dict(per_param)
    for step in range(start, start + steps):
        assert train_step(model, opt, ps, step, micro=global_batch // ps.dp_size)[0]
    return model, opt


def _dp2_checks(micro: int):
    ps = ParallelState.build(1, 1)
    gb = ps.dp_size * micro
    ref3, _, _ = reference(3, gb)
    ref5, _, _ = reference(5, gb)
    # ZeRO-1 at dp=2 for 3 steps, then its state resumes at dp=1 (both kinds) for 2 more ...
    model, opt = build(make_cfg(use_distributed_optimizer=True), ps)
    for step in range(3):
        train_step(model, opt, ps, step, micro)
    assert_matches_reference(model, ps, ref3, what="dp2 zero1")
    state, scalars = opt.per_param_state_dict(), opt.state_dict()
    single = ParallelState.single()
    for dist_opt in (True, False):
        m1, o1 = _resume(single, state, scalars, dist_opt, 3, 2, gb, micro, ref3)
        assert_matches_reference(m1, single, ref5, what=f"dp2 -> dp1 dist_opt={dist_opt}")
    # ... and a dp=1 state resumes at dp=2 under ZeRO-1
    m2, _ = _resume(ps, o1.per_param_state_dict(), o1.state_dict(), True, 5, 1, gb, micro, ref5)
    ref6, _, _ = reference(6, gb)
    assert_matches_reference(m2, ps, ref6, what="dp1 -> dp2 zero1")

    # mixed precision tracks fp32 (fp32 master weights; fp16 with the dynamic loss scaler)
    losses = {}
    for name, dtype, extra in [
        ("fp32", torch.float32, {}),
        ("bf16", torch.bfloat16, {"bf16": True}),
        ("fp16", torch.float16, {"fp16": True, "initial_loss_scale": 2.0**12}),
    ]:
        cfg = make_cfg(use_distributed_optimizer=True, overlap_grad_reduce=True, **extra)
        model, opt = build(cfg, ps, dtype)
        if dtype != torch.float32:
            assert all(pc.master.dtype == torch.float32 for pc in opt.pieces)
            assert all(b.grad_dtype == torch.float32 for b in model.buffers) == (
                dtype == torch.bfloat16
            )
        losses[name] = [train_step(model, opt, ps, s, micro)[2] for s in range(12)]
    fp32 = torch.tensor(losses["fp32"])
    assert fp32[-1] < fp32[0] - 0.3  # it learns
    for name, tol in (("bf16", 0.03), ("fp16", 0.01)):
        rel = ((torch.tensor(losses[name]) - fp32).abs() / fp32).max().item()
        assert rel < tol, (name, rel, losses[name], losses["fp32"])

    # dynamic loss scaler: an inf on one rank skips the step everywhere, backs off after
    # `hysteresis` overflows, grows after `loss_scale_window` clean steps
    cfg = make_cfg(
        use_distributed_optimizer=True,
        fp16=True,
        initial_loss_scale=1024.0,
        hysteresis=2,
        loss_scale_window=3,
    )
    model, opt = build(cfg, ps, torch.float16)
    scales = []
    for step, inf in enumerate([False, True, True, False, False, False, False]):
        before = params_of(model)
        ok, norm, _, _ = train_step(model, opt, ps, step, micro, inject_inf=inf and ps.dp_rank == 1)
        assert ok == (not inf) and (norm is None) == inf
        changed = any(not torch.equal(before[n], p) for n, p in params_of(model).items())
        assert changed == (not inf)
        scales.append(opt.get_loss_scale())
    assert scales == [1024, 1024, 512, 512, 512, 1024, 1024], scales
    assert opt.state_dict()["grad_scaler"]["scale"] == 1024
    assert opt.num_skipped == 2
    return scales


def test_dp2_state_moves_between_dp_layouts_mixed_precision_and_loss_scaler():
    """ZeRO-1 state resumes at another dp; bf16/fp16 track fp32; an inf on one rank skips everywhere."""
    scales = run_distributed(_dp2_checks, 2, 2, timeout=120)
    assert scales[0] == scales[1]
