"""Context parallelism (--context-parallel-size): ring attention equals full causal attention
(forward and backward); cp2, cp4, cp2 x tp2 (+SP, Llama), cp2 x pp2 (1F1B, ZB-H1, interleaved) and
cp2 x dp2 with ZeRO-1 train with the single-process losses (to 1e-5, at sequence length 128, 4x the
usual tests') and gradient norms; a cp2 checkpoint resumes exactly at cp2 and loads at cp1 with the
same next loss; and the activations one rank holds for backward fall as 1/cp, as the estimator says.

Three process groups (2, 1 and 4 ranks, module fixtures); each runs every check of its size.
"""

import re

import pytest
import torch
import torch.distributed as dist
from test_estimate import _births_mode, _storage_refs

from megatron_lite import comm, training
from megatron_lite.arguments import parse_args
from megatron_lite.config import ConfigError
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.estimate import chunk_bytes, estimate
from megatron_lite.estimate.activations import ring_bytes
from megatron_lite.model import build_model_chunks
from megatron_lite.model.context_parallel import cp_chunk_positions, ring_attention, slice_for_cp
from megatron_lite.parallel_state import ParallelState, group_ranks
from megatron_lite.tensor_parallel import set_random_seed
from megatron_lite.training.step import average_over_last_stage

ITERS, SEQ = 4, 128
TINY = (
    f"--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length {SEQ} "
    f"--max-position-embeddings {SEQ} --micro-batch-size 2 --global-batch-size 8 "
    "--lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 --clip-grad 1.0 "
    f"--train-iters {ITERS} --hidden-dropout 0 --attention-dropout 0 --seed 1234 --eval-iters 1 "
    "--eval-interval 1000 "
    "--distributed-timeout-minutes 1 --mock-data --tokenizer-type NullTokenizer --vocab-size 500"
).split()
LLAMA = (
    "--position-embedding-type rope --normalization RMSNorm --swiglu --group-query-attention "
    "--num-query-groups 2 --untie-embeddings-and-output-weights --disable-bias-linear"
).split()


FOUR_LAYERS, VIRTUAL = ["--num-layers", "4"], ["--num-layers-per-virtual-pipeline-stage", "1"]


def cp_flags(cp: int, tp: int = 1, pp: int = 1) -> list[str]:
    return [
        "--context-parallel-size",
        str(cp),
        "--tensor-model-parallel-size",
        str(tp),
        "--pipeline-model-parallel-size",
        str(pp),
    ]


# world 4: (name, flags, reference flavour); each with a different backend / option on top
LAYOUTS = [
    ("cp4", cp_flags(4), "gpt"),
    ("cp2 tp2 sp llama", [*cp_flags(2, tp=2), "--sequence-parallel", *LLAMA], "llama"),
    ("cp2 pp2 full recompute", [*cp_flags(2, pp=2), "--recompute-granularity", "full"], "gpt"),
    ("cp2 pp2 zero-bubble", [*cp_flags(2, pp=2), "--pipeline-schedule", "zero-bubble"], "gpt"),
    ("cp2 pp2 interleaved", [*cp_flags(2, pp=2), *FOUR_LAYERS, *VIRTUAL], "gpt 4 layers"),
    (
        "cp2 dp2 zero-1 overlaps unfused selective",
        [
            *cp_flags(2),
            "--use-distributed-optimizer",
            "--overlap-grad-reduce",
            "--overlap-param-gather",
            "--attention-backend",
            "unfused",
            "--recompute-granularity",
            "selective",
        ],
        "gpt",
    ),
]


def _train(flags: list[str], iters: int = ITERS, save_at: int | None = None) -> dict:
    """Train in this process group: the global lm loss and the gradient norm of each iteration
    (valid on every rank; Adam would hide a wrongly scaled gradient from the losses, not from the
    norm), the validation loss after the last, and optionally a checkpoint at iteration `save_at`."""
    run = training.setup(parse_args(TINY + flags))
    train_it, valid_it, _ = training.build_data_iterators(
        run.cfg, run.tokenizer, run.ps, run.consumed_samples, num_chunks=len(run.model)
    )
    losses, norms = {}, {}
    while run.iteration < iters:
        step = training.train_step(run, train_it)
        assert step["success"]
        run.iteration += 1
        run.consumed_samples += run.cfg.train.global_batch_size
        total = torch.tensor([step["loss"] or 0.0, 1.0], dtype=torch.float64)
        losses[run.iteration] = average_over_last_stage(run, total)
        norms[run.iteration] = step["grad_norm"]
        if run.iteration == save_at:
            training.save(run)
    valid = training.evaluate(run, valid_it, 1)
    dist.barrier()
    return {"losses": losses, "norms": norms, "valid": valid}


# --- ring attention against full causal attention ------------------------------------------------
def _ring_vs_full(cp_group, overlap: bool = True, dtype=torch.float64) -> list[float]:
    """Max |difference| of the output and of dq, dk, dv (GQA 4 heads / 2 groups) from fp64 full
    attention; `overlap=False`: each K/V exchange lands before its block computes; `dtype`: of the
    ring's inputs (its blocks compute in fp32 whatever they get)."""
    cp, r = comm.group_size(cp_group), comm.group_rank(cp_group)
    g = torch.Generator().manual_seed(0)
    b, np_, ng, s, d = 2, 4, 2, 64, 8
    q, k, v, dout = (
        torch.randn(b, n, s, d, generator=g, dtype=torch.float64) for n in (np_, ng, ng, np_)
    )
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(
        full[0], *(t.repeat_interleave(np_ // ng, 1) for t in full[1:]), is_causal=True, scale=0.3
    )
    ref.backward(dout)
    mine = [slice_for_cp(t, 2, r, cp).to(dtype).requires_grad_() for t in (q, k, v)]
    out = ring_attention(*mine, cp_group, 0.3, overlap=overlap)
    out.backward(slice_for_cp(dout, 2, r, cp).to(dtype))
    assert out.dtype == dtype and all(a.grad.dtype == dtype for a in mine)
    errs = [(out - slice_for_cp(ref, 2, r, cp)).abs().max().item()]
    for a, want in zip(mine, full):
        errs.append((a.grad - slice_for_cp(want.grad, 2, r, cp)).abs().max().item())
    return errs


# --- activation memory: what one microbatch's forward keeps for backward ----------------------------
MEMORY_FLAGS = [*TINY, *LLAMA, "--seq-length", "256", "--max-position-embeddings", "256"]


def _memory_cfg(cp: int, world: int):
    return parse_args([*MEMORY_FLAGS, *cp_flags(cp)]).finalize(world)


def _held_activation_bytes(cp: int) -> int:
    """As tests/test_estimate.py measures it: storages born in the forward and alive after it."""
    import gc

    cfg = _memory_cfg(cp, dist.get_world_size())
    ps = ParallelState.build(1, 1, cp=cp)
    set_random_seed(1, ps.tp_rank)
    model = build_model_chunks(cfg, ps, cfg.padded_vocab_size(500))[0].train()
    g = torch.Generator().manual_seed(0)
    tokens, labels = (
        slice_for_cp(torch.randint(0, 500, (2, 256), generator=g), 1, ps.cp_rank, cp)
        for _ in range(2)
    )
    model(tokens, None, None, labels).sum().backward()  # warm caches (rope tables)
    with _births_mode() as births:
        loss = model(tokens, None, None, labels)
    gc.collect()
    skip = _storage_refs([loss, *model.parameters()])
    held = sum(n for ref, n in births.refs.items() if not ref.expired() and ref not in skip)
    loss.sum().backward()
    return held


# --- the three process groups --------------------------------------------------------------------
def _world2(root: str) -> dict:
    """cp2: ring unit check, losses, a checkpoint at iteration 2 and an exact resume from it."""
    ps = ParallelState.build(1, 1, cp=2)
    out = {"ring": _ring_vs_full(ps.cp_group) + _ring_vs_full(ps.cp_group, overlap=False)}
    out["bf16 ring"] = _ring_vs_full(ps.cp_group, dtype=torch.bfloat16)
    out["memory"] = _held_activation_bytes(2)
    ckpt = ["--save", root, "--load", root]
    out["cp2"] = _train(cp_flags(2))
    out["first"] = _train([*cp_flags(2), *ckpt], iters=2, save_at=2)
    out["resumed"] = _train([*cp_flags(2), *ckpt])
    dist_ckpt = ["--save", f"{root}/dist", "--ckpt-format", "torch_dist"]
    out["first dist"] = _train([*cp_flags(2), *dist_ckpt], iters=2, save_at=2)
    return out


def _world1(root: str) -> dict:
    """The single-process references, and the cp2 checkpoint loaded at cp1."""
    return {
        "gpt": _train([]),
        "llama": _train(LLAMA),
        "gpt 4 layers": _train(FOUR_LAYERS),
        "from cp2": _train(["--load", root], iters=3),
        "from cp2 torch_dist": _train(["--load", f"{root}/dist"], iters=3),
        "memory": _held_activation_bytes(1),
    }


def _world4() -> dict:
    ps = ParallelState.build(1, 1, cp=4)
    out = {"ring": _ring_vs_full(ps.cp_group), "memory": _held_activation_bytes(4)}
    for name, flags, _ in LAYOUTS:
        out[name] = _train(flags)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("cp_ckpt"))
    two = run_distributed(_world2, 2, root, timeout=120)
    one = run_distributed(_world1, 1, root, timeout=120)[0]
    four = run_distributed(_world4, 4, timeout=120)
    return {"two": two, "one": one, "four": four}


def _assert_losses(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for it, ref in want.items():
        assert got[it] == pytest.approx(ref, rel=1e-5), (what, it, got[it], ref)


def _assert_same_run(got: dict, want: dict, what: str) -> None:
    """Losses to 1e-5, gradient norms to 1e-4 (a sum of squares over differently split sums),
    and the validation loss after training."""
    _assert_losses(got["losses"], want["losses"], what)
    for it, ref in want["norms"].items():
        assert got["norms"][it] == pytest.approx(ref, rel=1e-4), (what, it, got["norms"][it], ref)
    assert got["valid"] == pytest.approx(want["valid"], rel=1e-5), what


def test_ring_attention_equals_full_causal_attention_forward_and_backward(results):
    """cp 1 (one block, no group), 2 (overlapped and not) and 4: output, dq, dk, dv."""
    assert max(_ring_vs_full(None)) < 1e-5
    for world, n in (("two", 8), ("four", 4)):
        for rank_errs in results[world]:
            errs = rank_errs["ring"]
            assert len(errs) == n and max(errs) < 1e-5, (world, errs)
    for rank in results["two"]:  # bf16 in and out: the inputs' rounding, nothing more
        assert 1e-4 < max(rank["bf16 ring"]) < 5e-2, rank["bf16 ring"]


def test_cp2_and_cp4_layouts_match_single_process_losses(results):
    one = results["one"]
    assert one["gpt"]["losses"][ITERS] < one["gpt"]["losses"][1]  # it learns
    for rank in results["two"]:
        _assert_same_run(rank["cp2"], one["gpt"], "cp2")
    for name, _, flavour in LAYOUTS:
        for rank in results["four"]:
            _assert_same_run(rank[name], one[flavour], name)


def test_cp2_resume_is_exact_and_its_checkpoint_loads_at_cp1(results):
    ref = results["one"]["gpt"]["losses"]
    for rank in results["two"]:
        assert sorted(rank["first"]["losses"]) == [1, 2]
        assert sorted(rank["resumed"]["losses"]) == [3, 4]  # it started from the checkpoint
        _assert_losses({**rank["first"]["losses"], **rank["resumed"]["losses"]}, ref, "resume")
    for fmt in ("", " torch_dist"):  # both checkpoint formats: written once per cp group
        from_cp2 = results["one"][f"from cp2{fmt}"]["losses"]
        assert sorted(from_cp2) == [3]
        assert from_cp2[3] == pytest.approx(ref[3], rel=1e-5)


def test_activation_memory_per_rank_falls_as_one_over_cp_as_estimated(results):
    """Measured per rank at cp 1/2/4 (seq 256): about 1/cp of cp1's, and the estimator's
    activations (estimate/activations.py, ring attention's terms) within 15% of each."""
    one = results["one"]["memory"]
    for world, cp in (("one", 1), ("two", 2), ("four", 4)):
        ranks = [results["one"]] if cp == 1 else results[world]
        cfg = _memory_cfg(cp, cp)
        est = sum(chunk_bytes(cfg, cfg.padded_vocab_size(500), 0, device="cpu"))
        for rank in ranks:
            got = rank["memory"]
            assert got == pytest.approx(one / cp, rel=0.15), (cp, got, one)
            assert est == pytest.approx(got, rel=0.15), (cp, est, got)
        print(f"cp{cp}: measured {got} bytes ({got / one:.3f} of cp1), estimated {est}")


def test_estimator_models_ring_traffic_and_dp_x_cp_reduction():
    one, two = (parse_args([*TINY, *cp_flags(cp)]).finalize(4) for cp in (1, 2))
    assert ring_bytes(one) == {}
    # per layer and microbatch: K/V [2, b=2, ng=4, s/cp=64, d=8] fp32 once forward, once backward;
    # dK/dV twice (cp hops)
    kv = 2 * 2 * 4 * 64 * 8
    assert ring_bytes(two) == {"k/v blocks": 2 * 4 * kv, "dk/dv blocks": 2 * 4 * kv}
    a, b = estimate(one, 512), estimate(two, 512)
    assert a.times["cp comm"] == 0 < b.times["cp comm"]
    assert b.stages[0].activations < 0.6 * a.stages[0].activations
    assert "cp2" in b.layout


def test_rank_grid_places_cp_between_tp_and_dp():
    g = group_ranks(16, tp=2, pp=2, cp=2)  # grid [pp, dp, cp, tp] = [2, 2, 2, 2]
    assert g["tp"][:2] == [[0, 1], [2, 3]]
    assert g["cp"][:3] == [[0, 2], [1, 3], [4, 6]]
    assert g["dp"][:2] == [[0, 4], [1, 5]]
    assert g["dp_cp"][:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["pp"][0] == [0, 8]
    assert g["mp"][0] == [0, 1, 8, 9]
    assert group_ranks(8, 2, 2) == {**group_ranks(8, 2, 2, 1)}  # cp = 1: as before


def test_chunks_are_load_balanced():
    assert cp_chunk_positions(16, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_chunk_positions(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([cp_chunk_positions(32, r, 4) for r in range(4)]).sort().values
    assert every.tolist() == list(range(32))


@pytest.mark.parametrize(
    "flags,message",
    [
        ("--seq-length 90", r"--seq-length \(90\) must be divisible by 2 x --context-parallel"),
        ("--attention-backend fused", r"does not support --attention-backend fused"),
        ("--attention-dropout 0.1", r"needs --attention-dropout 0 \(got 0.1\)"),
        ("--reset-attention-mask", r"does not support --reset-attention-mask"),
        ("--sft", r"does not support --sft"),
        ("--eval-tasks hellaswag", r"does not support --eval-tasks"),
        ("--context-parallel-size 0", r"--context-parallel-size must be positive, got 0"),
    ],
)
def test_unsupported_cp_settings_are_refused_by_name(flags, message, capsys):
    data = [f for f in TINY if f != "--mock-data"] + ["--data-path", "corpus"]  # --sft needs one
    base = [*data, "--seq-length", "128", "--context-parallel-size", "2"]
    with pytest.raises(SystemExit):
        parse_args([*base, *flags.split()])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, err), err


def test_world_size_must_hold_the_cp_ranks():
    cfg = parse_args([*TINY, *cp_flags(4, tp=2)])
    with pytest.raises(ConfigError, match=r"x --context-parallel-size \(4\) = 8"):
        cfg.finalize(4)
