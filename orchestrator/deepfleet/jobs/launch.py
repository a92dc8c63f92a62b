"""Launch: run the DeepSpeed launcher inside the master container and stream its output.

The launcher (pdsh underneath) starts the ranks on every node over the containers'
sshd; pdsh prefixes remote lines with the node address, which we turn into the node's
name so the operator's terminal reads `[lab2] step 10/60 loss ...`.
"""

from __future__ import annotations

import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from deepfleet.jobs.watchdog import Watchdog
from deepfleet.machines.execstream import ExecStream
from deepfleet.planning.plan import HOSTFILE, WORKDIR, ClusterPlan

_PDSH_PREFIX = re.compile(r"^(\S+?): (.*)$", re.S)
# DeepSpeed's per-node launcher (launch.py) when one of its ranks dies: it kills its own
# ranks, but the other nodes' ranks would wait in their next collective until gloo/NCCL
# time out (30 min), so the first such line stops the job everywhere.
RANK_FAILED = re.compile(r"sigkill_handler\].* exits with return code = (-?\d+)")
# pdsh's own line when its ssh to a node ends early: the node's sshd stopped answering
# its keepalives (ServerAliveInterval in the master's ssh config) or dropped the session.
SSH_LOST = re.compile(r"^pdsh@\S+: (\S+): ssh exited with exit code (255)")
# The last line of a Python traceback, or a rank's own `error:` line: what the job's one
# closing line quotes when that rank dies.
ERROR_LINE = re.compile(
    r"^(?:\[rank\d+\]:\s*)?((?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)|error)\b:? ?.*)"
)  # torch prefixes a rank's traceback lines with [rankN]:
# Library chatter the terminal leaves to the machines' job logs (`deepfleet logs`, or
# everything with -v): DeepSpeed's logger below ERROR, c10's glog-style info and warning
# lines, Python warnings with the source line they quote, and the job log's own header.
WARNING_HEAD = r"\S+\.py:\d+: \w*Warning: "
CHATTER = re.compile(
    r"^(?:\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\] \[(?:DEBUG|INFO|WARNING)\]"
    r"|\[[IW]\d{4} \d\d:\d\d:\d\d"
    rf"|{WARNING_HEAD}"
    r"|=== \S+ rank \d+ on )"
)
# Processes a job leaves in a node container: the launcher, pdsh, its ssh hops, the ranks.
# The brackets keep the pattern from matching the shell that runs pkill with it.
JOB_PROCESSES = "[d]eepspeed|[d]eepfleet_node[.](train|infer|bridge|serve)|[p]dsh"


@dataclass(frozen=True)
class LaunchSpec:
    """One launcher invocation; printed by --dry-run, run by `run`."""

    argv: tuple[str, ...]
    workdir: str = WORKDIR
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        return shlex.join(self.argv)


def include_filter(plan: ClusterPlan) -> tuple[str, ...]:
    """DeepSpeed's --include when a node's ranks skip GPUs (it sets CUDA_VISIBLE_DEVICES
    to the listed ones): every node with the devices it uses, `addr:0,2@addr2:0,1`."""
    if not any(node.devices for node in plan.nodes):
        return ()
    parts = [
        f"{node.address}:{','.join(str(d) for d in (node.devices or range(node.slots)))}"
        for node in plan.nodes
    ]
    return ("--include", "@".join(parts))


def remote_only(plan: ClusterPlan, launcher_node: str | None) -> tuple[str, ...]:
    """DeepSpeed runs a one-host hostfile on the launching machine itself, whatever host it
    names; when that host is another machine (the master has 0 slots), force the ssh
    launch so the ranks start where the plan puts them."""
    if launcher_node is not None and len(plan.nodes) == 1 and plan.master.name != launcher_node:
        return ("--force_multi",)
    return ()


def launcher_argv(
    plan: ClusterPlan, module: str, args: Sequence[str], launcher_node: str | None = None
) -> tuple[str, ...]:
    return (
        "deepspeed",
        "--hostfile", HOSTFILE,
        *remote_only(plan, launcher_node),
        *include_filter(plan),
        "--ssh_port", str(plan.ssh_port),
        "--master_addr", plan.master_addr,
        "--master_port", str(plan.master_port),
        "--module", module,
        *args,
    )  # fmt: skip


def launch_spec(
    plan: ClusterPlan, module: str, args: Sequence[str], launcher_node: str | None = None
) -> LaunchSpec:
    """launcher_node: the machine whose container runs the launcher (the cluster's master)."""
    return LaunchSpec(argv=launcher_argv(plan, module, args, launcher_node))


class LinePrefixer:
    """Split an exec byte stream into lines labelled with their node's name."""

    def __init__(
        self,
        plan: ClusterPlan,
        write: Callable[[str], None],
        redact: Sequence[str] = (),
        on_rank_failed: Callable[[str, int], None] | None = None,
        verbose: bool = True,
    ):
        self.plan = plan
        self.write = write
        self.verbose = verbose
        self.redact = [r for r in redact if r]
        self.on_rank_failed = on_rank_failed
        self.failed: tuple[str, int] | None = None  # the first node whose rank died, its code
        self.lost: tuple[str, str] | None = None  # a node whose ssh hop ended, and why
        self.errors: dict[str, str] = {}  # each node's last error line
        self.buffer = ""
        self.lines: list[str] = []
        self._warned: set[str] = set()  # nodes whose last line was a Python warning's first

    def chatter(self, node: str, text: str) -> bool:
        """A library's line: a log record, or a Python warning and the source line
        `warnings` prints under it (indented, on the next line from the same node)."""
        after_warning = node in self._warned
        self._warned.discard(node)
        if after_warning and text[:1].isspace():
            return True
        if re.match(WARNING_HEAD, text):
            self._warned.add(node)
        return bool(CHATTER.match(text))

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
        lost = SSH_LOST.match(line)
        if lost and self.plan.name_of(lost.group(1)):
            return self.plan.name_of(lost.group(1)), line
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
        if not self.chatter(node, text) or self.verbose:
            self.write(labelled + "\n")
        error = ERROR_LINE.match(text.strip())
        if error:
            self.errors[node] = error.group(1)
        failed = RANK_FAILED.search(text)
        if failed and self.failed is None:
            self.failed = (node, int(failed.group(1)))
            if self.on_rank_failed:
                self.on_rank_failed(*self.failed)
        lost = SSH_LOST.match(text)
        if lost and self.lost is None and self.failed is None:
            self.lost = (node, f"the launcher's ssh session to it ended (exit {lost.group(2)})")
            if self.on_rank_failed:
                self.on_rank_failed(node, -1)

    def last_error(self, node: str) -> str | None:
        return self.errors.get(node)


@dataclass(frozen=True)
class LaunchResult:
    code: int
    lines: list[str]
    failed: tuple[str, int] | None = None  # (node, exit code) of the first rank that died
    lost: tuple[str, str] | None = None  # (node, cause) of a node that stopped answering
    errors: dict[str, str] = field(default_factory=dict)  # each node's last error line


def run(
    client,
    container_id: str,
    plan: ClusterPlan,
    spec: LaunchSpec,
    out=None,
    redact=(),
    on_rank_failed: Callable[[str, int], None] | None = None,
    watchdog: Watchdog | None = None,
    verbose: bool = True,
) -> LaunchResult:
    """Run the launcher and stream its labelled output, while the watchdog watches;
    verbose=False leaves the libraries' chatter to the job logs."""
    out = out or sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    prefixer = LinePrefixer(plan, write, redact, on_rank_failed, verbose)
    stream = ExecStream(client, container_id, spec.argv, env=spec.env, workdir=spec.workdir)
    if watchdog is not None:
        watchdog.start()
    try:
        for frame in stream.frames(poll=1.0):
            if frame is not None:
                prefixer.feed(frame.data)
            if watchdog is not None and watchdog.settled.is_set():
                break  # a node was lost and every rank it could reach is stopped
    finally:
        if watchdog is not None:
            watchdog.stop()
        stream.close()
    prefixer.close()
    lost = watchdog.lost if watchdog is not None else None
    lost = lost or prefixer.lost
    code = 1 if lost else _exit_code(stream)
    return LaunchResult(code, prefixer.lines, prefixer.failed, lost, dict(prefixer.errors))


def _exit_code(stream: ExecStream) -> int:
    try:
        return stream.exit_code()
    except Exception:  # the master stopped answering at the very end: the job did not finish
        return 1


def stop_all(clients: dict, containers: dict[str, str], wait: float = 20.0) -> list[str]:
    """Stop the launcher and every rank it started, on every node at once.

    TERM first so DeepSpeed's launchers pass it on, KILL for whatever outlives a grace
    period. A node that does not answer within `wait` seconds is named in the result
    instead of holding up the others (a frozen machine cannot be stopped from here).
    """
    stopped = stop_counted(clients, containers, wait)
    return [name for name in containers if stopped.get(name) is None]


# Prints how many job processes it found, then stops them (TERM, then KILL after 10 s).
_STOP_SH = (
    f'n=$(pgrep -fc \'{JOB_PROCESSES}\'); echo "$n"; [ "$n" -gt 0 ] || exit 0; '
    f"pkill -TERM -f '{JOB_PROCESSES}'; "
    f"for i in $(seq 20); do pgrep -f '{JOB_PROCESSES}' >/dev/null || exit 0; sleep 0.5; done; "
    f"pkill -KILL -f '{JOB_PROCESSES}'; exit 0"
)


def stop_counted(clients: dict, containers: dict[str, str], wait: float = 20.0) -> dict:
    """{node: how many job processes it had and stopped, or None where it did not answer}."""
    found: dict[str, int | None] = {}

    def stop(name: str) -> None:
        try:
            client = clients[name]
            exec_id = client.api.exec_create(containers[name], ["sh", "-c", _STOP_SH])["Id"]
            out = client.api.exec_start(exec_id).decode(errors="replace").split()
            found[name] = int(out[0]) if out and out[0].isdigit() else 0
        except Exception:  # the node may be gone; the job must still stop elsewhere
            found[name] = None

    threads = [threading.Thread(target=stop, args=(n,), daemon=True) for n in containers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + wait
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {name: found.get(name) for name in containers}
