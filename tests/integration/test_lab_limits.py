"""Unlike machines: a CPU quota and a memory limit per lab machine, set live with
lab.set_limits, are real (a busy loop gets its quota, an allocation over the limit is
OOM-killed while the machine carries on) and show in each node's detect report.

Every limit is cleared again at the end, so the tests after these run at full speed.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from labtools import cpu_share, lab_index, lab_module, oom_kills

from deepfleet.planning import reports

pytestmark = pytest.mark.lab

GiB = 1 << 30
# machine index (0-based, as cluster.node_exec takes it) -> (cores, memory limit)
LIMITS = {1: (0.5, 3 * GiB), 2: (0.3, 2 * GiB)}


def clear_all(cluster) -> None:
    for node in cluster.lab.nodes:
        lab_module.set_limits(lab_index(node), None, None)


@pytest.fixture(scope="module")
def limited(cluster):
    """lab2 at 0.5 cores / 3 GiB and lab3 at 0.3 cores / 2 GiB; lab1 unbounded."""
    try:
        for index, (cores, memory) in LIMITS.items():
            lab_module.set_limits(lab_index(cluster.lab.nodes[index]), cores, memory)
        yield cluster
    finally:
        clear_all(cluster)


def detect_all(cluster) -> dict[int, reports.NodeReport]:
    def one(index):
        node = cluster.lab.nodes[index]
        result = subprocess.run(
            ["docker", "exec", node.container, "docker", "exec", "deepfleet-node", "detect",
             "--json"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return reports.parse(result.stdout, node.name)

    indices = range(len(cluster.lab.nodes))
    with ThreadPoolExecutor(len(indices)) as pool:
        return dict(zip(indices, pool.map(one, indices), strict=True))


def test_up_saw_no_limits(cluster):
    # the session lab starts unbounded: no limit left over from an earlier lab
    for node in cluster.state()["nodes"]:
        report = reports.parse(json.dumps(node["report"]))
        assert (report.memory_limit_bytes, report.cpu_quota) == (None, None), node["spec"]
        assert report.memory_room == report.memory_bytes


def test_node_containers_see_their_machines_cgroup(cluster):
    for index, node in enumerate(cluster.lab.nodes):
        code, out = cluster.node_exec(index, ["cat", "/proc/self/cgroup"])
        assert code == 0 and f":/{node.container}/" in out, out


def test_detect_reports_each_machines_limits(limited):
    found = detect_all(limited)
    assert (found[0].cpu_quota, found[0].memory_limit_bytes) == (None, None)
    assert found[0].memory_room == found[0].memory_bytes
    for index, (cores, memory) in LIMITS.items():
        report = found[index]
        assert (report.cpu_quota, report.memory_limit_bytes) == (cores, memory), report
        assert report.cpu_count == 1  # ceil of the quota
        assert report.memory_room == memory < report.memory_bytes
    code, out = limited.node_exec(2, ["detect"])
    assert "1 cores (quota 0.30 cores)" in out and "(limit 2.0 GiB)" in out, out


def test_a_busy_loop_gets_its_machines_cpu_quota(limited):
    with ThreadPoolExecutor(2) as pool:  # 0.5 + 0.3 cores: the two do not compete
        lab2, lab3 = pool.map(lambda i: cpu_share(limited, i), (1, 2))
    print(f"cpu share: lab2 (0.5 cores) {lab2:.3f}, lab3 (0.3 cores) {lab3:.3f}")
    assert 0.15 <= lab3 <= 0.45, lab3
    assert 0.25 <= lab2 <= 0.75, lab2
    assert lab3 < lab2


def test_allocating_over_the_limit_is_oom_killed_and_the_machine_carries_on(limited):
    node = limited.lab.nodes[2]
    before = oom_kills(node)
    # 3 GiB of written bytes under a 2 GiB limit, no swap to spill into
    code, out = limited.node_exec(2, ["python", "-c", "x = b'x' * (3 << 30); print('survived')"])
    print(f"allocating 3 GiB under 2 GiB: exit {code}, oom kills {before} -> {oom_kills(node)}")
    assert code == 137 and "survived" not in out, (code, out)
    assert oom_kills(node) > before
    # the machine and its node container are still there and answer
    code, out = limited.node_exec(2, ["python", "-c", "x = b'x' * (1 << 30); print('ok')"])
    assert code == 0 and "ok" in out, out
    state = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Running}}", node.container],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert state.stdout.strip() == "true"


def test_cleared_limits_leave_every_machine_unbounded(limited):
    clear_all(limited)
    for index, report in detect_all(limited).items():
        assert (report.cpu_quota, report.memory_limit_bytes) == (None, None), index
    assert cpu_share(limited, 2, seconds=2) > 0.5


def test_shaped_links_cap_each_machine_and_come_off_again(cluster, outer_docker):
    """LAB_LINK: tc tbf on every lab interface; 40 MB to a machine cannot beat the cap."""
    import time

    shaped = lab_module.shape_links(outer_docker, "200mbit")
    try:
        assert len(shaped) == 2 * len(cluster.lab.nodes) + 1  # eth0 + veth each, the bridge
        for node in cluster.lab.nodes:
            qdisc = subprocess.run(
                ["docker", "exec", node.container, "tc", "qdisc", "show", "dev", "eth0"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            assert "tbf" in qdisc and "200Mbit" in qdisc, qdisc
        began = time.monotonic()
        subprocess.run(
            ["ssh", "-F", str(cluster.lab.ssh_config), "lab2", "cat > /dev/null"],
            input=b"\0" * (40 << 20), check=True,
        )  # fmt: skip
        # 200 mbit is 25 MB/s: 40 MB takes at least 1.6 s whatever the machine's speed
        assert time.monotonic() - began >= 1.5
    finally:
        lab_module.unshape_links(outer_docker)
    for node in cluster.lab.nodes:
        qdisc = subprocess.run(
            ["docker", "exec", node.container, "tc", "qdisc", "show", "dev", "eth0"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "tbf" not in qdisc, qdisc
