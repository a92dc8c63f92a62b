"""Helpers for the lab tests: the simulated LAN and a deepfleet cluster driven by its CLI.

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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docker"))

import lab as lab_module  # noqa: E402, F401  (docker/lab.py, re-exported for the fixtures)

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
