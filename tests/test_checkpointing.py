"""Checkpoints: Megatron's layout, atomic saves, safe loads, and any tp x pp x dp into any other.

These tests use a toy tp-sharded model whose parameters carry the real tags (see docs/internals.md)
and whose full values depend only on (seed, name), so every layout knows what it should hold.
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
from factory import make_config
from torch import nn

from megatron_lite import checkpointing as ckpt
from megatron_lite.checkpointing import CheckpointError
from megatron_lite.config import Config
from megatron_lite.distributed.testing import run_distributed
from megatron_lite.parallel_state import ParallelState

VOCAB = 100  # true vocabulary; padded to 104 (tp1), 112 (tp2), 128 (tp4) with divisible-by 8


def make_cfg(tp=1, pp=1, vl=None, hidden=16, layers=4, **ck) -> Config:
    return make_config(
        num_layers=layers, hidden_size=hidden, num_attention_heads=4, make_vocab_size_divisible_by=8,
        tp=tp, pp=pp, vl=vl, vocab_size=VOCAB, global_batch_size=8, **ck,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# A toy model and optimizer that satisfy the contracts


def full_value(seed: int, name: str, shape, vocab_rows: bool = False) -> torch.Tensor:
    """The full tensor `name` for `seed`; vocabulary rows past VOCAB are zero padding."""
    if name == "output_layer.weight" and TIED[0]:
        name = "embedding.word_embeddings.weight"  # tied: the output weight is the embedding
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if not vocab_rows:
        return torch.randn(shape, generator=g)
    out = torch.zeros(shape)
    out[:VOCAB] = torch.randn([VOCAB, *shape[1:]], generator=g)
    return out


TIED = [True]


def megatron_shard(full, dim, stride, rank, size):
    """Megatron's split: tp x stride pieces along dim, rank takes pieces rank, rank + tp, ..."""
    if dim < 0:
        return full
    pieces = torch.split(full, full.shape[dim] // (size * stride), dim)
    return torch.cat(pieces[rank::size], dim)


class Holder(nn.Module):
    pass


def tagged(seed, name, shape, ps, dim=-1, stride=1, vocab=False, shared=False) -> nn.Parameter:
    full = full_value(seed, name, shape, vocab)
    p = nn.Parameter(megatron_shard(full, dim, stride, ps.tp_rank, ps.tp_size).clone())
    p.tensor_model_parallel, p.partition_dim, p.partition_stride = dim >= 0, dim, stride
    p.sequence_parallel, p.shared_embedding = False, shared
    return p


def toy_chunks(cfg: Config, ps: ParallelState, seed: int) -> list[nn.Module]:
    """Chunk c of stage r holds global layers [(c * pp + r) * L, ...), as the real GPT."""
    m, h = cfg.model, cfg.model.hidden_size
    vpp = cfg.virtual_pipeline_size or 1
    per = m.num_layers // (ps.pp_size * vpp)
    padded = cfg.padded_vocab_size(VOCAB)
    TIED[0] = m.tie_embeddings
    chunks = []
    for c in range(vpp):
        model = Holder()
        first, last = c == 0 and ps.is_first_stage, c == vpp - 1 and ps.is_last_stage
        if first:
            model.embedding = Holder()
            w = tagged(seed, "embedding.word_embeddings.weight", [padded, h], ps, 0, vocab=True)
            w.shared_embedding = m.tie_embeddings and ps.pp_size > 1
            model.embedding.word_embeddings = w
        model.decoder = Holder()
        model.decoder.layers = nn.ModuleDict()
        start = (c * ps.pp_size + ps.pp_rank) * per
        for i in range(start, start + per):
            layer, pre = Holder(), f"decoder.layers.{i}."
            layer.qkv_weight = tagged(seed, pre + "qkv_weight", [3 * h, h], ps, 0, stride=3)
            layer.proj_weight = tagged(seed, pre + "proj_weight", [h, h], ps, 1)
            layer.proj_bias = tagged(seed, pre + "proj_bias", [h], ps)
            model.decoder.layers[str(i)] = layer
        if last:
            model.final_layernorm = tagged(seed, "final_layernorm", [h], ps)
            if not m.tie_embeddings or ps.pp_size > 1:
                shared = m.tie_embeddings
                model.output_layer = Holder()
                model.output_layer.weight = tagged(
                    seed, "output_layer.weight", [padded, h], ps, 0, vocab=True, shared=shared
                )
        chunks.append(model)
    return chunks


class ToyOptimizer:
    """Adam-like state (exp_avg, exp_avg_sq, master) shaped like each local parameter."""

    def __init__(self, chunks, ps, seed):
        self.state = {}
        for name, p in ckpt.chunk_params(chunks).items():
            vocab = "word_embeddings" in name or "output_layer" in name
            self.state[name] = {
                k: megatron_shard(
                    full_value(seed + i + 1, name, _global_shape(p, ps), vocab),
                    p.partition_dim,
                    p.partition_stride,
                    ps.tp_rank,
                    ps.tp_size,
                )
                for i, k in enumerate(("exp_avg", "exp_avg_sq"))
            }
            self.state[name]["master"] = p.detach().clone()  # fp32 master = the weight
        self.scalars = {"step": seed, "loss_scale": 2.0**seed}

    def per_param_state_dict(self):
        return self.state

    def state_dict(self):
        return dict(self.scalars)

    def load_per_param_state_dict(self, d):
        assert set(d) == set(self.state), (sorted(d), sorted(self.state))
        self.state = d

    def load_state_dict(self, d):
        self.scalars = dict(d)


class ToyScheduler:
    def __init__(self, step):
        self.num_steps = step

    def state_dict(self):
        return {"num_steps": self.num_steps, "max_lr": 1e-3}

    def load_state_dict(self, d):
        self.num_steps = d["num_steps"]


def _global_shape(p, ps):
    shape = list(p.shape)
    if p.partition_dim >= 0:
        shape[p.partition_dim] *= ps.tp_size
    return shape


def assert_holds(chunks, optimizer, ps, seed):
    """Every local parameter and optimizer state is the shard of `seed`'s full tensor."""
    fresh_chunks = toy_chunks(_cfg_of(chunks), ps, seed)
    want = ckpt.chunk_params(fresh_chunks)
    got = ckpt.chunk_params(chunks)
    assert sorted(want) == sorted(got)
    for name, p in got.items():
        assert torch.equal(p.data, want[name].data), name
    if optimizer is not None:
        expected = ToyOptimizer(fresh_chunks, ps, seed)
        assert optimizer.scalars == expected.scalars
        for name, states in expected.state.items():
            for k, v in states.items():
                assert torch.equal(optimizer.state[name][k], v), (name, k)


_CFGS = {}


def _cfg_of(chunks):
    return _CFGS[id(chunks)]


def build(cfg, ps, seed):
    chunks = toy_chunks(cfg, ps, seed)
    _CFGS[id(chunks)] = cfg
    return chunks, ToyOptimizer(chunks, ps, seed), ToyScheduler(seed)


# ---------------------------------------------------------------------------------------------------
# Functions run on every rank


def _state(tp, pp, vl=None):
    cfg = make_cfg(tp, pp, vl).finalize(dist.get_world_size())
    return cfg, ParallelState.build(tp, pp, vpp_size=cfg.virtual_pipeline_size)


def _save(root, tp, pp, vl=None, seed=1, iteration=100):
    cfg, ps = _state(tp, pp, vl)
    chunks, opt, sched = build(cfg, ps, seed)
    ckpt.save_checkpoint(root, iteration, chunks, opt, sched, cfg, ps, consumed_samples=6400)


def _load_and_check(root, tp, pp, vl=None, seed=1):
    cfg, ps = _state(tp, pp, vl)
    chunks, opt, sched = build(cfg, ps, seed + 10)  # different values until loaded
    out = ckpt.load_checkpoint(root, chunks, opt, sched, cfg, ps)
    assert_holds(chunks, opt, ps, seed)
    assert (out["iteration"], out["consumed_samples"], sched.num_steps) == (100, 6400, seed)
    return out["rng_restored"]


def _load_single(root, seed=1, **kw):
    cfg = make_cfg()
    ps = ParallelState.single()
    chunks, opt, sched = build(cfg, ps, seed + 10)
    return (
        cfg,
        ps,
        chunks,
        opt,
        sched,
        ckpt.load_checkpoint(root, chunks, opt, sched, cfg, ps, **kw),
    )


# ---------------------------------------------------------------------------------------------------
# Resharding


@pytest.mark.parametrize("tp,stride", [(1, 1), (2, 1), (2, 3), (4, 3), (3, 2)])
def test_assemble_inverts_megatron_strided_split(tp, stride):
    full = torch.arange(2 * 4 * tp * stride * 3, dtype=torch.float32).view(-1, 3)
    shards = [megatron_shard(full, 0, stride, r, tp) for r in range(tp)]
    for r in range(tp):
        assert torch.equal(ckpt.slice_shard(full, 0, stride, r, tp), shards[r])
    assert torch.equal(ckpt.assemble_full_tensor(shards, 0, stride), full)


def test_tp2_pp2_checkpoint_loads_into_tp1_pp1_and_tp4(tmp_path):
    run_distributed(_save, 4, str(tmp_path), 2, 2, timeout=60)
    names = sorted(os.listdir(tmp_path / "iter_0000100"))
    assert names == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "100"
    cfg, ps, chunks, opt, sched, out = _load_single(str(tmp_path))
    assert_holds(chunks, opt, ps, seed=1)
    assert out["loaded"] and out["iteration"] == 100 and not out["rng_restored"]
    run_distributed(_load_and_check, 4, str(tmp_path), 4, 1, timeout=60)


def test_interleaved_tp1_pp2_dp2_loads_into_tp2_pp2(tmp_path):
    run_distributed(_save, 4, str(tmp_path), 1, 2, 1, timeout=60)  # vpp = 2 chunks per stage
    run_distributed(_load_and_check, 4, str(tmp_path), 2, 2, timeout=60)


def test_layout_round_trip_is_bitwise(tmp_path):
    a, b, c = (str(tmp_path / x) for x in "abc")
    run_distributed(_save, 4, a, 2, 2, timeout=60)
    run_distributed(_round_trip, 4, a, b, timeout=60)  # tp2 pp2 -> tp4 -> save
    cfg, ps, chunks, opt, sched, _ = _load_single(b)  # tp4 -> tp1
    ckpt.save_checkpoint(c, 100, chunks, opt, sched, cfg, ps, 6400)
    full_a, full_c = ckpt.load_full_state(a), ckpt.load_full_state(c)
    full_a.pop("output_layer.weight")  # tied at pp 2: a copy of the embedding
    assert sorted(full_a) == sorted(full_c)
    for name, t in full_a.items():
        if "word_embeddings" in name:  # tp2 pads 100 rows to 112, tp1 to 104
            assert t.shape[0] == 112 and full_c[name].shape[0] == 104
            t, full_c[name] = t[:VOCAB], full_c[name][:VOCAB]
        assert torch.equal(t, full_c[name]), name


def _round_trip(src, dst):
    cfg, ps = _state(4, 1)
    chunks, opt, sched = build(cfg, ps, 5)
    ckpt.load_checkpoint(src, chunks, opt, sched, cfg, ps)
    ckpt.save_checkpoint(dst, 100, chunks, opt, sched, cfg, ps, 6400)


def test_reader_opens_only_the_files_that_hold_a_tensor(tmp_path):
    run_distributed(_save, 4, str(tmp_path), 2, 2, timeout=60)
    reader = ckpt.CheckpointReader(str(tmp_path))
    reader.full_tensor("decoder.layers.3.proj_weight")  # stage 1 of 2 (layers 2, 3)
    assert sorted(reader._files) == [(0, 0), (0, 1), (1, 1)]  # (0, 0): layout and config
    reader.full_tensor("decoder.layers.0.proj_bias")  # replicated over tp: one file suffices
    assert sorted(reader._files) == [(0, 0), (0, 1), (1, 1)]


def test_streaming_reader_gives_full_tensors_and_optimizer_states(tmp_path):
    run_distributed(_save, 2, str(tmp_path), 2, 1, timeout=60)
    states = dict(ckpt.iter_full_state(str(tmp_path), optimizer=True))
    name = "decoder.layers.3.qkv_weight"
    assert torch.equal(states[name]["exp_avg"], full_value(2, name, [48, 16]))
    assert set(states[name]) == {"exp_avg", "exp_avg_sq", "master"}


# ---------------------------------------------------------------------------------------------------
# RNG, options


def _rng_round_trip(root):
    cfg, ps = _state(2, 1)  # tp 2 x dp 2: every rank seeds differently
    random.seed(dist.get_rank())
    np.random.seed(dist.get_rank() + 7)
    torch.manual_seed(dist.get_rank() + 11)
    chunks, opt, sched = build(cfg, ps, 1)
    ckpt.save_checkpoint(root, 3, chunks, opt, sched, cfg, ps, 0)
    before = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert ckpt.load_checkpoint(root, chunks, opt, sched, cfg, ps)["rng_restored"]
    after = (random.random(), np.random.rand(), torch.rand(2))
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])
    return before[0]


def test_every_ranks_rng_state_is_restored_exactly(tmp_path):
    draws = run_distributed(_rng_round_trip, 4, str(tmp_path), timeout=60)
    assert len(set(draws)) == 4  # each rank got its own state back, not rank 0's


def test_finetune_loads_weights_only_from_iteration_zero(tmp_path):
    run_distributed(_save, 2, str(tmp_path), 2, 1, timeout=60)
    *_, chunks, opt, sched, out = _load_single(str(tmp_path), finetune=True)
    assert (out["iteration"], out["consumed_samples"], out["optimizer_loaded"]) == (0, 0, False)
    assert opt.scalars["step"] == 11 and sched.num_steps == 11  # untouched
    fresh = ckpt.chunk_params(toy_chunks(make_cfg(), ParallelState.single(), 1))
    for name, p in ckpt.chunk_params(chunks).items():
        assert torch.equal(p.data, fresh[name].data)


def test_no_load_optim_keeps_optimizer_and_scheduler(tmp_path):
    run_distributed(_save, 2, str(tmp_path), 2, 1, timeout=60)
    *_, opt, sched, out = _load_single(str(tmp_path), load_optim=False)
    assert out["iteration"] == 100 and not out["optimizer_loaded"]
    assert opt.scalars["step"] == 11 and sched.num_steps == 11


def test_no_save_optim_checkpoint_needs_no_load_optim(tmp_path):
    cfg, ps = make_cfg(no_save_optim=True), ParallelState.single()
    chunks, opt, sched = build(cfg, ps, 1)
    ckpt.save_checkpoint(str(tmp_path), 5, chunks, opt, sched, cfg, ps, 0)
    with pytest.raises(CheckpointError, match="without optimizer state.*--no-load-optim"):
        _load_single(str(tmp_path))
    assert _load_single(str(tmp_path), load_optim=False)[-1]["iteration"] == 5


# ---------------------------------------------------------------------------------------------------
# Errors


def _save_single(root, cfg=None, iteration=100, seed=1, extra=None):
    cfg, ps = cfg or make_cfg(), ParallelState.single()
    chunks, opt, sched = build(cfg, ps, seed)
    ckpt.save_checkpoint(root, iteration, chunks, opt, sched, cfg, ps, 64, extra)


def test_different_model_shape_names_the_setting(tmp_path):
    _save_single(str(tmp_path), make_cfg(hidden=32, layers=2))
    with pytest.raises(CheckpointError) as e:
        _load_single(str(tmp_path))
    msg = str(e.value)
    assert "--hidden-size: checkpoint 32, this run 16" in msg
    assert "--num-layers: checkpoint 2, this run 4" in msg
    assert "--ffn-hidden-size: checkpoint 128, this run 64" in msg


class NotPlain:
    pass


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    """Our files load with weights_only=True and exactly argparse.Namespace allowed (their `args`,
    for Megatron-LM); a custom class, a function, a Namespace holding an object or sitting
    anywhere but `args` is refused."""
    _save_single(str(tmp_path))
    path = tmp_path / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        clean = torch.load(path, weights_only=True)
    assert isinstance(clean["args"], argparse.Namespace)
    bad_args = argparse.Namespace(**vars(clean["args"]), hook=torch.zeros(1))
    for change, match in [
        ({"extra": {"payload": NotPlain()}}, r"refusing to load .*pickled"),  # a custom class
        ({"extra": {"payload": os.system}}, r"refusing to load .*pickled"),  # a function
        ({"args": bad_args}, r"refusing to load .*args\.hook is a torch\.Tensor"),
        ({"extra": {"ns": argparse.Namespace(a=1)}}, r"refusing to load .*a Namespace at"),
    ]:
        torch.save({**clean, **change}, path)
        with pytest.raises(CheckpointError, match=match):
            _load_single(str(tmp_path))


def test_saving_a_non_plain_object_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"extra\['bad'\] is a .*NotPlain"):
        _save_single(str(tmp_path), extra={"bad": NotPlain()})


def test_missing_iteration_dir_and_files_are_named(tmp_path):
    root = str(tmp_path)
    assert ckpt.read_latest_iteration(root) is None
    assert _load_single(root)[-1] == {"iteration": 0, "consumed_samples": 0, "loaded": False}
    with pytest.raises(CheckpointError, match="does not exist"):
        _load_single(str(tmp_path / "nowhere"))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(CheckpointError, match=r"iter_0000007 \(iteration 7\) does not exist"):
        _load_single(root)
    run_distributed(_save, 2, root, 2, 1, timeout=60)
    os.remove(tmp_path / "iter_0000100" / "mp_rank_01" / "model_optim_rng.pt")
    with pytest.raises(CheckpointError, match=r"file .*iter_0000100/mp_rank_01/model_optim_rng.pt"):
        _load_single(root)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("junk")
    with pytest.raises(CheckpointError, match="should hold an iteration number"):
        ckpt.read_latest_iteration(root)


def test_latest_file_follows_each_save_and_resaving_replaces(tmp_path):
    root = str(tmp_path)
    _save_single(root, iteration=10, seed=1)
    _save_single(root, iteration=20, seed=2)
    assert ckpt.read_latest_iteration(root) == 20
    _save_single(root, iteration=20, seed=3)  # the same iteration again
    assert sorted(os.listdir(root)) == ["iter_0000010", "iter_0000020", ckpt.LATEST_FILE]
    *_, chunks, opt, _, _ = _load_single(root, seed=3)
    _CFGS[id(chunks)] = make_cfg()
    assert_holds(chunks, opt, ParallelState.single(), seed=3)


# ---------------------------------------------------------------------------------------------------
# Atomicity under kill -9

_SAVER = """
import os, sys
sys.path.insert(0, {tests!r})
from test_checkpointing import _save_single, make_cfg, VOCAB
cfg = make_cfg(hidden={hidden})
_save_single({root!r}, cfg, iteration=1, seed=1)
print("FIRST", flush=True)
os.environ.update({env!r})
for it in range(2, 100):
    _save_single({root!r}, cfg, iteration=it, seed=it)
"""


def _saver(root, hidden=16, env=None):
    script = _SAVER.format(tests=os.path.dirname(__file__), root=root, hidden=hidden, env=env or {})
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_rename", "before_latest"])
def test_kill_9_mid_save_leaves_previous_checkpoint_loadable(tmp_path, point):
    proc = _saver(str(tmp_path), env={ckpt.PAUSE_ENV: point})
    deadline = time.monotonic() + 60
    while not (tmp_path / ".paused").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "saver did not pause"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.read_latest_iteration(str(tmp_path)) == 1
    *_, chunks, opt, _, out = _load_single(str(tmp_path), seed=1)
    _CFGS[id(chunks)] = make_cfg()
    assert out["iteration"] == 1
    assert_holds(chunks, opt, ParallelState.single(), seed=1)
    _save_single(str(tmp_path), iteration=2, seed=2)  # a later save cleans up and succeeds
    assert ckpt.read_latest_iteration(str(tmp_path)) == 2


@pytest.mark.slow
def test_kill_9_at_random_moments_never_breaks_the_latest_checkpoint(tmp_path):
    rng = random.Random(0)
    for trial in range(3):
        root = tmp_path / str(trial)
        proc = _saver(str(root), hidden=512)  # ~13 MB per save: kills land inside writes
        assert proc.stdout.readline().strip() == "FIRST"
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        latest = ckpt.read_latest_iteration(str(root))
        state = ckpt.load_full_state(str(root))
        name = "decoder.layers.0.qkv_weight"
        assert torch.equal(state[name], full_value(latest, name, [3 * 512, 512]))
