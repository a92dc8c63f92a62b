"""Helpers for the lab tests: the simulated LAN and a deepfleet cluster driven by its CLI.

The lab's machines are containers with their own Docker engine and sshd (docker/lab.py);
deepfleet reaches them only over SSH, as it would a real LAN.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docker"))

import lab as lab_module  # noqa: E402, F401  (docker/lab.py, re-exported for the fixtures)

DEEPFLEET = [sys.executable, "-m", "deepfleet.cli"]
STEP_RE = re.compile(r"^\[(\S+)\] step (\d+)/(\d+) loss ([0-9.]+)")
# Set for the node service by the session cluster's compose override (conftest).
NODE_ENV = {"DEEPFLEET_LAB_PROBE": "set in compose", "WANDB_NOTES": 'two words "quoted"'}
# Any process a job leaves in a node container: the launcher, pdsh, the ranks.
JOB_PROCESSES = "deepfleet_node[.](train|infer|bridge|serve)|deepspeed|pdsh"


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
    up_args: tuple[str, ...] = ()  # what the session cluster was brought up with

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

    def machine_docker(self, index: int, *argv: str, check=True) -> str:
        """`docker ARGV` on lab machine `index`'s own engine."""
        result = subprocess.run(
            ["docker", "exec", self.lab.nodes[index].container, "docker", *argv],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(argv)} on {self.lab.nodes[index].name}: "
                                 f"{result.stderr.strip()}")  # fmt: skip
        return result.stdout


def lab_index(node) -> int:
    """The lab's own number of a machine: deepfleet-lab-3 -> 3 (what set_limits takes)."""
    return int(node.container.rsplit("-", 1)[1])


def steps(text: str) -> list[tuple[int, float]]:
    return [
        (int(m.group(2)), float(m.group(4))) for m in map(STEP_RE.match, text.splitlines()) if m
    ]


def running_ranks(cluster, pattern: str = JOB_PROCESSES) -> list[str]:
    found = []
    for index in range(len(cluster.lab.nodes)):
        code, out = cluster.node_exec(index, ["pgrep", "-af", pattern])
        if code == 0:
            found.append(f"{cluster.lab.nodes[index].name}: {out.strip()}")
    return found


def ranks_gone(cluster, within: float = 30) -> list[str]:
    """The job processes still running once they have had `within` seconds to stop."""
    deadline = time.monotonic() + within
    while running_ranks(cluster) and time.monotonic() < deadline:
        time.sleep(1)
    return running_ranks(cluster)


def train_until_step(
    cluster, args, step: int, stderr=subprocess.STDOUT, within: float = 900, argv=None
):
    """Start `deepfleet ARGS` (a train command), or `argv`, and read its output until rank 0
    logs `step`."""
    proc = subprocess.Popen(
        argv or [*DEEPFLEET, *args],
        cwd=ROOT, env=cluster.env(), stdout=subprocess.PIPE, stderr=stderr, text=True,
    )  # fmt: skip
    seen = []
    deadline = time.monotonic() + within
    for line in proc.stdout:
        seen.append(line)
        match = STEP_RE.match(line)
        if match and int(match.group(2)) >= step:
            break
        assert time.monotonic() < deadline, "".join(seen[-50:])
    return proc, seen


# A CPU-bound loop that prints the share of one core it got (process CPU time / wall time).
BUSY_LOOP = """
import time
wall, cpu = time.monotonic(), time.process_time()
while time.monotonic() - wall < {seconds}:
    pass
print((time.process_time() - cpu) / (time.monotonic() - wall))
"""


def cpu_share(cluster, index: int, seconds: float = 4.0) -> float:
    """The share of one core a busy loop gets in node `index`'s container."""
    code, out = cluster.node_exec(index, ["python", "-c", BUSY_LOOP.format(seconds=seconds)])
    assert code == 0, out
    return float(out.strip().splitlines()[-1])


# The OOM kills under a lab machine's cgroup parent ($1): cgroup v2 counts them up the tree
# in memory.events; v1 only in the victim's own cgroup, so its subtree is summed.
_OOM_KILLS = """
cg=/sys/fs/cgroup
if [ -f $cg/cgroup.controllers ]; then
  sed -n 's/^oom_kill //p' $cg/$1/memory.events
else
  find $cg/memory/$1 -name memory.oom_control -exec sed -n 's/^oom_kill //p' {} + |
    awk '{ n += $1 } END { print n + 0 }'
fi
"""


def oom_kills(node) -> int:
    """How many processes the OOM killer has taken on lab machine `node` (a LabNode)."""
    result = subprocess.run(
        ["docker", "exec", node.container, "sh", "-c", _OOM_KILLS, "sh", node.container],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return int(result.stdout.split()[0])
