"""A real 3-machine simulated LAN and a real deepfleet cluster on it, once per session.

Three, not two: the paths that run on every machine at once (streaming the image onto
fresh engines, a job's mesh) are where two machines hide what a third shows.

The lab's machines are containers with their own Docker engine and sshd (docker/lab.py);
deepfleet reaches them only over SSH, as it would a real LAN.
"""

from __future__ import annotations

import json

import docker
import pytest
from labtools import NODE_ENV, Cluster, Lab, lab_module

LAB_MACHINES = 3


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
    nodes = lab_module.up(LAB_MACHINES, directory, client=outer_docker)
    yield Lab(directory, nodes)
    lab_module.down(outer_docker, directory)


@pytest.fixture(scope="session")
def cluster(lab, tmp_path_factory) -> Cluster:
    state_dir = tmp_path_factory.mktemp("state") / "deepfleet"
    c = Cluster(lab, state_dir, "")
    # what a user sets under the node service's environment: (HSA_OVERRIDE_GFX_VERSION,
    # WANDB_*): every rank on every machine must see it
    node_env = lab.dir / "node-env.override.yml"
    node_env.write_text(
        "services:\n  node:\n    environment:\n"
        + "".join(f"      {k}: {json.dumps(v)}\n" for k, v in NODE_ENV.items())
    )
    c.up_args = (
        "--ssh-config", str(lab.ssh_config),
        "--compose-override", str(lab.override),
        "--compose-override", str(node_env),
        *(n.name for n in lab.nodes),
    )  # fmt: skip
    result = c.run("up", *c.up_args, timeout=1800)
    c.up_output = result.stdout
    yield c
    if state_dir.exists():
        c.run("down", check=False)


def pytest_collection_modifyitems(config, items):
    """test_teardown.py takes the session cluster down: whatever sorts after it runs first."""
    last = [item for item in items if item.path.name == "test_teardown.py"]
    items[:] = [item for item in items if item not in last] + last
