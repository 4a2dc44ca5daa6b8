"""Multi-node launches of the real entry point on one machine.

* two torchrun agents on loopback (static and c10d rendezvous), 2 ranks each, tp=2 x pp=2;
* `srun`-style: four plain processes with only SLURM's variables (no torchrun);
* two "hosts" in two network namespaces (veth 10.200.0.1/.2, host names n1/n2), torchrun on each;
* a real two-node SLURM cluster on localhost (tests/launch/slurm_ci.sh) running
  examples/pretrain_gpt_slurm_cpu.sbatch (srun starts every rank, no torchrun) with `sbatch --wait`:
  success, and a failing rank failing the job. The torchrun-under-srun examples and SIGTERM are
  tests/launch/test_examples.py's.

Each launch must give the per-iteration losses of the single-process run within 1e-5 relative.
Every launch runs under a timeout: a wrong address hangs ~100 s before failing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_util import ROOT, TINY_GPT, TORCHRUN, layout_flags, losses
from launching import (
    LAUNCH_TIMEOUT,
    assert_same_losses,
    clean_env,
    remove_tagged_hosts_lines,
    run_group,
)

from megatron_lite.parallel_state import free_port

ITERS = 6
FLAGS = [*TINY_GPT, "--train-iters", str(ITERS)]  # the sbatch example's defaults, tp 2 x pp 2
CPU_SBATCH = ROOT / "examples" / "pretrain_gpt_slurm_cpu.sbatch"


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sbatch_cpu_example_matches_single_process(slurm_cluster, reference_losses, tmp_path):
    out = tmp_path / "job.out"
    proc = subprocess.run(
        slurm_cluster.sbatch_command(CPU_SBATCH, out),
        env=slurm_cluster.job_env(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    text = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{text[-4000:]}"
    assert "2 nodes (node[1-2]), 4 ranks, port " in text
    assert "world 4 = tp 2 x pp 2 x dp 1" in text
    assert_same_losses(text, reference_losses)


@pytest.mark.slow
def test_sbatch_job_with_a_failing_rank_fails(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    start = time.monotonic()
    proc = subprocess.run(
        slurm_cluster.sbatch_command(CPU_SBATCH, out, "--train-iters", "50"),
        env=slurm_cluster.job_env(MEGATRON_LITE_FAULT="raise:1:3"),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    text = out.read_text() if out.exists() else ""
    assert proc.returncode != 0, text[-4000:]
    assert "injected fault on rank 1" in text
    assert not re.search(r"iteration\s+50/", text)
    assert time.monotonic() - start < 90  # srun --kill-on-bad-exit ends the other ranks
