"""Multi-node launches of the real entry point on one machine.

* two torchrun agents on loopback (static and c10d rendezvous), 2 ranks each, tp=2 x pp=2;
* `srun`-style: four plain processes with only SLURM's variables (no torchrun);
* two "hosts" in two network namespaces (veth 10.200.0.1/.2, host names n1/n2), torchrun on each;
* a real two-node SLURM cluster on localhost (tests/launch/slurm_ci.sh) running
  examples/pretrain_gpt_slurm_cpu.sbatch with `sbatch --wait`: success (srun and srun+torchrun), a
  failing rank failing the job, and SIGTERM (what SLURM sends before the time limit) saving a
  checkpoint and ending the job 0 through the torchrun agents.

Each launch must give the per-iteration losses of the single-process run within 1e-5 relative.
Every launch runs under a timeout: a wrong address hangs ~100 s before failing.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/launch_utils.py
from launch_utils import ROOT, TINY_GPT, TORCHRUN, layout_flags, losses  # noqa: E402

from megatron_lite.checkpointing import read_latest_iteration  # noqa: E402
from megatron_lite.parallel_state import free_port  # noqa: E402

ITERS = 6
FLAGS = [*TINY_GPT, "--train-iters", str(ITERS)]  # the sbatch example's defaults, tp 2 x pp 2
LAUNCH_TIMEOUT = 150
SLURM_CI = ROOT / "tests" / "launch" / "slurm_ci.sh"
CPU_SBATCH = ROOT / "examples" / "pretrain_gpt_slurm_cpu.sbatch"
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the tests may run inside a SLURM job)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_", "SBATCH_"))
    }
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


def assert_same_losses(output: str, reference: dict[int, float]) -> None:
    got = losses(output)
    assert sorted(got) == sorted(reference), output[-4000:]
    for it, ref in reference.items():
        assert got[it] == pytest.approx(ref, rel=1e-5), (it, got[it], ref)


def assert_all_ok(results) -> str:
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"launch {i} exited {rc}:\n{out[-4000:]}"
    text = "\n".join(out for _, out in results)
    assert "world 4 = tp 2 x pp 2 x dp 1" in text, text[-3000:]
    return text


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    """One plain process, no launcher at all (launch_env's third case)."""
    cmd = [sys.executable, "-m", "megatron_lite.pretrain_gpt", *FLAGS]
    [(rc, out)] = run_group([(cmd, clean_env())], tmp_path_factory.mktemp("reference"))
    assert rc == 0, out[-4000:]
    ref = losses(out)
    assert sorted(ref) == list(range(1, ITERS + 1)), out[-3000:]
    assert ref[ITERS] < ref[1]  # it learns
    return ref


# ---------------------------------------------------------------- torchrun agents on loopback


@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_two_torchrun_agents_on_loopback(reference_losses, rdzv, tmp_path):
    port = free_port()
    if rdzv == "static":
        args = [
            [f"--node_rank={r}", "--master_addr=127.0.0.1", f"--master_port={port}"] for r in (0, 1)
        ]
    else:  # node ranks in arrival order; the first agent to arrive hosts nothing special
        args = [["--rdzv_id=mlt", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]] * 2
    launches = [
        (
            [TORCHRUN, "--nnodes=2", "--nproc_per_node=2", *a, "-m", "megatron_lite.pretrain_gpt"]
            + [*FLAGS, *layout_flags(2, 2)],
            clean_env(),
        )
        for a in args
    ]
    text = assert_all_ok(run_group(launches, tmp_path))
    assert_same_losses(text, reference_losses)


# ---------------------------------------------------------------- srun-style, no torchrun


def test_srun_style_plain_processes_with_slurm_variables_only(reference_losses, tmp_path):
    """What `srun -N2 --ntasks-per-node=2 python -m megatron_lite.pretrain_gpt` gives each rank:
    SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST (+ MASTER_PORT from the script)."""
    port = str(free_port())
    launches = []
    for r in range(4):
        env = clean_env(
            SLURM_PROCID=str(r),
            SLURM_NTASKS="4",
            SLURM_LOCALID=str(r % 2),
            SLURM_NODEID=str(r // 2),
            SLURM_JOB_NODELIST="localhost",
            MASTER_PORT=port,
        )
        cmd = [sys.executable, "-m", "megatron_lite.pretrain_gpt", *FLAGS, *layout_flags(2, 2)]
        launches.append((cmd, env))
    results = run_group(launches, tmp_path)
    text = assert_all_ok(results)
    assert_same_losses(text, reference_losses)
    assert losses(results[3][1]), "the last rank (SLURM_PROCID 3) logs the losses"


def test_srun_without_torchrun_picks_the_gpu_of_slurm_localid(monkeypatch):
    from megatron_lite import device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(device.torch.cuda, "device_count", lambda: 8)
    assert device.get_device() == device.torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "5")  # torchrun under srun: torchrun's local rank wins
    assert device.get_device() == device.torch.device("cuda", 5)


# ---------------------------------------------------------------- two hosts in network namespaces


def remove_tagged_hosts_lines(tag: str) -> None:
    """Drop the /etc/hosts lines ending in `tag`, rewriting in place (it may be a bind mount); other
    lines, a concurrent test session's included, stay."""
    hosts = Path("/etc/hosts")
    lines = hosts.read_text().splitlines(True)
    kept = [ln for ln in lines if not ln.rstrip("\n").endswith(tag)]
    if kept != lines:
        hosts.write_text("".join(kept))


@pytest.fixture
def two_netns_hosts():
    """Two namespaces joined by one veth pair (10.200.0.1/24, 10.200.0.2/24); host names n1/n2
    resolve (tagged /etc/hosts lines) to them. Names carry this process's id, so concurrent test
    sessions do not collide. Yields the namespace names; torn down, /etc/hosts lines removed."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not all(shutil.which(t) for t in ("ip", "nsenter", "unshare")):
        pytest.skip("needs ip (iproute2), nsenter and unshare (util-linux)")
    pid = os.getpid()
    ns, veth = [f"mlt{pid}-n{i}" for i in (1, 2)], [f"mlt{pid}v{i}" for i in (1, 2)]
    tag = f"# megatron_lite-netns-test {pid}"
    setup = [
        f"ip netns add {ns[0]}",
        f"ip netns add {ns[1]}",
        f"ip link add {veth[0]} type veth peer name {veth[1]}",
        f"ip link set {veth[0]} netns {ns[0]}",
        f"ip link set {veth[1]} netns {ns[1]}",
        f"ip -n {ns[0]} addr add 10.200.0.1/24 dev {veth[0]}",
        f"ip -n {ns[1]} addr add 10.200.0.2/24 dev {veth[1]}",
    ] + [f"ip -n {ns[i]} link set {d} up" for i in (0, 1) for d in ("lo", veth[i])]
    try:
        for c in setup:
            r = subprocess.run(c.split(), capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, f"{c}: {r.stderr}"
        with open("/etc/hosts", "a") as f:  # append in place: /etc/hosts may be a bind mount
            f.write(f"10.200.0.1 n1 {tag}\n10.200.0.2 n2 {tag}\n")
        yield ns
    finally:
        for n in ns:  # deleting a namespace removes its end of the veth pair
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)
        remove_tagged_hosts_lines(tag)
        assert tag not in Path("/etc/hosts").read_text()


def test_two_torchrun_agents_in_two_network_namespaces(reference_losses, two_netns_hosts, tmp_path):
    """Two "hosts" with their own addresses and host names: gloo and the store really cross the veth
    (only 10.200.0.1/.2 and loopback are used)."""
    launches = []
    for r in (0, 1):
        torchrun = [TORCHRUN, "--nnodes=2", "--nproc_per_node=2", f"--node_rank={r}"]
        torchrun += ["--master_addr=n1", "--master_port=29511", "-m", "megatron_lite.pretrain_gpt"]
        torchrun += [*FLAGS, *layout_flags(2, 2)]
        inner = f"hostname n{r + 1} && exec timeout {LAUNCH_TIMEOUT} " + " ".join(torchrun)
        cmd = ["nsenter", f"--net=/run/netns/{two_netns_hosts[r]}", "unshare", "--uts", "sh", "-c"]
        cmd.append(inner)
        launches.append((cmd, clean_env()))
    results = run_group(launches, tmp_path)
    text = assert_all_ok(results)
    assert_same_losses(text, reference_losses)


# ---------------------------------------------------------------- a real SLURM cluster


def _slurm_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (munged, slurmd, /etc/hosts)"
    if not shutil.which("slurmctld") or not shutil.which("sbatch"):
        return "slurmctld/sbatch not installed (apt-get install -y slurm-wlm munge; .ci/run does)"
    return None


class Cluster:
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

    def sbatch_command(self, out: Path, *flags: str, parsable: bool = False) -> list[str]:
        return [
            "sbatch",
            "--wait",
            *(["--parsable"] if parsable else []),
            f"--chdir={ROOT}",
            f"--output={out}",
            str(CPU_SBATCH),
            *flags,
        ]

    def job_env(self, launcher: str, **extra: str) -> dict[str, str]:
        """sbatch passes this environment on to the job (--export=ALL)."""
        port = str(
            free_port()
        )  # the job's rendezvous port (the example's default is from the job id)
        return {
            **self.env,
            "PYTHON": sys.executable,
            "LAUNCHER": launcher,
            "MASTER_PORT": port,
            **extra,
        }


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    reason = _slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm") / "cluster")
    try:
        up = cluster.script("up")
        assert up.returncode == 0, f"slurm_ci.sh up failed:\n{up.stdout}\n{up.stderr}"
        assert f"127.0.0.1 node1 node2 {cluster.hosts_tag}" in Path("/etc/hosts").read_text()
        yield cluster
    finally:
        down = cluster.script("down")  # cancels the cluster's jobs, waits for them, stops daemons
        remove_tagged_hosts_lines(cluster.hosts_tag)  # belt and braces
        assert down.returncode == 0, down.stderr
        assert not (cluster.base / "slurmctld.pid").exists()
        assert cluster.hosts_tag not in Path("/etc/hosts").read_text()


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_sbatch_cpu_example_matches_single_process(
    slurm_cluster, reference_losses, launcher, tmp_path
):
    out = tmp_path / "job.out"
    proc = subprocess.run(
        slurm_cluster.sbatch_command(out),
        env=slurm_cluster.job_env(launcher),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    text = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{text[-4000:]}"
    assert "2 nodes (node[1-2]), 4 ranks, master node1:" in text
    assert "world 4 = tp 2 x pp 2 x dp 1" in text
    assert_same_losses(text, reference_losses)


def test_sbatch_job_with_a_failing_rank_fails(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    start = time.monotonic()
    proc = subprocess.run(
        slurm_cluster.sbatch_command(out, "--train-iters", "50"),
        env=slurm_cluster.job_env("srun", MEGATRON_LITE_FAULT="raise:1:3"),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    text = out.read_text() if out.exists() else ""
    assert proc.returncode != 0, text[-4000:]
    assert "injected fault on rank 1" in text
    assert not re.search(r"iteration\s+50/", text)
    assert time.monotonic() - start < 90  # srun --kill-on-bad-exit ends the other ranks


def test_sbatch_sigterm_saves_a_checkpoint_and_completes_under_torchrun(slurm_cluster, tmp_path):
    """`scancel --signal=TERM JOB` signals every process of the job's steps (not the batch shell),
    exactly as `#SBATCH --signal=TERM@120` does before the time limit. The workers save at the next
    iteration and exit 0; the torchrun agents ignore SIGTERM, so the job ends 0 with the save."""
    out, ckpt, jobid = tmp_path / "job.out", tmp_path / "ckpt", tmp_path / "jobid"
    cmd = slurm_cluster.sbatch_command(out, "--save", str(ckpt), parsable=True)
    env = slurm_cluster.job_env("torchrun", TRAIN_ITERS="100000")
    with open(jobid, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (out.exists() and re.search(r" iteration\s+3/", out.read_text())):
            assert proc.poll() is None, f"job ended early:\n{out.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no iteration 3 in time"
            time.sleep(0.2)
        job = jobid.read_text().split()[0]
        sig = subprocess.run(
            ["scancel", "--signal=TERM", job], env=env, capture_output=True, text=True, timeout=30
        )
        assert sig.returncode == 0, sig.stderr
        rc = proc.wait(timeout=LAUNCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.read_text()
    assert rc == 0, text[-4000:]
    assert "(signal)" in text
    saved = read_latest_iteration(str(ckpt))
    assert saved is not None and saved >= 3, text[-3000:]
    assert f"saved checkpoint at iteration {saved:7d}" in text
    assert f"exiting at iteration {saved} (signal)" in text
