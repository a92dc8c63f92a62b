"""Liveness: heartbeats, the watchdog's verdicts and timing, pdsh's lost hops, the
job's closing line, and exec frames read in polls."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from unitdata import two_node_plan

from deepfleet.errors import JobError
from deepfleet.jobs.jobrun import _outcome
from deepfleet.jobs.launch import LaunchResult, LinePrefixer
from deepfleet.jobs.watchdog import (
    LivenessPolicy,
    NodeAnswer,
    Watchdog,
    live_lease,
    parse_heartbeats,
    verdict,
)
from deepfleet.machines.execstream import ExecStream, Frame


def test_heartbeat_ages_are_measured_on_the_nodes_own_clock():
    text = "1000\nrank-0:999.0\nrank-1:905.5\nrank-2:garbage\n"
    assert parse_heartbeats(text, timeout=60) == (("1", 94.5),)
    assert parse_heartbeats(text, timeout=100) == ()
    assert parse_heartbeats("", 60) == () and parse_heartbeats("not a clock\n", 60) == ()


def test_verdicts_name_the_cause():
    assert verdict("lab2", NodeAnswer("running")) is None
    assert "paused" in verdict("lab2", NodeAnswer("paused"))
    assert "exited" in verdict("lab2", NodeAnswer("exited"))
    stale = verdict("lab2", NodeAnswer("running", (("3", 95.0), ("4", 120.0))))
    assert stale.startswith("rank 4 stopped making progress: no heartbeat for 120 s")


def _watch(asker, timeout=1.5, interval=0.2):
    lost = []
    dog = Watchdog(
        {"lab1": object(), "lab2": object()},
        {"lab1": "c1", "lab2": "c2"},
        LivenessPolicy(interval=interval, timeout=timeout),
        lambda *a: lost.append((time.monotonic(), *a)),
        asker=asker,
    )
    return dog, lost


def test_a_node_that_stops_answering_is_lost_within_the_bound():
    start = time.monotonic()
    frozen = threading.Event()

    def asker(client, container, timeout, **_):
        if container == "c2" and time.monotonic() - start > 0.5:
            frozen.wait()  # a machine that never answers again: the call just hangs
        return NodeAnswer("running")

    dog, _ = _watch(asker)
    dog.start()
    deadline = time.monotonic() + 5
    while dog.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    frozen.set()
    assert dog.lost is not None
    name, cause = dog.lost
    assert name == "lab2" and cause.startswith("stopped answering for 2 s")
    # silence began at ~0.5 s; the judge declares it after timeout (1.5 s) + one tick (1 s)
    assert time.monotonic() - start < 0.5 + dog.policy.timeout + 1.5


def test_a_paused_container_is_lost_at_the_next_answer_and_only_once():
    calls = []

    def asker(client, container, timeout, **_):
        calls.append(container)
        return NodeAnswer("paused" if container == "c1" else "running")

    dog, lost = _watch(asker, timeout=30)
    dog.start()
    deadline = time.monotonic() + 3
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert len(lost) == 1 and lost[0][1] == "lab1" and "paused" in lost[0][2]
    assert dog.lost == ("lab1", lost[0][2]) and dog.settled.is_set()


def test_a_healthy_cluster_is_never_declared_lost():
    dog, lost = _watch(lambda *a, **k: NodeAnswer("running"), timeout=1.0, interval=0.1)
    dog.start()
    time.sleep(2.5)
    dog.stop()
    assert lost == [] and dog.lost is None


def test_pdsh_reporting_a_dead_ssh_hop_names_that_node():
    calls, out = [], []
    p = LinePrefixer(two_node_plan(), out.append, on_rank_failed=lambda *a: calls.append(a))
    p.feed(b"pdsh@lab1: 10.0.0.3: ssh exited with exit code 255\n")
    assert p.lost == ("lab2", "the launcher's ssh session to it ended (exit 255)")
    assert calls == [("lab2", -1)] and out == [
        "[lab2] pdsh@lab1: 10.0.0.3: ssh exited with exit code 255\n"
    ]
    # a remote command that merely failed (exit 1) is the rank-failure path's to report
    q = LinePrefixer(two_node_plan(), out.append)
    q.feed(b"pdsh@lab1: 10.0.0.3: ssh exited with exit code 1\n")
    assert q.lost is None


def test_each_nodes_last_error_line_is_kept():
    p = LinePrefixer(two_node_plan(), [].append)
    p.feed(
        b"10.0.0.3: Traceback (most recent call last):\n"
        b'10.0.0.3:   File "x.py", line 1, in <module>\n'
        b"10.0.0.3: ValueError: data /workspace/data/c.jsonl:3: need 'text'\n"
        b"10.0.0.2: torch.distributed.DistBackendError: Connection closed by peer\n"
        b"10.0.0.2: step 5/60 loss 4.0\n"
    )
    assert p.errors == {
        "lab2": "ValueError: data /workspace/data/c.jsonl:3: need 'text'",
        "lab1": "torch.distributed.DistBackendError: Connection closed by peer",
    }


def test_the_closing_line_quotes_the_failing_ranks_own_error():
    failed = LaunchResult(1, [], ("lab2", 1), None, {"lab2": "ValueError: bad row 3"})
    with pytest.raises(JobError) as info:
        _outcome("deepfleet_node.train", "lab1", failed)
    assert info.value.one_line() == (
        "lab2: deepfleet_node.train: a rank exited with code 1: ValueError: bad row 3; "
        "the ranks on every node were stopped"
    )
    killed = LaunchResult(1, [], ("lab2", -9), None, {})
    with pytest.raises(JobError, match=r"killed by signal 9 \(out of memory\?\)"):
        _outcome("deepfleet_node.train", "lab1", killed)
    lost = LaunchResult(1, [], None, ("lab3", "stopped answering for 95 s (frozen)"), {})
    with pytest.raises(JobError) as info:
        _outcome("deepfleet_node.train", "lab1", lost)
    assert info.value.one_line().startswith("lab3: stopped answering for 95 s")
    assert _outcome("m", "lab1", LaunchResult(0, ["ok"])) == ["ok"]


class _FakeApi:
    def __init__(self, sock):
        self.sock = sock

    def exec_create(self, *a, **k):
        return {"Id": "e1"}

    def exec_start(self, exec_id, socket=False):
        return self.sock

    def exec_inspect(self, exec_id):
        return {"ExitCode": 3, "Running": False}


def _frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(data)) + data


def test_exec_frames_survive_polls_that_split_them():
    ours, theirs = socket.socketpair()
    client = type("C", (), {"api": _FakeApi(ours)})()
    stream = ExecStream(client, "cid", ["true"])
    payload = _frame(1, b"hello ") + _frame(2, b"oops\n") + _frame(1, b"world\n")

    def writer():
        theirs.sendall(payload[:5])
        time.sleep(0.3)  # longer than a poll: the reader ticks in the middle of a frame
        theirs.sendall(payload[5:])
        theirs.close()

    threading.Thread(target=writer).start()
    got = list(stream.frames(poll=0.1))
    frames = [f for f in got if f is not None]
    assert None in got
    assert frames == [Frame(1, b"hello "), Frame(2, b"oops\n"), Frame(1, b"world\n")]
    assert stream.exit_code() == 3


def test_torchs_rank_prefix_is_dropped_from_the_quoted_error():
    p = LinePrefixer(two_node_plan(), [].append)
    p.feed(b"10.0.0.3: [rank1]: ModuleNotFoundError: No module named 'nosuchmod'\n")
    assert p.errors == {"lab2": "ModuleNotFoundError: No module named 'nosuchmod'"}


def test_a_lease_is_live_only_while_its_watchdog_renews_it():
    policy = LivenessPolicy(interval=10, timeout=90)
    assert live_lease("1000\n990 alice-laptop (pid 42)\n", policy) == "alice-laptop (pid 42)"
    assert live_lease("1000\n900 alice-laptop (pid 42)\n", policy) is None  # lapsed
    assert live_lease("1000\n", policy) is None  # no job holds it


def test_the_watchdog_renews_the_lease_on_the_master_only_and_gives_it_back():
    asked: list = []

    def asker(client, container, timeout, lease=None):
        asked.append((container, lease))
        return NodeAnswer("running")

    api_calls = []

    class Api:
        def exec_create(self, container, argv):
            api_calls.append((container, argv))
            return {"Id": "x"}

        def exec_start(self, exec_id):
            return b""

    client = type("C", (), {"api": Api()})()
    dog = Watchdog(
        {"lab1": client, "lab2": client},
        {"lab1": "c1", "lab2": "c2"},
        LivenessPolicy(interval=0.1, timeout=5),
        lambda *a: None,
        asker=asker,
        lease=("lab1", "me (pid 1)"),
    )
    dog.start()
    time.sleep(0.5)
    dog.stop()
    dog.stop()
    assert ("c1", "me (pid 1)") in asked and ("c2", None) in asked
    assert all(lease is None for container, lease in asked if container == "c2")
    assert api_calls == [("c1", ["rm", "-f", "/workspace/.deepfleet/job.lease"])]


def test_an_engine_refusal_in_a_job_step_is_one_line_naming_the_node():
    import docker

    from deepfleet.errors import ContainerError
    from deepfleet.jobs.jobrun import run_on

    class Api:
        def exec_create(self, container, argv):
            response = type("R", (), {"status_code": 409, "reason": "Conflict", "url": "u"})()
            raise docker.errors.APIError(
                "409 Client Error", response, explanation="Container abc is paused, unpause it"
            )

        def exec_start(self, exec_id):  # never reached: the create is refused
            raise AssertionError("exec_start after a refused exec_create")

    node = type("N", (), {"container_id": "abc", "container_name": "deepfleet-node"})()
    session = type(
        "S", (), {"clients": {"lab2": type("C", (), {"api": Api()})()},
                  "node_state": lambda self, name: node},
    )()  # fmt: skip
    with pytest.raises(ContainerError) as info:
        run_on(session, "lab2", ["true"])
    assert info.value.one_line() == (
        "lab2: deepfleet-node is paused (frozen); `docker unpause deepfleet-node` on that machine"
    )


def test_a_lease_renewal_in_flight_at_stop_lands_before_the_release():
    """The master's round that is writing the lease when the job ends must not write it
    again after the release: the next job would be refused as if this one still ran."""
    order: list[str] = []
    entered = threading.Event()

    def asker(client, container, timeout, lease=None):
        entered.set()
        time.sleep(0.5)  # the round is still in flight when stop() is called
        order.append("renewed")
        return NodeAnswer("running")

    class Api:
        def exec_create(self, container, argv):
            return {"Id": "x"}

        def exec_start(self, exec_id):
            order.append("released")
            return b""

    client = type("C", (), {"api": Api()})()
    dog = Watchdog(
        {"lab1": client}, {"lab1": "c1"}, LivenessPolicy(interval=0.1, timeout=5),
        lambda *a: None, asker=asker, lease=("lab1", "me (pid 1)"),
    )  # fmt: skip
    dog.start()
    assert entered.wait(5)
    dog.stop()
    assert order == ["renewed", "released"]


def test_an_engine_that_does_not_answer_is_one_line_without_requests_text():
    import requests

    from deepfleet.machines.connect import docker_cause, fan_out

    def ask(name):
        raise requests.exceptions.ReadTimeout(
            "UnixHTTPConnectionPool(host='localhost', port=None): Read timed out. (read timeout=60)"
        )

    _, errors = fan_out(["lab3"], ask, lambda n: n)
    line = errors["lab3"].one_line()
    assert line.startswith("lab3: its Docker engine did not answer in time"), line
    assert "Pool" not in line and "timeout=" not in line
    lost = docker_cause(requests.exceptions.ConnectionError("Connection aborted."))
    assert lost.startswith("the connection to its Docker engine was lost")
