"""A real 2-machine simulated LAN and a real deepfleet cluster on it, once per session.

The lab's machines are containers with their own Docker engine and sshd (docker/lab.py);
deepfleet reaches them only over SSH, as it would a real LAN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docker"))

import lab as lab_module  # noqa: E402

DEEPFLEET = [sys.executable, "-m", "deepfleet.cli"]


@dataclass
class Lab:
    dir: Path
    nodes: list

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def override(self) -> Path:
        return self.dir / "compose.override.yml"


@dataclass
class Cluster:
    lab: Lab
    state_dir: Path
    up_output: str

    def env(self) -> dict:
        return {**os.environ, "DEEPFLEET_STATE_DIR": str(self.state_dir)}

    def run(self, *args, check=True, timeout=900) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*DEEPFLEET, *args],
            env=self.env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"deepfleet {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    def state(self) -> dict:
        return json.loads((self.state_dir / "cluster.json").read_text())

    def node_exec(self, index: int, argv: list[str]) -> tuple[int, str]:
        """Run argv in node `index`'s deepfleet container (through that lab machine's engine)."""
        node = self.lab.nodes[index]
        result = subprocess.run(
            ["docker", "exec", node.container, "docker", "exec", "deepfleet-node", *argv],
            capture_output=True,
            text=True,
            timeout=600,
        )
        return result.returncode, result.stdout + result.stderr


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
