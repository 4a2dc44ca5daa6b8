"""Faults of a real launch (torchrun, 2 CPU ranks, pp = 2): what the user sees and what is left.

- an error found after flag parsing is one `error:` line from one rank, not a traceback per rank;
- a checkpoint file that only one stage reads, when corrupt, is named by that rank alone;
- kill -9 of the torchrun agent: the ranks notice and are gone within seconds;
- SIGTERM to a plain torchrun agent (no SLURM): with --exit-signal-handler the ranks save and exit
  0, while the agent itself exits 1 (what the README's cluster section says AUTO_REQUEUE then does).
"""

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launch_util import (
    ROOT,
    TINY_GPT,
    TORCHRUN,
    kill_job,
    launch,
    layout_flags,
    run_pretrain,
    wait_for,
    workers,
)

from megatron_lite.checkpointing import read_latest_iteration
from megatron_lite.parallel_state import free_port

PP2 = [*TINY_GPT, *layout_flags(1, 2)]


def _alive(pid: int) -> bool:
    """Running (a zombie that no one reaps yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _snapshot(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def _rank_lines(text: str) -> list[str]:
    """Lines the ranks printed through torchrun's per-rank traceback prefix."""
    return [ln for ln in text.splitlines() if ln.startswith(("[rank0]", "[rank1]"))]


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """SIGTERM to the agent of a plain torchrun job with --exit-signal-handler."""
    save = tmp_path_factory.mktemp("sigterm") / "ckpt"
    flags = [*PP2, "--train-iters", "100000", "--save", str(save), "--exit-signal-handler"]
    proc, lines = launch(2, flags)
    try:
        wait_for(lines, " iteration        2/", proc)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    proc.reader.join(timeout=30)  # the whole output, to the last rank's line
    return rc, "".join(lines), save


@pytest.mark.slow
def test_sigterm_to_a_plain_torchrun_agent_ranks_save_agent_exits_1(sigterm_run):
    rc, text, save = sigterm_run
    saved = read_latest_iteration(str(save))
    assert rc == 1, text[-3000:]  # torch 2.13: the agent re-raises the signal as a failure
    assert "Received 15 death signal, shutting down workers" in text
    assert saved is not None and f"saved checkpoint at iteration {saved:7d}" in text
    assert f"exiting at iteration {saved} (signal)" in text


def test_a_config_error_after_parsing_is_one_line_from_one_rank():
    out = run_pretrain(2, [*TINY_GPT, "--train-iters", "2", *layout_flags(4, 1)], check=False)
    errors = [ln for ln in out.stdout.splitlines() if ln.startswith("error: ")]
    assert out.returncode != 0
    assert errors == [
        "error: world size (2) must be divisible by --tensor-model-parallel-size (4) x "
        "--pipeline-model-parallel-size (1) = 4"
    ], out.stdout[-3000:]
    assert not _rank_lines(out.stdout) and "ConfigError" not in out.stdout


@pytest.mark.slow
def test_a_corrupt_stage_file_is_named_once_and_left_as_it_was(sigterm_run, tmp_path):
    _, _, save = sigterm_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(save, ckpt)
    it = read_latest_iteration(str(ckpt))
    bad = ckpt / f"iter_{it:07d}" / "mp_rank_00_001" / "model_optim_rng.pt"
    bad.write_bytes(bad.read_bytes()[:5000])  # the second stage's file: only rank 1 reads it
    before = _snapshot(tmp_path)
    flags = [*PP2, "--train-iters", "100000", "--load", str(ckpt), "--exit-interval", "1"]
    out = run_pretrain(2, flags, check=False)
    errors = [ln for ln in out.stdout.splitlines() if ln.startswith("error: ")]
    assert out.returncode != 0
    assert len(errors) == 1 and f"checkpoint file {bad} is corrupt or truncated" in errors[0]
    assert not _rank_lines(out.stdout) and " iteration " not in out.stdout
    assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_ranks_stop_within_seconds_when_the_agent_is_killed(tmp_path):
    proc, lines = launch(2, [*PP2, "--train-iters", "100000"])
    ranks = []
    try:
        wait_for(lines, " iteration        2/", proc)
        ranks = workers(proc)
        assert len(ranks) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()
        while any(_alive(p) for p in ranks) and time.monotonic() - killed < 10:
            time.sleep(0.05)
        took = time.monotonic() - killed
        assert not any(_alive(p) for p in ranks), f"ranks still running {took:.1f} s after"
        proc.reader.join(timeout=30)
        text = "".join(lines)
        assert text.count("the launching agent (pid") == 2, text[-2000:]
    finally:
        for p in ranks:  # never leave a rank behind, whatever happened above
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            kill_job(proc)


@pytest.mark.slow
def test_a_bad_eval_task_is_one_line_from_one_rank():
    flags = [*TINY_GPT, "--train-iters", "2", *layout_flags(1, 2)]
    out = run_pretrain(2, [*flags, "--eval-tasks", "choice=/nonexistent.jsonl"], check=False)
    errors = [ln for ln in out.stdout.splitlines() if ln.startswith("error: ")]
    assert out.returncode != 0
    assert errors == ["error: task 'choice': /nonexistent.jsonl does not exist"], out.stdout[-3000:]
    assert " iteration " not in out.stdout


@pytest.mark.slow
def test_a_user_error_reaches_the_terminal_when_both_ranks_race_on_a_loaded_machine():
    """Both ranks raise the same user error at once and stderr is slow (RACE_PRINT_DELAY_S): the rank
    that does not print waits for the printer, so torchrun never stops the job before the line is out.
    Eight jobs at once (the load), half before the process group exists and half after."""
    jobs = []
    for k in range(8):
        cmd = [TORCHRUN, "--nproc_per_node=2", "--master_addr=127.0.0.1"]
        cmd += [f"--master_port={free_port()}", str(ROOT / "tests" / "race_user_error.py")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RACE_PRINT_DELAY_S": "1"}
        env["RACE_BEFORE_GROUP"] = str(k % 2)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        jobs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    for k, job in enumerate(jobs):
        out = job.communicate(timeout=120)[0]
        lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
        assert job.returncode != 0, out
        assert lines == ["error: --window-size 16,0: a racing user error"], (k, out[-3000:])
