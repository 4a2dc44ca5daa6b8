"""Mixture of experts: every expert-parallel layout reproduces one process, step by step.

A 4-layer MoE GPT (4 experts, top-2, aux loss and z-loss on, default flags otherwise) trains 3
steps with the library's `train_step` in each layout; lm loss, every layer's load-balancing and
z-loss, and the grad norm must equal the single process's to 1e-5. With a capacity factor the
routing slots dropped per step are counted on every rank and must add up to the single process's
(drops are per microbatch: see model/moe/router.py). A checkpoint saved at ep2 loads at ep1 and at
ep2 x tp2 and the next step's losses are the uninterrupted run's.

Two process groups: 2 ranks (ep2) then 4 (ep2 x tp2, ep2 x pp2, ep2 x dp2); the single-process
reference runs in the test process.
"""

import pytest
import torch
import torch.distributed as dist
from moe_util import build_run, load, make_cfg, save, train

from megatron_lite.config import ConfigError, MoEConfig, moe_layer_pattern
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.parallel_state import ParallelState, group_ranks

STEPS = range(3)
CAPACITY = {"moe_expert_capacity_factor": 1.0}
ALLTOALL = {"moe_token_dispatcher_type": "alltoall"}


def _layout(tp=1, pp=1, ep=2, dist_opt=False, sp=False, steps=STEPS, **moe):
    cfg = make_cfg(dist.get_world_size(), tp, pp, ep, dist_opt, sp, **moe)
    run = build_run(cfg, ParallelState.build(tp, pp, ep=ep))
    return run, train(run, steps)


def _total_dropped(results: list[dict], ps: ParallelState) -> list[int]:
    """Slots dropped per step over the whole layout (tp ranks route the same tokens: count once)."""
    counts = torch.tensor([r["dropped"] if ps.tp_rank == 0 else 0 for r in results])
    dist.all_reduce(counts)
    return counts.tolist()


def _summary(results: list[dict], ps: ParallelState) -> dict:
    keep = ("loss", "moe_losses", "grad_norm")
    return {
        "steps": [{k: r[k] for k in keep} for r in results],
        "dropped": _total_dropped(results, ps),
    }


def _two_ranks(ckpt: str) -> dict:
    out = {}
    for name, moe in (("ep2", {}), ("ep2 alltoall", ALLTOALL), ("ep2 capacity", CAPACITY)):
        run, results = _layout(**moe)
        out[name] = _summary(results, run.ps)
    run, first = _layout(steps=range(2))  # save after 2 steps, then go on
    save(run, ckpt)
    out["ep2 resumed"] = _summary(first + train(run, range(2, 3)), run.ps)
    return out


def _four_ranks(ckpt: str) -> dict:
    out = {}
    layouts = {
        "ep2 x tp2": dict(tp=2),
        "ep2 x tp2 sequence parallel": dict(tp=2, sp=True, **ALLTOALL),
        "ep2 x pp2": dict(pp=2),
        "ep2 x dp2 distributed optimizer": dict(dist_opt=True),
        "ep2 x dp2 alltoall": dict(dist_opt=True, **ALLTOALL),
        "ep2 x tp2 sp capacity alltoall": dict(tp=2, sp=True, **CAPACITY, **ALLTOALL),
        "ep2 x dp2 capacity position": dict(**CAPACITY, moe_token_drop_policy="position"),
    }
    for name, kw in layouts.items():
        run, results = _layout(**kw)
        out[name] = _summary(results, run.ps)
    cfg = make_cfg(4, tp=2, ep=2)
    run = build_run(cfg, ParallelState.build(2, 1, ep=2))
    load(run, ckpt)
    assert run.iteration == 2
    out["ep2 -> ep2 x tp2"] = _summary(train(run, range(2, 3)), run.ps)
    return out


def _reference(steps=STEPS, **moe) -> dict:
    run = build_run(make_cfg(1, **moe), ParallelState.single())
    results = train(run, steps)
    return {"steps": results, "dropped": [r["dropped"] for r in results]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("moe_ckpt"))
    got = run_distributed(_two_ranks, 2, ckpt, timeout=240)[0]
    got.update(run_distributed(_four_ranks, 4, ckpt, timeout=240)[0])
    ref = {
        "default": _reference(),
        "capacity": _reference(**CAPACITY),
        "position": _reference(**CAPACITY, moe_token_drop_policy="position"),
    }
    single = build_run(make_cfg(1), ParallelState.single())  # ep2's checkpoint at ep1
    load(single, ckpt)
    got["ep2 -> ep1"] = {"steps": train(single, range(2, 3)), "dropped": [0]}
    return got, ref


def _assert_steps_match(got: dict, want: dict, what: str, first: int = 0) -> None:
    want_steps = want["steps"][first:]
    assert len(got["steps"]) == len(want_steps), what
    for i, (g, w) in enumerate(zip(got["steps"], want_steps)):
        at = f"{what}, step {first + i}"
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), at
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-5), at
        assert g["moe_losses"].keys() == {"load_balancing_loss", "z_loss"}, at
        for name, per_layer in w["moe_losses"].items():
            assert sorted(per_layer) == [0, 1, 2, 3], at  # every layer is MoE (freq 1)
            got_layers = g["moe_losses"][name]
            assert got_layers == pytest.approx(per_layer, rel=1e-5), (at, name)


LAYOUTS = [
    ("ep2", "default"),
    ("ep2 alltoall", "default"),
    ("ep2 x tp2", "default"),
    ("ep2 x tp2 sequence parallel", "default"),
    ("ep2 x pp2", "default"),
    ("ep2 x dp2 distributed optimizer", "default"),
    ("ep2 x dp2 alltoall", "default"),
]


@pytest.mark.parametrize("layout,reference", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_layout_matches_single_process_losses_and_aux_losses(runs, layout, reference):
    got, ref = runs
    _assert_steps_match(got[layout], ref[reference], layout)


CAPACITY_LAYOUTS = [
    ("ep2 capacity", "capacity"),
    ("ep2 x tp2 sp capacity alltoall", "capacity"),
    ("ep2 x dp2 capacity position", "position"),
]


@pytest.mark.parametrize("layout,reference", CAPACITY_LAYOUTS, ids=[n for n, _ in CAPACITY_LAYOUTS])
def test_capacity_drops_the_same_tokens_in_every_layout(runs, layout, reference):
    got, ref = runs
    dropped = ref[reference]["dropped"]
    assert all(n > 0 for n in dropped), dropped  # a factor of 1.0 really drops here
    assert got[layout]["dropped"] == dropped
    _assert_steps_match(got[layout], ref[reference], layout)
    # and dropping changes the model's losses (the dropped slots really are left out)
    assert ref[reference]["steps"][0]["loss"] != ref["default"]["steps"][0]["loss"]


def test_checkpoint_moves_between_ep_layouts_and_resumes_exactly(runs):
    got, ref = runs
    _assert_steps_match(got["ep2 resumed"], ref["default"], "ep2 save + go on")
    for layout in ("ep2 -> ep1", "ep2 -> ep2 x tp2"):
        _assert_steps_match(got[layout], ref["default"], layout, first=2)


def test_expert_groups_follow_megatrons_placement():
    g = group_ranks(8, tp=2, pp=2, ep=2)
    assert g["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]  # inside dp, one per tp rank
    assert g["etp"] == g["tp"] and all(len(r) == 1 for r in g["edp"])
    g = group_ranks(8, tp=1, pp=1, ep=2)
    assert g["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["edp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_moe_flags_parse_and_bad_values_name_the_flag():
    assert MoEConfig(num_experts=4, moe_layer_freq="([1]*1+[0])*2").moe_layer_freq == [1, 0, 1, 0]
    assert moe_layer_pattern(2, 4) == [True, False, True, False]
    for kwargs, words in (
        (dict(num_experts=6, expert_model_parallel_size=4), "--expert-model-parallel-size (4)"),
        (dict(num_experts=2, moe_router_topk=3), "--moe-router-topk (3)"),
        (dict(moe_layer_freq="[1, 0] + os"), "--moe-layer-freq"),
        (dict(num_experts=4, moe_pad_expert_input_to_capacity=True), "--moe-expert-capacity"),
    ):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            MoEConfig(**kwargs)
    with pytest.raises(ConfigError, match="--moe-layer-freq as a list needs 4 entries"):
        moe_layer_pattern([1, 0], 4)
    with pytest.raises(ConfigError, match="divisible by --expert-model-parallel-size"):
        make_cfg(2, ep=4)


def test_estimator_counts_experts_active_flops_and_dispatch_traffic():
    from megatron_lite.estimate.memory import static_memory
    from megatron_lite.estimate.moe import dispatch_bytes, parameter_counts
    from megatron_lite.model import build_model_chunks
    from megatron_lite.model.flops import model_flops_per_token

    cfg = make_cfg(4, ep=2, moe_token_dispatcher_type="alltoall")
    padded = cfg.padded_vocab_size(100)
    model = build_model_chunks(cfg, ParallelState.single(), padded)[0]
    names = dict(model.named_parameters())
    experts = sum(p.numel() for n, p in names.items() if ".experts." in n)
    counts = parameter_counts(cfg, padded)
    assert counts.total == sum(p.numel() for p in names.values())
    assert counts.experts == experts
    assert counts.active == counts.total - experts // 2  # top-2 of 4 experts
    # each rank holds the dense part and half the experts (ep2)
    assert static_memory(cfg, padded, 0).num_params == counts.total - experts // 2
    # FLOPs of the active parameters: a dense model twice as wide, plus the router
    dense = make_cfg(4)
    dense.moe.num_experts = None
    dense.model.ffn_hidden_size *= 2
    h, layers = cfg.model.hidden_size, cfg.model.num_layers
    want = model_flops_per_token(dense, padded) + 3 * layers * 2 * h * 4
    assert model_flops_per_token(cfg, padded) == pytest.approx(want)
    # alltoall: k copies of the microbatch's tokens, half of them to the other rank, there and
    # back, forward and backward (fp32)
    tokens = cfg.model.seq_length * cfg.train.micro_batch_size * h * 4
    assert dispatch_bytes(cfg) == 4 * 2 * tokens / 2
