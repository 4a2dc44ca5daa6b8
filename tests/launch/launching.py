"""Helpers of the launch tests: clean environments, launches under a timeout, the local SLURM cluster."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_util import ROOT, losses

from megatron_lite.parallel_state import free_port

LAUNCH_TIMEOUT = 150  # a wrong address hangs ~100 s before failing
SLURM_CI = ROOT / "tests" / "launch" / "slurm_ci.sh"
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the tests may run inside a SLURM job),
    with this venv's bin first on PATH (the examples call `torchrun`)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "SBATCH_"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_group(launches: list[tuple[list[str], dict]], tmp: Path, timeout=LAUNCH_TIMEOUT):
    """Start every (cmd, env) at once, wait for all; [(returncode, output)]. On timeout, kill
    each started process group (by PID) and fail with the outputs."""
    procs, logs = [], []
    for i, (cmd, env) in enumerate(launches):
        log = tmp / f"launch-{i}.log"
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        text = "\n".join(f"--- launch {i}\n{log.read_text()[-3000:]}" for i, log in enumerate(logs))
        raise AssertionError(f"launch did not finish in {timeout} s:\n{text}") from None
    return [(p.returncode, log.read_text()) for p, log in zip(procs, logs)]


def assert_same_losses(output: str, reference: dict[int, float], iterations=None) -> None:
    """The log's per-iteration losses are `reference`'s (those of `iterations`, default all)
    within 1e-5 relative, and the log has no others."""
    got = losses(output)
    want = sorted(reference) if iterations is None else list(iterations)
    assert sorted(got) == want, output[-4000:]
    for it in want:
        assert got[it] == pytest.approx(reference[it], rel=1e-5), (it, got[it], reference[it])


def remove_tagged_hosts_lines(tag: str) -> None:
    """Drop the /etc/hosts lines ending in `tag`, rewriting in place (it may be a bind mount); other
    lines, a concurrent test session's included, stay."""
    hosts = Path("/etc/hosts")
    lines = hosts.read_text().splitlines(True)
    kept = [ln for ln in lines if not ln.rstrip("\n").endswith(tag)]
    if kept != lines:
        hosts.write_text("".join(kept))


def slurm_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (munged, slurmd, /etc/hosts)"
    if not shutil.which("slurmctld") or not shutil.which("sbatch"):
        return "slurmctld/sbatch not installed (apt-get install -y slurm-wlm munge; .ci/run does)"
    return None


class Cluster:
    """tests/launch/slurm_ci.sh's two-node cluster, with this session's own directory and ports."""

    def __init__(self, base: Path):
        self.base = base
        ports = " ".join(str(free_port()) for _ in range(3))  # controller, node1, node2
        self.env = clean_env(
            SLURM_CI_DIR=str(base), SLURM_CI_PORTS=ports, SLURM_CONF=str(base / "slurm.conf")
        )
        # slurm_ci.sh's /etc/hosts tag: the first 10 hex digits of md5(SLURM_CI_DIR)
        self.hosts_tag = (
            "# megatron_lite-slurm-ci " + hashlib.md5(str(base).encode()).hexdigest()[:10]
        )

    def script(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SLURM_CI), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def client(self, *args: str) -> str:
        """A SLURM client command (scontrol, scancel, squeue) against this cluster; its stdout."""
        out = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{args}: {out.stderr}"
        return out.stdout

    @staticmethod
    def sbatch_command(script: Path, out: Path, *flags: str, parsable: bool = False) -> list[str]:
        """`sbatch --wait` of `script` from the repository root, its output to `out`."""
        parsable_flag = ["--parsable"] if parsable else []
        return ["sbatch", "--wait", *parsable_flag, f"--chdir={ROOT}", f"--output={out}"] + [
            str(script),
            *flags,
        ]

    def job_env(self, **extra: str) -> dict[str, str]:
        """sbatch passes this environment on to the job (--export=ALL); a free rendezvous port (the
        examples' default is derived from the job id, which restarts at 1 in each cluster)."""
        return {**self.env, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()), **extra}
