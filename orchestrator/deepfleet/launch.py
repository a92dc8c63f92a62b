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
# DeepSpeed's per-node launcher (launch.py) when one of its ranks dies: it kills its own
# ranks, but the other nodes' ranks would wait in their next collective until gloo/NCCL
# time out (30 min), so the first such line stops the job everywhere.
RANK_FAILED = re.compile(r"sigkill_handler\].* exits with return code = (-?\d+)")


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

    def __init__(
        self,
        plan: ClusterPlan,
        write: Callable[[str], None],
        redact: Sequence[str] = (),
        on_rank_failed: Callable[[str, int], None] | None = None,
    ):
        self.plan = plan
        self.write = write
        self.redact = [r for r in redact if r]
        self.on_rank_failed = on_rank_failed
        self.failed: tuple[str, int] | None = None  # the first node whose rank died, its code
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

    def split(self, line: str) -> tuple[str, str]:
        """(node name, the line without pdsh's address prefix)."""
        match = _PDSH_PREFIX.match(line)
        if match:
            name = self.plan.name_of(match.group(1))
            if name:
                return name, match.group(2)
        return self.plan.master.name, line

    def label(self, line: str) -> str:
        return "[{}] {}".format(*self.split(line))

    def _emit(self, line: str) -> None:
        for secret in self.redact:
            line = line.replace(secret, "***")
        node, text = self.split(line.rstrip("\r"))
        labelled = f"[{node}] {text}"
        self.lines.append(labelled)
        self.write(labelled + "\n")
        failed = RANK_FAILED.search(text)
        if failed and self.failed is None:
            self.failed = (node, int(failed.group(1)))
            if self.on_rank_failed:
                self.on_rank_failed(*self.failed)


@dataclass(frozen=True)
class LaunchResult:
    code: int
    lines: list[str]
    failed: tuple[str, int] | None = None  # (node, exit code) of the first rank that died


def run(
    client,
    container_id: str,
    plan: ClusterPlan,
    spec: LaunchSpec,
    out=None,
    redact=(),
    on_rank_failed: Callable[[str, int], None] | None = None,
) -> LaunchResult:
    """Run the launcher and stream its labelled output."""
    out = out or sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    api = client.api
    exec_id = api.exec_create(
        container_id, list(spec.argv), environment=spec.env, workdir=spec.workdir, tty=False
    )["Id"]
    prefixer = LinePrefixer(plan, write, redact, on_rank_failed)
    for chunk in api.exec_start(exec_id, stream=True, demux=False):
        prefixer.feed(chunk)
    prefixer.close()
    code = api.exec_inspect(exec_id).get("ExitCode")
    return LaunchResult(code if code is not None else 1, prefixer.lines, prefixer.failed)


def stop_all(clients: dict, containers: dict[str, str]) -> None:
    """Ctrl-C: stop the launcher and every rank it started, on every node."""
    for name, client in clients.items():
        try:
            container = client.containers.get(containers[name])
            container.exec_run(["pkill", "-TERM", "-f", "deepspeed|deepfleet_node|pdsh"])
        except Exception:  # best effort: the node may be gone, the job must still stop elsewhere
            continue
