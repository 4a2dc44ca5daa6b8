from pathlib import Path

import pytest
from launching import Cluster, remove_tagged_hosts_lines, slurm_skip_reason


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """One local two-node SLURM cluster for every launch test that needs it; always torn down."""
    reason = slurm_skip_reason()
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
