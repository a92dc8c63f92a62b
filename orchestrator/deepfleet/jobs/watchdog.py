"""Watchdog: notice, while a job runs, a machine or rank that stops making progress.

A frozen, unplugged or sleeping machine sends nothing: no error, no closed connection,
and its peers wait in their next collective for as long as the process group allows. So
the operator asks every node, in parallel and every `interval` seconds, for its node
container's state and its ranks' heartbeats (each rank's thread touches a file every few
seconds; see deepfleet_node/heartbeat.py). The first node that does not answer for
`timeout` seconds, whose container stopped or froze, or whose rank's heartbeat is older
than `timeout`, is lost: the caller stops every other rank and ends the job naming it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from deepfleet.layout import RUN_DIR

HEARTBEAT_DIR = f"{RUN_DIR}/heartbeat"
# The running job's lease on the master: who started it, renewed at every watchdog round,
# so a second operator can tell a live job from processes a killed one left behind.
LEASE = f"{RUN_DIR}/job.lease"
LEASE_READ_SH = f"date +%s; cat {LEASE} 2>/dev/null; true"
# The node's own clock first, then one `rank-N:time` line per rank: ages are measured on
# the node, so the machines' clocks need not agree with the operator's.
_HEARTBEAT_SH = f"date +%s; cd {HEARTBEAT_DIR} 2>/dev/null && grep -H . rank-* 2>/dev/null; true"


@dataclass(frozen=True)
class LivenessPolicy:
    interval: float = 10.0  # how often every node is asked
    timeout: float = 90.0  # silence (of a node or of a rank's heartbeat) that ends the job

    @property
    def bound(self) -> float:
        """The longest time from a fault to its detection."""
        return self.timeout + self.interval


@dataclass(frozen=True)
class NodeAnswer:
    status: str  # the node container's state: running, paused, exited, ...
    stale: tuple[tuple[str, float], ...] = ()  # (rank, heartbeat age in s) older than timeout


def parse_heartbeats(text: str, timeout: float) -> tuple[tuple[str, float], ...]:
    """Ranks whose heartbeat is older than `timeout`, from _HEARTBEAT_SH's output."""
    lines = text.strip().splitlines()
    if not lines:
        return ()
    try:
        now = float(lines[0])
    except ValueError:
        return ()
    stale = []
    for line in lines[1:]:
        name, _, stamp = line.partition(":")
        try:
            age = now - float(stamp)
        except ValueError:
            continue
        if age > timeout:
            stale.append((name.removeprefix("rank-"), age))
    return tuple(stale)


def lease_text() -> str:
    """Who holds the lease: this operator's host and process."""
    return f"{socket.gethostname()} (pid {os.getpid()})"


def live_lease(text: str, policy: LivenessPolicy) -> str | None:
    """The holder named by LEASE_READ_SH's output, when its lease was renewed recently."""
    lines = text.strip().splitlines()
    if len(lines) < 2:
        return None
    stamp, _, holder = lines[1].partition(" ")
    try:
        age = float(lines[0]) - float(stamp)
    except ValueError:
        return None
    if age > 3 * policy.interval + 5:  # its watchdog stopped: the operator is gone
        return None
    return holder or "another operator"


def ask(client, container_id: str, timeout: float, lease: str | None = None) -> NodeAnswer:
    """One round trip to a node: its container's state, then its ranks' heartbeats (and,
    on the master, the job's lease renewed)."""
    status = client.api.inspect_container(container_id)["State"]["Status"]
    if status != "running":
        return NodeAnswer(status)
    script = _HEARTBEAT_SH
    if lease:
        script = f'echo "$(date +%s) {lease}" > {LEASE}; {script}'
    exec_id = client.api.exec_create(container_id, ["sh", "-c", script])["Id"]
    out = client.api.exec_start(exec_id)
    return NodeAnswer(status, parse_heartbeats(out.decode(errors="replace"), timeout))


def verdict(name: str, answer: NodeAnswer) -> str | None:
    """Why the node is lost, from what it answered; None while it is healthy."""
    if answer.status == "paused":
        return "its node container is frozen (paused); its ranks make no progress"
    if answer.status != "running":
        return f"its node container is {answer.status} (the machine restarted, or it was stopped)"
    if answer.stale:
        rank, age = max(answer.stale, key=lambda item: item[1])
        return (
            f"rank {rank} stopped making progress: no heartbeat for {age:.0f} s "
            "(frozen, or starved of memory?)"
        )
    return None


class Watchdog:
    """One asking thread per node, and a judge that compares the answers with the policy."""

    def __init__(
        self,
        clients: dict,
        containers: dict[str, str],
        policy: LivenessPolicy,
        on_lost: Callable[[str, str], None],
        asker: Callable[..., NodeAnswer] = ask,
        lease: tuple[str, str] | None = None,  # (master, holder): renew the job's lease there
    ):
        self.clients = clients
        self.containers = containers
        self.policy = policy
        self.on_lost = on_lost
        self.asker = asker
        self.lease = lease
        self.lost: tuple[str, str] | None = None
        self.settled = threading.Event()  # set once on_lost has returned (the stop is done)
        self._stop = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._last_answer = {name: time.monotonic() for name in containers}
        self._threads: list[threading.Thread] = []
        self._askers: dict[str, threading.Thread] = {}

    def start(self) -> Watchdog:
        for name in self.containers:
            thread = threading.Thread(target=self._ask_loop, args=(name,), daemon=True)
            thread.start()
            self._threads.append(thread)
            self._askers[name] = thread
        judge = threading.Thread(target=self._judge_loop, daemon=True)
        judge.start()
        self._threads.append(judge)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.lease and not self._released.is_set():  # give the lease back: the job is over
            self._released.set()
            deadline = time.monotonic() + 5.0  # a frozen master must not hold the operator up
            asker = self._askers.get(self.lease[0])
            if asker is not None and asker is not threading.current_thread():
                # a round in flight would write the lease again after the release
                asker.join(max(0.0, deadline - time.monotonic()))
            release = threading.Thread(target=self._release, daemon=True)
            release.start()
            release.join(max(0.0, deadline - time.monotonic()))  # else it lapses

    def _release(self) -> None:
        master, _ = self.lease
        try:
            api = self.clients[master].api
            api.exec_start(api.exec_create(self.containers[master], ["rm", "-f", LEASE])["Id"])
        except Exception:
            pass

    def _ask_loop(self, name: str) -> None:
        while not self._stop.is_set():
            lease = self.lease[1] if self.lease and self.lease[0] == name else None
            try:
                answer = self.asker(
                    self.clients[name], self.containers[name], self.policy.timeout, lease=lease
                )
            except Exception:  # no answer this round; silence is judged by its length
                answer = None
            if self._stop.is_set():
                return
            if answer is not None:
                with self._lock:
                    self._last_answer[name] = time.monotonic()
                cause = verdict(name, answer)
                if cause:
                    self._declare(name, cause)
                    return
            self._stop.wait(self.policy.interval)

    def _judge_loop(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self._lock:
                silent = [(now - t, n) for n, t in self._last_answer.items()]
            age, name = max(silent)
            if age > self.policy.timeout:
                self._declare(
                    name,
                    f"stopped answering for {age:.0f} s "
                    "(frozen, unplugged, asleep or off the network)",
                )
                return

    def _declare(self, name: str, cause: str) -> None:
        with self._lock:
            if self.lost is not None or self._stop.is_set():
                return
            self.lost = (name, cause)
        self._stop.set()
        try:
            self.on_lost(name, cause)
        finally:
            self.settled.set()
