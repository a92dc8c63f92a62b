"""Launch: run the DeepSpeed launcher inside the master container and stream its output.

The launcher (pdsh underneath) starts the ranks on every node over the containers'
sshd; pdsh prefixes remote lines with the node address, which we turn into the node's
name so the operator's terminal reads `[lab2] step 10/60 loss ...`.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .plan import HOSTFILE, WORKDIR, ClusterPlan

_PDSH_PREFIX = re.compile(r"^(\S+?): (.*)$", re.S)


@dataclass(frozen=True)
class LaunchSpec:
    """One launcher invocation; printed by --dry-run, run by `run`."""

    argv: tuple[str, ...]
    workdir: str = WORKDIR
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        return shlex.join(self.argv)


def launcher_argv(plan: ClusterPlan, module: str, args: Sequence[str]) -> tuple[str, ...]:
    return (
        "deepspeed",
        "--hostfile", HOSTFILE,
        "--ssh_port", str(plan.ssh_port),
        "--master_addr", plan.master_addr,
        "--master_port", str(plan.master_port),
        "--module", module,
        *args,
    )  # fmt: skip


def launch_spec(plan: ClusterPlan, module: str, args: Sequence[str]) -> LaunchSpec:
    return LaunchSpec(argv=launcher_argv(plan, module, args))


class LinePrefixer:
    """Split an exec byte stream into lines labelled with their node's name."""

    def __init__(self, plan: ClusterPlan, write: Callable[[str], None], redact: Sequence[str] = ()):
        self.plan = plan
        self.write = write
        self.redact = [r for r in redact if r]
        self.buffer = ""
        self.lines: list[str] = []

    def feed(self, data: bytes) -> None:
        self.buffer += data.decode(errors="replace")
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self._emit(line)

    def close(self) -> None:
        if self.buffer:
            self._emit(self.buffer)
            self.buffer = ""

    def label(self, line: str) -> str:
        match = _PDSH_PREFIX.match(line)
        if match:
            name = self.plan.name_of(match.group(1))
            if name:
                return f"[{name}] {match.group(2)}"
        return f"[{self.plan.master.name}] {line}"

    def _emit(self, line: str) -> None:
        for secret in self.redact:
            line = line.replace(secret, "***")
        labelled = self.label(line.rstrip("\r"))
        self.lines.append(labelled)
        self.write(labelled + "\n")


def run(
    client, container_id: str, plan: ClusterPlan, spec: LaunchSpec, out=None, redact=()
) -> tuple[int, list[str]]:
    """Run the launcher; returns (exit code, labelled output lines)."""
    out = out or sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    api = client.api
    exec_id = api.exec_create(
        container_id, list(spec.argv), environment=spec.env, workdir=spec.workdir, tty=False
    )["Id"]
    prefixer = LinePrefixer(plan, write, redact)
    for chunk in api.exec_start(exec_id, stream=True, demux=False):
        prefixer.feed(chunk)
    prefixer.close()
    code = api.exec_inspect(exec_id).get("ExitCode")
    return (code if code is not None else 1), prefixer.lines


def stop_all(clients: dict, containers: dict[str, str]) -> None:
    """Ctrl-C: stop the launcher and every rank it started, on every node."""
    for name, client in clients.items():
        try:
            container = client.containers.get(containers[name])
            container.exec_run(["pkill", "-TERM", "-f", "deepspeed|deepfleet_node|pdsh"])
        except Exception:  # best effort: the node may be gone, the job must still stop elsewhere
            continue
