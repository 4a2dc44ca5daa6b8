"""tools/estimate.py against real runs: parameters, gradient buffers and optimizer state byte-exact per
rank for several layouts; activations within 15% of what a real forward keeps for backward, and the
per-stage activation peak within 15% of a real pipelined step (1F1B, interleaved, ZB-H1).

One 4-rank gloo group (a module fixture) builds every layout with `training.setup`, runs one train
step (so optimizer state exists) and counts unique storages; it also measures activation memory: a
dispatch mode weakly references the storage of every tensor created during one microbatch's forward,
and the ones still alive after it (less parameters and the returned loss) are exactly what autograd
and recompute checkpoints keep for backward. (The CPU allocator's own accounting, torch.profiler's
profile_memory, agrees on one process but not under gloo, whose collectives free their staging
buffers on another thread.)

    pytest tests/test_estimate.py -s      # prints the validation table (README figures)
"""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite.arguments import parse_args
from megatron_lite.device import params_dtype
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.estimate import chunk_bytes, estimate, static_memory

ROOT = Path(__file__).resolve().parents[1]
WORLD = 4
TINY = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 8 --hidden-dropout 0 --attention-dropout 0 "
    "--train-iters 1 --eval-iters 0 --mock-data --tokenizer-type NullTokenizer --vocab-size 1000 "
    "--make-vocab-size-divisible-by 8 --distributed-timeout-minutes 1 --lr 1e-3"
).split()
LLAMA = (
    "--swiglu --normalization RMSNorm --position-embedding-type rope --group-query-attention "
    "--num-query-groups 2 --untie-embeddings-and-output-weights --disable-bias-linear"
).split()
TP2, PP2 = ["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]
ZERO = ["--use-distributed-optimizer"]

# (name, extra flags): dp = 4 / (tp x pp)
LAYOUTS = [
    ("dp4 fp32", []),
    ("tp2 dp2 fp32", TP2),
    ("pp2 dp2 tied fp32", PP2),
    ("tp2 pp2 fp32 sgd", TP2 + PP2 + ["--optimizer", "sgd"]),
    ("dp4 zero fp32", ZERO),
    ("dp4 zero bf16 small buckets", ZERO + ["--bf16", "--ddp-bucket-size", "3000"]),
    ("tp2 dp2 zero bf16 llama", TP2 + ZERO + ["--bf16", *LLAMA]),
    ("pp2 v2 dp2 zero tied", PP2 + ZERO + ["--num-layers-per-virtual-pipeline-stage", "1"]),
    ("tp2 pp2 bf16 sp fp32-grads", TP2 + PP2 + ["--bf16", "--sequence-parallel"]),
]

# activation configs: (name, tp, extra flags); measured on one microbatch, pp = 1
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
ACTIVATIONS = [
    ("gpt fp32 dropout unfused", 1, DROPOUT + ["--attention-backend", "unfused"]),
    ("gpt fp32 sdpa", 1, []),
    ("gpt bf16 dropout fused", 1, DROPOUT + ["--bf16", "--attention-backend", "fused"]),
    (
        "gpt tp2+sp dropout fused",
        2,
        DROPOUT + ["--sequence-parallel", "--attention-backend", "fused"],
    ),
    ("gpt tp2+sp selective", 2, ["--sequence-parallel", "--recompute-granularity", "selective"]),
    ("gpt tp2 full recompute", 2, ["--recompute-granularity", "full"]),
    ("gpt tp2 full block 2", 2, "--recompute-granularity full --recompute-method block".split()),
    ("llama tp2+sp bf16", 2, LLAMA + ["--bf16", "--sequence-parallel"]),
    ("llama tp1 fp32 unfused", 1, LLAMA + ["--attention-backend", "unfused"]),
]
ACT_SHAPE = "--hidden-size 128 --seq-length 128 --num-layers 2 --recompute-num-layers 2".split()

# pipelined activation peaks, one step of each schedule: (schedule, flags); pp 2 x dp 2, 4
# microbatches of 2 (two steps: the first warms caches and creates the optimizer state)
PIPE_SHAPE = "--seq-length 64 --global-batch-size 16 --train-iters 2".split()
PIPELINES = [
    ("1f1b", PP2),
    ("interleaved", PP2 + ["--num-layers-per-virtual-pipeline-stage", "1"]),
    ("zero-bubble", PP2 + ["--pipeline-schedule", "zero-bubble"]),
]


def _cfg(flags, world=WORLD):
    return parse_args(TINY + flags).finalize(world)


def _storage_bytes(tensors, exclude=()) -> int:
    seen = dict.fromkeys(exclude)
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen[st.data_ptr()] = None
            total += st.nbytes()
    return total


def _static_tensors(run) -> tuple[list, list, list]:
    """(parameters, gradient buffers, optimizer state) of a set-up run: what a rank holds throughout."""
    params = [p for c in run.model for p in c.module.parameters()]
    grads = [p.main_grad for p in params] + [p.grad for p in params if p.grad is not None]
    opt = run.optimizer
    states = [t for st in opt.inner.state.values() for t in st.values() if getattr(t, "dim", None)]
    states = [t for t in states if t.dim() > 0] + [pc.master for pc in opt.pieces]
    return params, grads, states


def _count_static(run) -> dict:
    params, grads, states = _static_tensors(run)
    param_ptrs = [p.untyped_storage().data_ptr() for p in params]
    return {
        "params": _storage_bytes(params),
        "grads": _storage_bytes(grads),
        "optimizer": _storage_bytes(states, exclude=param_ptrs),
        "num_params": sum(p.numel() for p in params),
    }


def _births_mode():
    """A dispatch mode that weakly references the storage of every tensor an op creates."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Births(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs = {}  # StorageWeakRef -> bytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    self.refs.setdefault(StorageWeakRef(st), st.nbytes())
            return out

    return Births()


def _measure_activations(flags, tp):
    """Bytes of the storages created during one microbatch's forward that are still alive after it
    (what autograd and recompute checkpoints keep for backward), less parameters and the loss."""
    import gc

    import torch

    from megatron_lite.model import build_model_chunks
    from megatron_lite.parallel_state import ParallelState
    from megatron_lite.tensor_parallel import set_random_seed

    cfg = _cfg([*ACT_SHAPE, "--tensor-model-parallel-size", str(tp), *flags])
    ps = ParallelState.build(tp, 1)
    set_random_seed(1, ps.tp_rank)
    model = build_model_chunks(cfg, ps, cfg.padded_vocab_size(1001))[0]
    model.to(params_dtype(cfg.optim)).train()
    g = torch.Generator().manual_seed(0)
    b, s = cfg.train.micro_batch_size, cfg.model.seq_length
    tokens, labels = (torch.randint(0, 1000, (b, s), generator=g) for _ in range(2))
    model(tokens, None, None, labels).sum().backward()  # warm caches (rope, masks)
    with _births_mode() as births:
        loss = model(tokens, None, None, labels)
    gc.collect()
    skip = _storage_refs([loss, *model.parameters()])
    held = sum(n for ref, n in births.refs.items() if not ref.expired() and ref not in skip)
    loss.sum().backward()
    return held


def _storage_refs(tensors) -> set:
    from torch.multiprocessing.reductions import StorageWeakRef

    return {StorageWeakRef(t.untyped_storage()) for t in tensors if t is not None}


def _measure_pipeline_peak(flags):
    """(pp rank, (peak bytes, action after which it was seen), every sample) of one pipelined train
    step, after a warm-up step (rope/mask caches, optimizer state); method: the test's docstring."""
    from unittest import mock

    from megatron_lite import training
    from megatron_lite.pipeline.schedules import _Executor

    run = training.setup(parse_args(TINY + PIPE_SHAPE + flags))
    it = training.build_data_iterators(
        run.cfg, run.tokenizer, run.ps, 0, num_chunks=len(run.model)
    )[0]
    assert training.train_step(run, it)["success"]
    static = _storage_refs(t for group in _static_tensors(run) for t in group)
    run_action, samples = _Executor._run, []

    def run_and_sample(self, k, action):
        run_action(self, k, action)
        kept = _storage_refs(t for pair in self.saved.values() for t in pair)
        transit = _storage_refs([*self.received.values(), *self.to_send.values()]) - kept
        skip = static | transit
        alive = sum(n for ref, n in births.refs.items() if not ref.expired() and ref not in skip)
        samples.append((alive, repr(action)))

    with mock.patch.object(_Executor, "_run", run_and_sample), _births_mode() as births:
        assert training.train_step(run, it)["success"]
    return run.ps.pp_rank, max(samples), samples


def _measure_all():
    import torch.distributed as dist

    from megatron_lite import training

    out = {"static": {}, "activations": {}}
    for name, flags in LAYOUTS:
        run = training.setup(parse_args(TINY + flags))
        it, _, _ = training.build_data_iterators(
            run.cfg, run.tokenizer, run.ps, 0, num_chunks=len(run.model)
        )
        step = training.train_step(run, it)
        assert step["success"], name
        rank = (run.ps.pp_rank, run.ps.dp_rank, run.padded_vocab_size)
        out["static"][name] = (rank, _count_static(run))
        dist.barrier()
    for name, tp, flags in ACTIVATIONS:
        out["activations"][name] = _measure_activations(flags, tp)
    out["pipelines"] = {}
    for name, flags in PIPELINES:
        out["pipelines"][name] = _measure_pipeline_peak(flags)
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure_all, WORLD, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("name,flags", LAYOUTS, ids=[n for n, _ in LAYOUTS])
def test_params_grads_optimizer_bytes_are_exact_per_rank(measured, name, flags):
    cfg = _cfg(flags)
    for rank_out in measured:
        (pp_rank, dp_rank, padded), got = rank_out["static"][name]
        assert padded == cfg.padded_vocab_size(1001)  # NullTokenizer: --vocab-size + eod
        est = static_memory(cfg, padded, pp_rank, dp_rank)
        want = {
            "params": est.params,
            "grads": est.grads,
            "optimizer": est.optimizer,
            "num_params": est.num_params,
        }
        assert want == got, (name, pp_rank, dp_rank)
        print(f"{name:30s} pp{pp_rank} dp{dp_rank} exact: {got}")


@pytest.mark.slow
@pytest.mark.parametrize("name,tp,flags", ACTIVATIONS, ids=[n for n, _, _ in ACTIVATIONS])
def test_activations_within_15_percent_of_a_real_forward(measured, name, tp, flags):
    cfg = _cfg([*ACT_SHAPE, "--tensor-model-parallel-size", str(tp), *flags])
    est = sum(chunk_bytes(cfg, cfg.padded_vocab_size(1001), 0, device="cpu"))
    for rank_out in measured:
        got = rank_out["activations"][name]
        err = (est - got) / got
        assert abs(err) < 0.15, (name, est, got)
    print(f"{name:30s} estimated {est:9d} measured {got:9d} error {100 * err:+.2f}%")


def test_in_flight_activations_follow_the_schedule():
    """1F1B: stage r holds p - r microbatches; interleaving holds more microbatch-chunks, each 1/v."""
    base = ["--num-layers", "8", "--global-batch-size", "16", "--pipeline-model-parallel-size", "4"]
    one = estimate(_cfg(base, 4), 1008)
    assert [s.in_flight for s in one.stages] == [4, 3, 2, 1]
    per_mb = [chunk_bytes(one.cfg, 1008, r)[0] for r in range(4)]
    assert [s.activations for s in one.stages] == [(4 - r) * per_mb[r] for r in range(4)]
    inter = estimate(_cfg([*base, "--num-layers-per-virtual-pipeline-stage", "1"], 4), 1008)
    assert inter.stages[0].in_flight > 4 and inter.bubble_over_ideal == pytest.approx(
        one.bubble_over_ideal / 2
    )
    assert one.bubble_over_ideal == pytest.approx(3 / 8)  # (p - 1) / m


@pytest.mark.slow
@pytest.mark.parametrize("schedule,flags", PIPELINES, ids=[n for n, _ in PIPELINES])
def test_activation_peak_of_a_real_pipelined_step_within_15_percent(measured, schedule, flags):
    """The estimate's per-stage activations (one microbatch's bytes per chunk, summed over the
    schedule's in-flight microbatch-chunks) against the peak of a real step on gloo.

    Measured: a births mode records every storage created during the step; right after each action
    the executor runs (F, B or W) the ones still alive are summed, less parameters, gradient buffers
    and optimizer state. Action boundaries, not every allocation: within an action come and go the
    transients the estimate leaves to the reserve (backward temporaries, the logits before their
    softmax, gloo's staging); between actions only what the schedule holds remains, and the peak
    follows an F (or, under ZB-H1, a B: the W queue keeps each linear's input and output gradient).
    p2p buffers are excluded by construction: an activation received ahead of its forward or a
    gradient waiting to be sent is skipped, unless the executor also keeps it for a backward (a
    stage's received input and its output, held from F to B, count). No gc.collect: what a cycle
    would keep alive stays alive in a real run too."""
    cfg = _cfg(PIPE_SHAPE + flags)
    est = estimate(cfg, cfg.padded_vocab_size(1001), device="cpu")
    assert est.schedule == schedule
    printed = set()
    for rank_out in measured:
        pp_rank, (got, at), samples = rank_out["pipelines"][schedule]
        stage = est.stages[pp_rank]
        err = (stage.activations - got) / got
        if pp_rank not in printed:  # dp ranks of a stage agree
            printed.add(pp_rank)
            print(
                f"{schedule:12s} stage {pp_rank} estimated {stage.activations:9d} "
                f"({stage.in_flight} in flight) measured {got:9d} after {at} error "
                f"{100 * err:+.2f}%\n    KiB after each action: "
                + " ".join(f"{a}:{n // 1024}" for n, a in samples)
            )
        assert abs(err) < 0.15, (schedule, pp_rank, stage.activations, got)


def test_recompute_trades_activations_for_flops():
    plain, sel, full = (
        estimate(_cfg([*ACT_SHAPE, *f]), 1008)
        for f in ([], ["--recompute-granularity", "selective"], ["--recompute-granularity", "full"])
    )
    assert plain.recompute_flops == 0 < sel.recompute_flops < full.recompute_flops
    assert full.stages[0].activations < sel.stages[0].activations <= plain.stages[0].activations
    assert plain.model_flops == sel.model_flops == full.model_flops


def test_overlaps_shorten_only_the_modelled_data_parallel_time():
    zero = ["--use-distributed-optimizer"]
    plain, grad, both = (
        estimate(parse_args([*GPT_345M, *zero, *f]).finalize(64), 50304)
        for f in (
            [],
            ["--overlap-grad-reduce"],
            ["--overlap-grad-reduce", "--overlap-param-gather"],
        )
    )
    assert plain.times["dp comm"] > grad.times["dp comm"] > both.times["dp comm"]
    assert plain.peak_memory == grad.peak_memory == both.peak_memory
    assert plain.times["compute"] == both.times["compute"]


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "estimate.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


GPT_345M = (
    "--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 1024 "
    "--micro-batch-size 4 --global-batch-size 512 --bf16 --vocab-size 50257"
).split()
LLAMA_7B = (
    "--num-layers 32 --hidden-size 4096 --num-attention-heads 32 --ffn-hidden-size 11008 "
    "--seq-length 4096 --micro-batch-size 1 --global-batch-size 1024 --bf16 --vocab-size 32000 "
    "--swiglu --normalization RMSNorm --position-embedding-type rope "
    "--untie-embeddings-and-output-weights --disable-bias-linear --hidden-dropout 0 "
    "--attention-dropout 0 --tensor-model-parallel-size 2 --sequence-parallel "
    "--use-distributed-optimizer"
).split()


@pytest.mark.slow
@pytest.mark.parametrize("flags", [GPT_345M, LLAMA_7B], ids=["gpt-345m", "llama-7b"])
def test_cli_prints_memory_and_a_table_of_fitting_layouts(flags):
    out = _cli(*flags, "--world-size", "64", "--search", "--top", "5")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "memory per GPU" in text and "a model, not a measurement" in text
    table = text[text.index("best layouts on 64 GPUs") :].splitlines()[2:]
    assert len(table) == 5, text
    speeds = [float(r.split()[-3].replace(",", "")) for r in table]
    assert speeds == sorted(speeds, reverse=True) and speeds[-1] > 0
    assert all(0 < float(r.split()[-4]) <= 71.6 for r in table)  # GiB that fit in 80 GiB
    assert all(r.split()[1].startswith("tp") for r in table)


def test_cli_rejects_a_bad_layout_naming_the_flags():
    out = _cli(*GPT_345M, "--tensor-model-parallel-size", "3")
    assert out.returncode != 0
    assert "--num-attention-heads (16) must be divisible by --tensor-model-parallel-size (3)" in (
        out.stderr
    )
    out = _cli(*GPT_345M, "--world-size", "6", "--pipeline-model-parallel-size", "4")
    assert out.returncode != 0 and "--pipeline-model-parallel-size (4)" in out.stderr
