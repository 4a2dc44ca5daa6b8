"""Pipeline parallelism on gloo: every schedule (1F1B, interleaved, zero-bubble) at pp = 2 and 4 gives
the loss and every parameter's gradient of one process running all layers, step after step with an
optimizer between; evaluation (forward only) matches; tied embeddings stay identical on the first and
last stage; data-parallel sync is enabled once per chunk; a stage that raises makes every rank of a
job fail promptly by itself."""

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from factory import NO_DROPOUT, tiny_config

from megatron_lite.distributed.finalize import allreduce_embedding_grads
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.model import build_model_chunks
from megatron_lite.parallel_state import ParallelState, free_port
from megatron_lite.pipeline import get_forward_backward_func as get_fb
from megatron_lite.tensor_parallel import WeightGradStore

VOCAB, SEQ, MBS, STEPS = 100, 8, 2, 2
EMBED, OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


def make_cfg(num_layers, pp=1, vpp_layers=None, schedule="1f1b"):
    return tiny_config(
        num_layers=num_layers, seq_length=SEQ, **NO_DROPOUT, make_vocab_size_divisible_by=32,
        pp=pp, vl=vpp_layers, pipeline_schedule=schedule, seed=5,
    )  # fmt: skip


def microbatches(step, m):
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(m):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:], torch.rand(MBS, SEQ, generator=g)))
    return out


def forward_step(data_iterator, model):
    tokens, labels, weights = next(data_iterator)
    per_token = model(tokens, None, None, labels)

    def loss_func(out):
        loss = (out * weights).sum() / weights.sum()
        return loss, {"lm loss": loss.detach()}

    return per_token, loss_func


def reference(num_layers, m):
    """One process, all layers: per step the mean loss, every gradient, the eval loss, then Adam."""
    cfg = make_cfg(num_layers)
    model = build_model_chunks(cfg, ParallelState.single(), cfg.padded_vocab_size(VOCAB))[0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = []
    for step in range(STEPS):
        batches = microbatches(step, m)
        total = 0.0
        for tokens, labels, w in batches:
            loss = (model(tokens, None, None, labels) * w).sum() / w.sum()
            (loss / m).backward()
            total += loss.item() / m
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            ev = [(model(t, None, None, y) * w).sum() / w.sum() for t, y, w in microbatches(99, m)]
        steps.append((total, grads, sum(e.item() for e in ev) / m))
    return steps


class SyncRecorder:
    """Stands in for DDP's no_sync on a chunk: logs, per gradient arrival, whether sync was off."""

    def __init__(self, chunk):
        self.off, self.events = False, []
        for name, p in chunk.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda _, n=name: self.events.append((n, self.off))
            )

    def __call__(self):
        rec = self

        class _Ctx:
            def __enter__(self):
                rec.off = True

            def __exit__(self, *exc):
                rec.off = False

        return _Ctx()


def run_layout(num_layers, pp, m, vpp_layers=None, schedule="1f1b", variable=False):
    cfg = make_cfg(num_layers, pp, vpp_layers, schedule)
    ps = ParallelState.build(pp=pp, vpp_size=cfg.virtual_pipeline_size)
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(VOCAB))
    recorders = [SyncRecorder(c) for c in chunks]
    for c, rec in zip(chunks, recorders):
        c.no_sync = rec
    fb = get_fb(cfg, ps)
    what = f"pp={pp} {fb.schedule} m={m}" + (" variable shapes" if variable else "")
    opt = torch.optim.Adam([p for c in chunks for p in c.parameters()], lr=1e-2)
    params = {n: p for c in chunks for n, p in c.named_parameters()}
    for step, (want_loss, want_grads, want_eval) in enumerate(reference(num_layers, m)):
        its = [iter(microbatches(step, m)) for _ in chunks]
        store = WeightGradStore()
        reports = fb(
            forward_step,
            its,
            chunks,
            m,
            SEQ,
            MBS,
            variable_seq_lengths=variable,
            weight_grad_store=store,
        )
        allreduce_embedding_grads(chunks, ps)
        assert store.num_pending() == 0, what
        if ps.is_last_stage:
            assert len(reports) == m, what
            got = sum(r["lm loss"].item() for r in reports) / m
            assert abs(got - want_loss) <= 1e-5 * abs(want_loss), (what, step, got, want_loss)
        else:
            assert reports == [], what
        for name, p in params.items():
            want = want_grads[EMBED if name == OUTPUT else name]
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6, msg=f"{what} {name}")
        for rec in recorders:  # sync enabled exactly for the final gradient arrival(s)
            last = {n: i for i, (n, _) in enumerate(rec.events)}
            synced = [i for i, (_, off) in enumerate(rec.events) if not off]
            assert synced and set(synced) <= set(last.values()), (what, rec.events)
            if schedule != "zero-bubble":  # unsplit backward: every parameter's last one
                assert set(synced) == set(last.values()), what
            rec.events.clear()
        opt.step()
        opt.zero_grad(set_to_none=True)
        evals = fb(
            forward_step,
            [iter(microbatches(99, m)) for _ in chunks],
            chunks,
            m,
            SEQ,
            MBS,
            forward_only=True,
        )
        assert all(p.grad is None for p in params.values()), f"{what}: eval made gradients"
        if ps.is_last_stage:
            got = sum(r["lm loss"].item() for r in evals) / m
            assert abs(got - want_eval) <= 1e-5 * abs(want_eval), (what, step, got, want_eval)
    tied = [p for p in params.values() if getattr(p, "shared_embedding", False)]
    if ps.is_first_stage or ps.is_last_stage:  # the two copies of the tied embedding are identical
        assert len(tied) == 1, what
        both = [torch.empty_like(tied[0]) for _ in range(2)]
        dist.all_gather(both, tied[0].detach(), group=ps.embedding_group)
        assert torch.equal(both[0], both[1]), f"{what}: tied embeddings diverged"
    return what


def _fail_worker(pp: int, bad_rank: int, m: int, outdir: str, port: int) -> None:
    """One rank of a job launched as plain processes: the bad stage raises in its 3rd forward; every
    rank records what it raised and lets it end the process, as in a real run."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    rank = int(os.environ["RANK"])
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=pp, timeout=timedelta(minutes=2)
    )
    cfg = make_cfg(pp, pp)
    ps = ParallelState.build(pp=pp)
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(VOCAB))
    calls = []

    def failing_step(it, model):
        calls.append(1)
        if ps.pp_rank == bad_rank and len(calls) == 3:
            raise ValueError("stage exploded")
        return forward_step(it, model)

    start = time.monotonic()
    try:
        get_fb(cfg, ps)(failing_step, [iter(microbatches(0, m))], chunks, m, SEQ, MBS)
    except BaseException as e:
        with open(f"{outdir}/rank{dist.get_rank()}", "w") as f:
            f.write(f"{type(e).__name__}|{time.monotonic() - start:.2f}|{e}")
        raise


def _run_failing_job(tmp_path, pp, bad_rank, m):
    # the key-value store lives here, as torchrun's lives in its agent, and outlives the ranks
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    code = (
        "import sys; sys.path.insert(0, 'tests'); import test_pipeline_parallel as t; "
        f"t._fail_worker({pp}, {bad_rank}, {m}, {str(tmp_path)!r}, {port})"
    )
    procs = []
    for rank in range(pp):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(pp), OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    try:
        codes = [p.wait(timeout=60) for p in procs]  # collectives would time out after 120 s
    finally:
        for p in procs:
            p.kill()
        del store
    for rank, rc in enumerate(codes):
        assert rc != 0, f"rank {rank} exited cleanly"
        kind, elapsed, msg = (tmp_path / f"rank{rank}").read_text().split("|", 2)
        if rank == bad_rank:
            assert (kind, msg) == ("ValueError", "stage exploded")
        else:
            assert kind == "PipelineAborted", (rank, kind, msg)
            assert f"pipeline rank {bad_rank}" in msg and "stage exploded" in msg, msg
        assert float(elapsed) < 10, (rank, elapsed)


@pytest.mark.slow
def test_a_raising_stage_makes_every_rank_fail_promptly(tmp_path):
    _run_failing_job(tmp_path, pp=4, bad_rank=1, m=6)


def _pp2_layouts():
    done = [
        run_layout(4, 2, 4),
        run_layout(4, 2, 4, variable=True),
        run_layout(4, 2, 4, vpp_layers=1),
        run_layout(4, 2, 4, schedule="zero-bubble"),
        run_layout(2, 2, 1),  # fewer microbatches than stages
    ]
    return done


def _pp4_layouts():
    done = [
        run_layout(4, 4, 8),
        run_layout(8, 4, 8, vpp_layers=1),
        run_layout(4, 4, 6, schedule="zero-bubble"),
    ]
    return done


def test_pp2_schedules_match_single_process():
    results = run_distributed(_pp2_layouts, 2, timeout=120)
    assert results[0] == [
        "pp=2 1f1b m=4",
        "pp=2 1f1b m=4 variable shapes",
        "pp=2 interleaved m=4",
        "pp=2 zero-bubble m=4",
        "pp=2 1f1b m=1",
    ]


@pytest.mark.slow
def test_pp4_schedules_match_single_process():
    results = run_distributed(_pp4_layouts, 4, timeout=120)
    assert results[0] == ["pp=4 1f1b m=8", "pp=4 interleaved m=8", "pp=4 zero-bubble m=6"]
