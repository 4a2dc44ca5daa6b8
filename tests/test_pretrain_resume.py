"""The real entry point on real indexed data: exact resume, reshard on load, TensorBoard, faults.

Each test launches `python -m megatron_lite.pretrain_gpt` under torchrun (gloo, CPU).
"""

import os
import signal
import sys
import time

import pytest
from launch_util import (
    TINY_GPT,
    build_corpus,
    eval_losses,
    layout_flags,
    losses,
    run_pretrain,
)
from launch_util import kill_job as _kill_job
from launch_util import launch as _launch
from launch_util import wait_for as _wait_for
from launch_util import workers as _workers

from megatron_lite.checkpointing import read_latest_iteration

PY = sys.executable


@pytest.fixture(scope="module")
def indexed_data(tmp_path_factory):
    """A small real corpus -> BPE tokenizer -> Megatron .bin/.idx, with the repository's tools."""
    files = build_corpus(tmp_path_factory.mktemp("data"), "GPT2BPETokenizer")
    flags = [a for a in TINY_GPT if a not in ("--mock-data",)]
    i = flags.index("--tokenizer-type")
    del flags[i : i + 4]  # drop the NullTokenizer and its vocab size
    return flags + [
        "--data-path",
        str(files["data_path"]),
        "--split",
        "90,8,2",
        "--data-cache-path",
        str(files["data_path"].parent / "cache"),
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        str(files["vocab_file"]),
        "--merge-file",
        str(files["merge_file"]),
    ]


@pytest.fixture(scope="module")
def reference(indexed_data):
    """8 uninterrupted iterations at tp=1 pp=2: the raw log lines' loss strings."""
    out = run_pretrain(2, [*indexed_data, "--train-iters", "8", *layout_flags(1, 2)])
    ref = losses(out.stdout)
    assert sorted(ref) == list(range(1, 9))
    return ref


@pytest.mark.slow
def test_resume_gives_bitwise_identical_losses(indexed_data, reference, tmp_path):
    flags = [*indexed_data, "--train-iters", "8", *layout_flags(1, 2), "--save", str(tmp_path)]
    first = run_pretrain(2, [*flags, "--exit-interval", "4"])
    assert "exiting at iteration 4 (exit-interval)" in first.stdout
    assert read_latest_iteration(str(tmp_path)) == 4
    # --use-checkpoint-args: the model's shape comes from the checkpoint, not these wrong flags
    shape = ["--num-layers", "2", "--hidden-size", "32", "--use-checkpoint-args"]
    nosave = flags[:-2]
    third = run_pretrain(2, [*nosave, *shape, "--load", str(tmp_path), "--exit-interval", "5"])
    assert "--use-checkpoint-args: from" in third.stdout and "num_layers=4" in third.stdout
    assert losses(third.stdout) == {5: reference[5]}
    second = run_pretrain(2, [*flags, "--load", str(tmp_path)])
    assert "loaded checkpoint" in second.stdout
    resumed = losses(second.stdout)
    assert sorted(resumed) == [5, 6, 7, 8]
    for it in resumed:  # bitwise on CPU fp32: the printed values are identical, not just close
        assert resumed[it] == reference[it], (it, resumed[it], reference[it])


@pytest.mark.slow
def test_reshard_on_load_preserves_the_next_loss(indexed_data, reference, tmp_path):
    flags = [*indexed_data, "--train-iters", "8", "--save", str(tmp_path)]
    run_pretrain(4, [*flags, *layout_flags(2, 2), "--exit-interval", "4"])
    for tp, pp, nproc in ((1, 1, 1), (2, 1, 4)):  # 1x1x1 and tp2 x dp2
        out = run_pretrain(
            nproc,
            [*flags[:-2], *layout_flags(tp, pp), "--load", str(tmp_path), "--exit-interval", "5"],
        )
        got = losses(out.stdout)
        assert list(got) == [5]
        assert got[5] == pytest.approx(reference[5], rel=1e-5), (tp, pp, got[5], reference[5])


@pytest.mark.slow
def test_evaluation_and_tensorboard_scalars(indexed_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    flags = [
        *indexed_data,
        "--train-iters",
        "4",
        "--eval-interval",
        "2",
        "--eval-iters",
        "2",
        "--tensorboard-dir",
        str(tb),
    ]
    out = run_pretrain(1, flags)
    evals = eval_losses(out.stdout)
    assert [(s, i) for s, i, _ in evals] == [("validation", 2), ("validation", 4), ("test", 4)]
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "lm loss",
        "learning-rate",
        "grad-norm",
        "loss-scale",
        "batch-size",
        "throughput/tokens-per-sec",
        "lm loss validation",
        "lm loss validation ppl",
        "lm loss test",
    ):
        assert tag in tags, (tag, tags)
    assert [e.step for e in acc.Scalars("lm loss")] == [1, 2, 3, 4]
    assert acc.Scalars("lm loss validation")[-1].value == pytest.approx(evals[1][2], rel=1e-5)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(indexed_data, tmp_path):
    flags = [
        *indexed_data,
        "--train-iters",
        "10000",
        *layout_flags(1, 2),
        "--save",
        str(tmp_path),
        "--exit-signal-handler",
    ]
    proc, lines = _launch(2, flags)
    _wait_for(lines, " iteration        2/", proc)
    for pid in _workers(proc):  # SLURM signals every task of the step, as here
        os.kill(pid, signal.SIGTERM)
    rc = proc.wait(timeout=120)
    text = "".join(lines)
    assert rc == 0, text[-4000:]
    assert "(signal)" in text
    saved = read_latest_iteration(str(tmp_path))
    assert saved is not None and saved >= 2
    assert f"saved checkpoint at iteration {saved:7d}" in text


@pytest.mark.slow
def test_a_raising_rank_ends_the_job_nonzero_quickly(indexed_data):
    start = time.monotonic()
    out = run_pretrain(
        4,
        [*indexed_data, "--train-iters", "20", *layout_flags(2, 2)],
        env={"MEGATRON_LITE_FAULT": "raise:1:3"},
        check=False,
        timeout=180,
    )
    assert out.returncode != 0
    assert "injected fault on rank 1" in out.stdout
    assert time.monotonic() - start < 60  # far below --distributed-timeout-minutes 1 + start-up


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_nonzero(indexed_data):
    proc, lines = _launch(2, [*indexed_data, "--train-iters", "10000", *layout_flags(1, 2)])
    _wait_for(lines, " iteration        2/", proc)
    os.kill(max(_workers(proc)), signal.SIGKILL)
    start = time.monotonic()
    rc = proc.wait(timeout=150)
    assert rc != 0
    assert time.monotonic() - start < 120


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_checkpoint_loadable(indexed_data, tmp_path):
    flags = [*indexed_data, "--train-iters", "8", *layout_flags(1, 2), "--save", str(tmp_path)]
    run_pretrain(2, [*flags, "--exit-interval", "2"])
    assert read_latest_iteration(str(tmp_path)) == 2
    proc, lines = _launch(
        2,
        [*flags, "--load", str(tmp_path), "--exit-interval", "4"],
        env={"MEGATRON_LITE_CKPT_TEST_PAUSE": "before_rename"},
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / ".paused").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "".join(lines)[-4000:]
        time.sleep(0.2)
    assert (tmp_path / ".paused").exists()
    _kill_job(proc)  # mid-save
    proc.wait(timeout=30)
    assert read_latest_iteration(str(tmp_path)) == 2
    out = run_pretrain(2, [*flags, "--load", str(tmp_path), "--exit-interval", "3"])
    assert "loaded checkpoint" in out.stdout and list(losses(out.stdout)) == [3]
    assert read_latest_iteration(str(tmp_path)) == 3
    assert not list(tmp_path.glob("iter_*.tmp"))  # the killed save's leftovers are gone


@pytest.mark.slow
def test_nan_loss_is_counted_and_stops_with_check_for_nan(indexed_data):
    flags = [*indexed_data, "--train-iters", "4", "--clip-grad", "0"]
    out = run_pretrain(1, flags, env={"MEGATRON_LITE_FAULT": "nan:2"})
    assert "number of nan iterations:   1 |" in out.stdout
    out = run_pretrain(
        1, [*flags, "--check-for-nan-in-loss"], env={"MEGATRON_LITE_FAULT": "nan:2"}, check=False
    )
    assert out.returncode != 0
    assert "lm loss is nan/inf at iteration 2" in out.stdout


def test_exit_on_missing_checkpoint_stops_instead_of_training_from_scratch(tmp_path):
    missing = str(tmp_path)  # exists, holds no checkpoint (a directory that does not exist is
    flags = [*TINY_GPT, "--train-iters", "2", "--load", missing]  # always an error)
    out = run_pretrain(1, [*flags, "--exit-on-missing-checkpoint"], check=False, timeout=120)
    assert out.returncode != 0
    assert f"--load {missing}: no checkpoint there" in out.stdout
    assert " iteration        1/" not in out.stdout
