"""--ckpt-format torch_dist (torch.distributed.checkpoint): any layout into any other, async save,
safe metadata, and megatron-core's own dist_checkpointing files.

The state round-trips reuse test_checkpointing_gpt's setup: one layout takes two optimizer steps on
name-derived gradients and saves; another loads; the full parameters and optimizer states assembled
from the live ranks must be identical.
"""

import os
import pickle
import time

import pytest
import torch
from launch_util import TINY_GPT, kill_job, launch, layout_flags, losses, run_pretrain
from test_checkpointing_gpt import _assert_same_model_and_optimizer, _setup, _snapshot

from megatron_lite import checkpointing as ckpt
from megatron_lite.arguments import parse_args
from megatron_lite.checkpointing import dist as ckdist
from megatron_lite.checkpointing import dist_read
from megatron_lite.config import CheckpointConfig, ConfigError
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


def test_tp2_pp2_dp2_zero1_loads_into_tp1_and_converts_both_ways(tmp_path):
    out = run_distributed(_train_and_save, 8, str(tmp_path), 2, 2, True, timeout=150)
    src = [s for s, _ in out]
    files = out[0][1]
    assert ".metadata" in files and "common.pt" in files
    assert sum(f.endswith(".distcp") for f in files) == 8  # every rank wrote its own shards
    assert sum(f.startswith("rng_") for f in files) == 8
    dst = run_distributed(_load, 1, str(tmp_path), 1, 1, False, timeout=90)
    _assert_same_model_and_optimizer(src, dst)
    # convert.py: torch_dist -> torch files at tp 2 -> torch_dist at tp 1 x pp 2, optimizer kept
    convert = _convert_tool()
    files, back = str(tmp_path / "as_torch"), str(tmp_path / "back")
    assert convert.main(["--load-dir", str(tmp_path), "--save-dir", files,
                         "--target-tensor-parallel-size", "2"]) == 0  # fmt: skip
    assert not ckdist.is_dist_checkpoint(ckpt.iteration_dir(files, 2))
    assert convert.main(["--load-dir", files, "--save-dir", back, "--ckpt-format", "torch_dist",
                         "--target-pipeline-parallel-size", "2"]) == 0  # fmt: skip
    assert ckdist.is_dist_checkpoint(ckpt.iteration_dir(back, 2))
    dst = run_distributed(_load, 1, back, 1, 1, False, timeout=90)
    _assert_same_model_and_optimizer(src, dst)


def _convert_tool():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "checkpoint", "convert.py")
    spec = importlib.util.spec_from_file_location("convert_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ITERS = 8
DIST = ["--ckpt-format", "torch_dist"]


@pytest.fixture(scope="module")
def reference():
    out = run_pretrain(1, [*TINY_GPT, "--train-iters", str(ITERS), *layout_flags(1, 1)])
    ref = losses(out.stdout)
    assert sorted(ref) == list(range(1, ITERS + 1)), out.stdout[-3000:]
    return ref


def _same_losses(got: dict, ref: dict, iters) -> None:
    assert sorted(got) == list(iters), got
    for it in iters:
        assert got[it] == pytest.approx(ref[it], rel=1e-5), (it, got[it], ref[it])


@pytest.mark.slow
def test_tp2_pp2_dp2_torch_dist_checkpoint_resumes_at_tp1_with_the_same_losses(reference, tmp_path):
    flags = [*TINY_GPT, "--train-iters", str(ITERS), *DIST, "--save", str(tmp_path)]
    zero1 = ["--use-distributed-optimizer", "--exit-interval", "4"]
    first = run_pretrain(8, [*flags, *layout_flags(2, 2), *zero1])
    _same_losses(losses(first.stdout), reference, range(1, 5))
    assert ckdist.is_dist_checkpoint(ckpt.iteration_dir(str(tmp_path), 4))
    second = run_pretrain(1, [*flags, *layout_flags(1, 1), "--load", str(tmp_path)])
    _same_losses(losses(second.stdout), reference, range(5, ITERS + 1))


@pytest.mark.slow
def test_async_save_resumes_exactly_and_a_kill_mid_write_leaves_the_previous_one(
    reference, tmp_path
):
    """dp 2 (the background writer's collectives run beside training's): saves at 2 and 4 in the
    background, resumed; then the save at 6 is killed while written: 4 stays the latest and whole."""
    root = str(tmp_path)
    flags = [*TINY_GPT, "--train-iters", str(ITERS), *layout_flags(1, 1), *DIST, "--async-save"]
    flags += ["--save", root, "--load", root, "--save-interval", "2"]
    first = run_pretrain(2, [*flags, "--exit-interval", "4"])
    _same_losses(losses(first.stdout), reference, range(1, 5))
    assert "finalized the async checkpoint save" in first.stdout
    assert ckpt.read_latest_iteration(root) == 4
    proc, lines = launch(2, flags, env={ckpt.PAUSE_ENV: ckdist.ASYNC_PAUSE})
    deadline = time.monotonic() + 120
    while not (tmp_path / ".paused").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "".join(lines)[-4000:]
        time.sleep(0.2)
    assert (tmp_path / ".paused").exists()
    # the save at 6 is being written while training went on past it
    assert ckpt.read_latest_iteration(root) == 4 and (tmp_path / "iter_0000006.tmp").is_dir()
    kill_job(proc)
    proc.wait(timeout=30)
    assert ckpt.read_latest_iteration(root) == 4 and not (tmp_path / "iter_0000006").exists()
    resumed = run_pretrain(2, flags)
    _same_losses(losses(resumed.stdout), reference, range(5, ITERS + 1))
    assert ckpt.read_latest_iteration(root) == ITERS
    assert not list(tmp_path.glob("iter_*.tmp"))


def test_async_save_needs_torch_dist_and_a_bad_format_is_named(capsys):
    with pytest.raises(ConfigError, match="--async-save needs --ckpt-format torch_dist"):
        CheckpointConfig(async_save=True)
    with pytest.raises(SystemExit):
        parse_args(["--ckpt-format", "zarr"])
    assert "--ckpt-format" in capsys.readouterr().err
    cfg = parse_args(["--ckpt-format", "torch_dist", "--async-save"])
    assert (cfg.checkpoint.ckpt_format, cfg.checkpoint.async_save) == ("torch_dist", True)


def test_dcp_metadata_with_any_other_pickled_object_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    d = tmp_path / "iter_0000001"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ckpt.CheckpointError, match="posix.system, which is not allowed"):
        dist_read.read_metadata(str(d))


# ---------------------------------------------------------------------------------------------------
# megatron-core's own dist_checkpointing.save


def _inline_mcore_writer() -> None:
    """megatron-core writes its files from forked worker processes and syncs CUDA (absent here);
    on this CPU-only, thread-heavy test process the forks can deadlock, so its per-bucket writer runs
    inline. The files are the ones megatron-core writes: the same function writes them."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    writer = fa.FileSystemWriterAsync

    def inline(transform_list, use_msc, rank, write_buckets, results):  # noqa: ARG001
        local, count, out = queue.Queue(), queue.Queue(), {}
        for i, bucket in enumerate(write_buckets):
            count.put(i)
            writer.write_preloaded_data(transform_list, i, bucket, local, count, True)
            idx, res = local.get()
            if isinstance(res, Exception):
                raise res
            out[idx] = res
        results.put(out)

    writer.write_preloaded_data_multiproc = staticmethod(inline)
    fa._get_write_results_queue = queue.Queue
    fa._process_memory = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"


def _mcore_dist_save(root: str) -> dict:
    """Both flavours' GPTModel saved by megatron-core into <root>/<flavour>; their state dicts."""
    from megatron.core import dist_checkpointing
    from test_megatron_checkpoints import GPT2, LLAMA, mcore_model

    _inline_mcore_writer()
    out = {}
    for flavour, shape in (("gpt2", GPT2), ("llama", LLAMA)):
        model = mcore_model(flavour, shape["num_query_groups"], shape["ffn_hidden_size"])
        d = ckpt.iteration_dir(os.path.join(root, flavour), 3)
        os.makedirs(d)
        dist_checkpointing.save(model.sharded_state_dict(), d)
        ckpt.write_latest(os.path.join(root, flavour), 3)
        out[flavour] = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    return out


def _our_flags(flavour: str) -> list[str]:
    from test_megatron_checkpoints import SHAPE

    flags = [f for f in TINY_GPT if f not in ("--vocab-size", "500")]
    flags += ["--vocab-size", str(SHAPE["vocab"]), "--train-iters", "1"]
    if flavour == "llama":
        flags += (
            "--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
            "--untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2 "
            "--ffn-hidden-size 96"
        ).split()
    return flags


def _load_mcore_at_tp2(root: str) -> dict:
    return {f: _load_one_at_tp2(os.path.join(root, f), f) for f in ("gpt2", "llama")}


def _load_one_at_tp2(root: str, flavour: str) -> dict:
    from megatron_lite.model import build_model_chunks
    from megatron_lite.parallel_state import ParallelState

    cfg = parse_args([*_our_flags(flavour), *layout_flags(2, 1)]).finalize(2)
    ps = ParallelState.build(2, 1)
    chunks = build_model_chunks(cfg, ps, cfg.padded_vocab_size(128))
    with pytest.raises(ckpt.CheckpointError, match="--no-load-optim"):
        ckpt.load_checkpoint(root, chunks, object(), None, cfg, ps)
    out = ckpt.load_checkpoint(root, chunks, None, None, cfg, ps)
    assert out["iteration"] == 3
    return {n: (t.detach().clone(), t.partition_dim, t.partition_stride)
            for n, t in chunks[0].named_parameters()}  # fmt: skip


@pytest.mark.slow
def test_megatron_cores_own_torch_dist_checkpoint_loads_with_the_same_weights(tmp_path):
    """dist_checkpointing.save of megatron-core's GPTModel (stacked layers, Transformer Engine norm
    names, _extra_state objects): every tensor reads back equal, and --load's path at tp 2 gives
    each rank its shard of it."""
    from megatron_lite.checkpointing.mcore_dist import McoreDistReader

    saved = run_distributed(_mcore_dist_save, 1, str(tmp_path), timeout=300)[0]
    loaded = run_distributed(_load_mcore_at_tp2, 2, str(tmp_path), timeout=120)
    for flavour, want in saved.items():
        reader = McoreDistReader(
            str(tmp_path / flavour), config=parse_args(_our_flags(flavour)).to_dict()
        )
        assert sorted(reader.names()) == sorted(want)
        for name, t in want.items():
            assert torch.equal(reader.full_tensor(name), t), (flavour, name)
        _assert_tp2_shards(want, [rank[flavour] for rank in loaded])


def _assert_tp2_shards(want: dict, shards: list[dict]) -> None:
    for name, t in want.items():
        parts = [s[name] for s in shards]
        _, dim, stride = parts[0]
        if "word_embeddings" in name or "output_layer" in name:  # tp 2 pads 128 rows to 256
            t = torch.cat(
                [t, t.new_zeros(sum(p[0].shape[0] for p in parts) - t.shape[0], t.shape[1])]
            )
        for rank, (got, _, _) in enumerate(parts):
            assert torch.equal(got, shard_of(t, dim, stride, rank, 2)), (name, rank)


def test_megatron_core_layouts_we_do_not_read_are_refused_by_name(tmp_path):
    from megatron_lite.checkpointing.mcore_dist import MCORE_METADATA, McoreDistReader

    cfg = parse_args(_our_flags("gpt2")).to_dict()
    d = ckpt.iteration_dir(str(tmp_path), 1)
    os.makedirs(d)
    w = torch.zeros(4, 8)
    info = {"global_shape": [4, 8], "partition_dim": -1, "partition_stride": 1, "tp_rank": 0,
            "tp_size": 1}  # fmt: skip
    chunks = {}
    ckdist.add_chunks(chunks, "decoder.layers.mlp.experts.linear_fc1.weight", w, info)
    ckdist.write_dist(d, chunks, None, None, "", no_dist=True)
    with open(os.path.join(d, MCORE_METADATA), "w") as f:
        f.write('{"sharded_backend": "torch_dist"}')
    ckpt.write_latest(str(tmp_path), 1)
    with pytest.raises(ckpt.CheckpointError, match="experts.linear_fc1.weight: mixture-of-experts"):
        McoreDistReader(str(tmp_path), config=cfg)
    with pytest.raises(ckpt.CheckpointError, match="without args in common.pt"):
        McoreDistReader(str(tmp_path))


def _fill(path: str) -> None:
    """Write `path` until the file system is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def _save_on_a_full_disk(root):
    """Each format (and async torch_dist) saves iteration 1, then the disk fills and iteration 2 is
    saved: every rank must raise the one CheckpointError, none may hang."""
    import torch.distributed as dist

    from megatron_lite.checkpointing.async_save import finalize_async_save

    out = {}
    for fmt, async_save in (("torch", False), ("torch_dist", False), ("torch_dist", True)):
        cfg, ps, chunks, opt, sched = _setup(2, 1)
        cfg.checkpoint.ckpt_format, cfg.checkpoint.async_save = fmt, async_save
        save_dir = os.path.join(root, f"{fmt}_{async_save}")
        ckpt.save_checkpoint(save_dir, 1, chunks, opt, sched, cfg, ps, 8)
        finalize_async_save()
        dist.barrier()
        if ps.rank == 0:
            _fill(os.path.join(root, "filler"))
        dist.barrier()
        try:
            ckpt.save_checkpoint(save_dir, 2, chunks, opt, sched, cfg, ps, 16)
            finalize_async_save()
            out[(fmt, async_save)] = None
        except ckpt.CheckpointError as e:
            out[(fmt, async_save)] = str(e)
        dist.barrier()
        if ps.rank == 0:
            os.remove(os.path.join(root, "filler"))
        dist.barrier()
    return out


def _load_first(save_dir, fmt):
    cfg, ps, chunks, opt, sched = _setup(2, 1, seed=99)
    cfg.checkpoint.ckpt_format = fmt
    out = ckpt.load_checkpoint(save_dir, chunks, opt, sched, cfg, ps)
    return out["iteration"], out["consumed_samples"]


def test_a_full_disk_stops_the_save_on_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    """On a 3 MiB tmpfs (mounted here: root only) whose space runs out between two saves: the second
    save says the disk is full on every rank, its partial directory is gone, the latest file still
    names the first checkpoint and the first checkpoint's files are byte-identical."""
    import hashlib
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"needs root to mount a small tmpfs: {mounted.stderr.strip()}")
    try:
        results = run_distributed(_save_on_a_full_disk, 2, str(mnt), timeout=120)
        for key in results[0]:
            messages = [r[key] for r in results]
            assert all(m is not None for m in messages), (key, messages)
            assert any("the disk is full" in m for m in messages), (key, messages)
            for m in messages:
                assert "iter_0000002.tmp was removed" in m and "still names the previous" in m, m
            save_dir = mnt / f"{key[0]}_{key[1]}"
            assert ckpt.read_latest_iteration(str(save_dir)) == 1
            assert sorted(os.listdir(save_dir)) == ["iter_0000001", ckpt.LATEST_FILE]
        # the first checkpoint is whole: it loads
        digests = {
            p: hashlib.sha256(p.read_bytes()).hexdigest() for p in mnt.rglob("*") if p.is_file()
        }
        for key in results[0]:
            loaded = run_distributed(_load_first, 2, str(mnt / f"{key[0]}_{key[1]}"), key[0])
            assert loaded == [(1, 8)] * 2, key
        assert digests == {
            p: hashlib.sha256(p.read_bytes()).hexdigest() for p in mnt.rglob("*") if p.is_file()
        }
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
