"""Last on the session cluster: `down` with a machine that does not answer keeps that
machine in the state, and a later `down` finishes the job."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.lab


def test_down_keeps_what_it_could_not_remove_and_finishes_later(cluster):
    frozen = cluster.lab.nodes[2]
    subprocess.run(["docker", "pause", frozen.container], check=True, timeout=60)
    try:
        result = cluster.run("--timeout", "5", "down", check=False, timeout=300)
        assert result.returncode == 1, result.stdout + result.stderr
        warning = [line for line in result.stderr.splitlines() if "warning" in line]
        assert len(warning) == 1 and warning[0].startswith("deepfleet: warning: lab3: "), warning
        assert "`deepfleet down` again" in warning[0]
        assert [n["spec"]["name"] for n in cluster.state()["nodes"]] == ["lab3"]
        for index in (0, 1):
            code, _ = cluster.node_exec(index, ["true"])
            assert code != 0  # lab1's and lab2's node containers are gone
    finally:
        subprocess.run(["docker", "unpause", frozen.container], timeout=60)
    result = cluster.run("down")
    assert "deepfleet: container removed on lab3" in result.stdout
    assert not cluster.state_dir.exists()
