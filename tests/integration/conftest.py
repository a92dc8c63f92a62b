"""A real 2-machine simulated LAN and a real deepfleet cluster on it, once per session.

The lab's machines are containers with their own Docker engine and sshd (docker/lab.py);
deepfleet reaches them only over SSH, as it would a real LAN.
"""

from __future__ import annotations

import docker
import pytest
from labtools import Cluster, Lab, lab_module


@pytest.fixture(scope="session")
def outer_docker():
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # the suite is meant to fail loudly, not skip, without an engine
        pytest.fail(f"no Docker engine answers ({exc}); run scripts/ensure-docker.sh")
    return client


@pytest.fixture(scope="session")
def lab(outer_docker, tmp_path_factory) -> Lab:
    directory = tmp_path_factory.mktemp("lab") / "lab"
    nodes = lab_module.up(2, directory, client=outer_docker)
    yield Lab(directory, nodes)
    lab_module.down(outer_docker, directory)


@pytest.fixture(scope="session")
def cluster(lab, tmp_path_factory) -> Cluster:
    state_dir = tmp_path_factory.mktemp("state") / "deepfleet"
    c = Cluster(lab, state_dir, "")
    result = c.run(
        "up",
        "--ssh-config", str(lab.ssh_config),
        "--compose-override", str(lab.override),
        *(n.name for n in lab.nodes),
    )  # fmt: skip
    c.up_output = result.stdout
    yield c
    if state_dir.exists():
        c.run("down", check=False)
