"""Last: the cluster goes down while one machine is unreachable (runs after the job tests)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.lab


def test_down_with_an_unreachable_node_names_it(cluster, outer_docker):
    lab2 = outer_docker.containers.get(cluster.lab.nodes[1].container)
    lab2.pause()
    try:
        result = cluster.run("--timeout", "3", "down", check=False, timeout=120)
    finally:
        lab2.unpause()
    assert result.returncode == 0, result.stderr
    assert "[lab1] container removed" in result.stdout
    warning = [line for line in result.stderr.splitlines() if "lab2" in line]
    assert warning and "not cleaned" in warning[0], result.stderr
    assert not cluster.state_dir.exists()
    # lab1 is clean; lab2 kept its container, exactly as the warning said
    lab1 = outer_docker.containers.get(cluster.lab.nodes[0].container)
    assert lab1.exec_run(["docker", "ps", "-aq"]).output.strip() == b""
    assert lab2.exec_run(["docker", "ps", "-aq"]).output.strip() != b""
    lab2.exec_run(["docker", "rm", "-f", "deepfleet-node"])
