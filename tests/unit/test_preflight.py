"""preflight: which paths are tried, the lines a failure ends in, and the node module for real.

The node module runs as subprocesses of this test, listening and connecting on 127.0.0.1
only. The executor's tests run it through a fake session whose "containers" are those
subprocesses, so the whole check (listen, probe, stop) is exercised without Docker.
"""

from __future__ import annotations

import io
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import docker
import pytest
from unitdata import inv, rep

from deepfleet.errors import PreflightError
from deepfleet.health import doctor
from deepfleet.machines import preflight
from deepfleet.planning.plan import ClusterPlan, PlannedNode, plan_cluster

NODE_PATH = Path(__file__).resolve().parents[2] / "images" / "node"
LOOPBACK = "127.0.0.1"


def node_env(pythonpath: Path = NODE_PATH) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(pythonpath)}


def node_argv(*args: str) -> list[str]:
    # -S: the node package as the image has it (PYTHONPATH), not the operator venv's copy
    return [sys.executable, "-S", "-m", "deepfleet_node.preflight", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def read_line(proc: subprocess.Popen, timeout: float = 10.0) -> dict:
    """The process's first stdout line as JSON, without hanging the suite if it never comes."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        assert selector.select(timeout), "the listener printed nothing"
    return json.loads(proc.stdout.readline())


def start_listener(*ports: int, seconds: float = 20.0) -> subprocess.Popen:
    args = [a for p in ports for a in ("--port", str(p))]
    return subprocess.Popen(
        node_argv("listen", "--host", LOOPBACK, *args, "--seconds", str(seconds)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=node_env(),
        text=True,
    )


def probe(*targets: str, timeout: float = 2.0) -> list[dict]:
    done = subprocess.run(
        node_argv("probe", "--timeout", str(timeout), *targets),
        capture_output=True,
        env=node_env(),
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["results"]


@pytest.fixture
def listener():
    procs = []

    def start(*ports, seconds=20.0):
        proc = start_listener(*ports, seconds=seconds)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture
def unanswered():
    """A port whose listener never accepts and whose accept queue is full: connects to it get
    no SYN-ACK, which is what a DROP rule looks like from the other machine."""
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect((LOOPBACK, port))
        except BlockingIOError:
            pass
        fillers.append(sock)
    time.sleep(0.1)
    yield port
    for sock in [*fillers, server]:
        sock.close()


def three_nodes(**slots):
    return plan_cluster(inv("lab1", "lab2", "lab3"), {n: rep() for n in ("lab1", "lab2", "lab3")},
                        slots=slots or None)  # fmt: skip


# ---------------------------------------------------------------- probes(), pure


def test_every_ordered_pair_and_the_rendezvous_port_from_every_other_node():
    plan = three_nodes()
    ports = {"lab1": [29500, 41001], "lab2": [41002], "lab3": [41003]}
    found = preflight.probes(plan, ports)

    rendezvous = [p for p in found if p.purpose == preflight.RENDEZVOUS]
    assert [(p.src, p.dst, p.address, p.port) for p in rendezvous] == [
        ("lab2", "lab1", "10.0.0.1", 29500),
        ("lab3", "lab1", "10.0.0.1", 29500),
    ]
    assert found[: len(rendezvous)] == rendezvous  # their failures are reported first
    mesh = {(p.src, p.dst, p.port) for p in found if p.purpose == preflight.MESH}
    assert mesh == {
        ("lab1", "lab2", 41002), ("lab1", "lab3", 41003),
        ("lab2", "lab1", 41001), ("lab2", "lab3", 41003),
        ("lab3", "lab1", 41001), ("lab3", "lab2", 41002),
    }  # fmt: skip
    assert len(found) == 8
    assert {p.target for p in found if p.dst == "lab3"} == {"10.0.0.3:41003"}


def test_what_each_node_listens_on():
    assert preflight.listen_ports(three_nodes()) == {
        "lab1": [29500, 0],
        "lab2": [0],
        "lab3": [0],
    }
    single = plan_cluster(inv("solo"), {"solo": rep()})
    assert preflight.listen_ports(single) == {"solo": [29500]}
    # one machine: nothing remote to try, only that the rendezvous port could be bound
    assert preflight.probes(single, {"solo": [29500]}) == []


def test_a_node_with_no_slots_is_not_in_the_plan_so_not_probed():
    plan = three_nodes(lab2=0)
    ports = preflight.listen_ports(plan)
    assert set(ports) == {"lab1", "lab3"}
    found = preflight.probes(plan, {"lab1": [29500, 41001], "lab3": [41003], "lab2": [41002]})
    assert all("lab2" not in (p.src, p.dst) for p in found)
    assert {(p.src, p.dst, p.port) for p in found} == {
        ("lab3", "lab1", 29500),
        ("lab1", "lab3", 41003),
        ("lab3", "lab1", 41001),
    }


def test_a_master_that_could_not_bind_the_rendezvous_port_gets_no_rendezvous_probes():
    plan = three_nodes()
    found = preflight.probes(plan, {"lab1": [41001], "lab2": [41002], "lab3": [41003]})
    assert found and all(p.purpose == preflight.MESH for p in found)


# ---------------------------------------------------------------- the lines


def test_failure_lines_name_both_machines_the_port_and_what_it_is_for():
    plan = three_nodes()
    rendezvous, *_ = preflight.probes(plan, {"lab1": [29500]})
    assert preflight.path_line(rendezvous, "timeout", 5.0) == (
        "lab2 cannot reach lab1 (10.0.0.1) on port 29500, the rendezvous port: "
        "no answer in 5 s (a firewall dropping it?)"
    )
    mesh = preflight.Probe("lab1", "lab3", "10.0.0.3", 41234, preflight.MESH)
    assert preflight.path_line(mesh, "refused", 5.0) == (
        "lab1 cannot reach lab3 (10.0.0.3) on port 41234, an ephemeral port gloo/NCCL connect "
        "on: connection refused (a firewall rejecting it?)"
    )
    assert preflight.path_line(mesh, "timeout", 2.5).endswith(
        "no answer in 2.5 s (a firewall dropping it?)"
    )
    assert preflight.path_line(mesh, "Bad file descriptor", 5).endswith(": Bad file descriptor")
    assert preflight.in_use_line(plan) == (
        "port 29500, the rendezvous port, is already in use on lab1 (10.0.0.1): "
        "a job still running there, or one left behind?"
    )


def test_the_first_problem_says_how_many_more_there_are():
    one = preflight.Finding("lab2", "lab2 cannot reach lab1", path=True)
    assert preflight.first_line([one]) == "lab2 cannot reach lab1"
    assert preflight.first_line([one, one]) == (
        "lab2 cannot reach lab1; 1 other path failed too (`deepfleet doctor` lists them)"
    )
    assert preflight.first_line([one, one, one]).endswith(
        "2 other paths failed too (`deepfleet doctor` lists them)"
    )
    node = preflight.Finding("lab3", "lab3: cannot start the preflight listener: ...")
    assert "; 2 other problems found too" in preflight.first_line([one, one, node])


def test_the_error_line_has_no_node_prefix_but_names_the_node():
    err = PreflightError("lab2 cannot reach lab1 (10.0.0.1) on port 29500, ...", "lab2")
    assert err.node == "lab2"
    assert err.one_line() == "lab2 cannot reach lab1 (10.0.0.1) on port 29500, ..."


# ---------------------------------------------------------------- the node module, for real


def test_listen_answers_and_a_closed_port_is_refused(listener):
    proc = listener(0, 0)
    ports = read_line(proc)["ports"]
    assert len(ports) == 2 and all(p > 0 for p in ports) and ports[0] != ports[1]
    closed = free_port()
    results = probe(*(f"{LOOPBACK}:{p}" for p in ports), f"{LOOPBACK}:{closed}")
    assert [(r["target"], r["ok"], r["error"]) for r in results] == [
        (f"{LOOPBACK}:{ports[0]}", True, None),
        (f"{LOOPBACK}:{ports[1]}", True, None),
        (f"{LOOPBACK}:{closed}", False, "refused"),
    ]
    assert all(0 <= r["seconds"] < 2 for r in results)
    assert proc.poll() is None  # still serving until --seconds pass


def test_listen_on_a_requested_port(listener):
    port = free_port()
    assert read_line(listener(port))["ports"] == [port]
    (result,) = probe(f"{LOOPBACK}:{port}")
    assert result["ok"]


def test_a_port_that_never_answers_times_out_in_the_timeout_not_one_per_target(unanswered):
    started = time.monotonic()
    results = probe(*[f"{LOOPBACK}:{unanswered}"] * 3, timeout=0.5)
    took = time.monotonic() - started
    assert [r["error"] for r in results] == ["timeout"] * 3
    assert all(0.4 < r["seconds"] < 1.5 for r in results)
    assert took < 1.5 + 1.0  # in parallel; the rest is interpreter start-up


def test_something_else_on_the_port_is_not_taken_for_the_listener():
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(1)
    port = server.getsockname()[1]
    with server:
        proc = subprocess.Popen(
            node_argv("probe", "--timeout", "2", f"{LOOPBACK}:{port}"),
            stdout=subprocess.PIPE, env=node_env(), text=True,
        )  # fmt: skip
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        out, _ = proc.communicate(timeout=10)
    (result,) = json.loads(out)["results"]
    assert result["ok"] is False and result["error"] == "unexpected answer"


def test_a_port_in_use_exits_3_with_the_error_line(listener):
    with socket.socket() as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = listener(0, port)
        assert read_line(proc) == {"error": f"port {port} is in use", "port": port}
        assert proc.wait(timeout=10) == 3


def test_the_listener_ends_by_itself(listener):
    proc = listener(0, seconds=0.5)
    read_line(proc)
    assert proc.wait(timeout=10) == 0


def test_probe_refuses_a_malformed_target():
    done = subprocess.run(node_argv("probe", "nohost"), capture_output=True, env=node_env())
    assert done.returncode == 2 and b"HOST:PORT" in done.stderr


# ---------------------------------------------------------------- the executor, on a fake session


class FakeStream:
    """exec_start(stream=True, demux=True) over a local process: (stdout, stderr) chunks."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.closed = False

    def __iter__(self):
        for line in iter(self.proc.stdout.readline, b""):
            yield line, None
        yield None, self.proc.stderr.read()

    def close(self):
        self.closed = True
        self.proc.stdout.close()
        self.proc.stderr.close()


class CannedStream:
    """A listener that says it bound `ports` and runs nothing (the port is whatever is there)."""

    def __init__(self, ports):
        self.chunks = [(json.dumps({"ports": ports}).encode() + b"\n", None)]
        self.closed = False

    def __iter__(self):
        return iter(self.chunks)

    def close(self):
        self.closed = True


class FakeNode:
    """A node container whose execs run on this machine, listening on loopback only."""

    def __init__(self, name: str, pythonpath: Path = NODE_PATH, ports=None):
        self.id = name
        self.pythonpath = pythonpath
        self.canned_ports = ports
        self.procs: list[subprocess.Popen] = []
        self.execs: dict[str, list[str]] = {}
        self.killed: list[list[str]] = []
        self.streams: list = []

    def _local(self, argv):
        assert argv[:3] == ["python", "-m", preflight.NODE_MODULE]
        return [sys.executable, "-S", *argv[1:]]

    # container.exec_run, as exec_text and the stop use it
    def exec_run(self, argv, demux=False, **_):
        if argv[0] == "pkill":
            self.killed.append(list(argv))
            for proc in self.procs:
                proc.terminate()
                proc.wait(timeout=10)
            return 0, (b"", b"")
        done = subprocess.run(
            self._local(argv), capture_output=True, env=node_env(self.pythonpath), timeout=60
        )
        return done.returncode, (done.stdout, done.stderr)

    # client.api, as the listener start uses it
    def exec_create(self, container_id, argv, **_):
        assert container_id == self.id
        exec_id = f"{self.id}-{len(self.execs)}"
        self.execs[exec_id] = list(argv)
        return {"Id": exec_id}

    def exec_start(self, exec_id, stream=False, demux=False):
        assert stream and demux
        if self.canned_ports is not None:
            self.streams.append(CannedStream(self.canned_ports))
            return self.streams[-1]
        proc = subprocess.Popen(
            [*self._local(self.execs[exec_id]), "--host", LOOPBACK],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=node_env(self.pythonpath),
        )  # fmt: skip
        self.procs.append(proc)
        self.streams.append(FakeStream(proc))
        return self.streams[-1]

    def exec_inspect(self, exec_id):
        return {"ExitCode": self.procs[-1].wait(timeout=10)}

    def reap(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if not pipe.closed:
                    pipe.close()


class FakeSession:
    def __init__(self, nodes: dict[str, FakeNode], gone=()):
        self.nodes = nodes
        self.gone = set(gone)
        self.clients = {name: SimpleNamespace(api=node) for name, node in nodes.items()}

    def container(self, name):
        if name in self.gone:
            raise docker.errors.NotFound("No such container: deepfleet-node")
        return self.nodes[name]


def loopback_plan(names=("lab1", "lab2", "lab3"), master_port: int | None = None) -> ClusterPlan:
    """Every node on 127.0.0.1; a free rendezvous port, since 29500 may be taken here."""
    nodes = tuple(PlannedNode(n, LOOPBACK, 1, "cpu", 0) for n in names)
    port = master_port or free_port()
    return ClusterPlan(nodes=nodes, master_addr=LOOPBACK, master_port=port, backend="gloo")


@pytest.fixture
def fake():
    made = []

    def make(plan, **options):
        nodes = {n.name: FakeNode(n.name, **options.get(n.name, {})) for n in plan.nodes}
        made.extend(nodes.values())
        return FakeSession(nodes, options.get("gone", ()))

    yield make
    for node in made:
        node.reap()


def assert_nothing_left(session: FakeSession):
    for name, node in session.nodes.items():
        assert node.killed == [list(preflight.KILL)], name
        assert all(proc.poll() is not None for proc in node.procs), name
        assert all(stream.closed for stream in node.streams), name


def test_a_healthy_cluster_passes_in_a_couple_of_seconds(fake):
    plan = loopback_plan()
    session = fake(plan)
    out = io.StringIO()
    started = time.monotonic()
    checked = preflight.run(session, plan, timeout=2.0, out=out)
    assert time.monotonic() - started < 5
    assert len(checked) == 8
    assert {p.src for p in checked if p.purpose == preflight.RENDEZVOUS} == {"lab2", "lab3"}
    assert out.getvalue().startswith("deepfleet: preflight: 8 paths between 3 machines answer")
    master_listen = next(iter(session.nodes["lab1"].execs.values()))
    assert master_listen[master_listen.index("--seconds") + 1] == "16"  # timeout*3+10
    assert_nothing_left(session)
    # the rendezvous port is free again for the job
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind((LOOPBACK, plan.master_port))


def test_a_refused_mesh_port_ends_in_one_line_naming_both_machines(fake):
    plan = loopback_plan()
    closed = free_port()
    session = fake(plan, lab3={"ports": [closed]})
    with pytest.raises(PreflightError) as caught:
        preflight.run(session, plan, timeout=2.0, out=io.StringIO())
    assert caught.value.node == "lab1"
    assert caught.value.one_line() == (
        f"lab1 cannot reach lab3 (127.0.0.1) on port {closed}, an ephemeral port gloo/NCCL "
        "connect on: connection refused (a firewall rejecting it?); 1 other path failed too "
        "(`deepfleet doctor` lists them)"
    )
    assert_nothing_left(session)


def test_a_dropped_rendezvous_port_ends_in_one_line_in_seconds(fake, unanswered):
    plan = loopback_plan(("lab1", "lab2"), master_port=unanswered)
    session = fake(plan, lab1={"ports": [unanswered]})  # the master "bound" a port that drops
    started = time.monotonic()
    with pytest.raises(PreflightError) as caught:
        preflight.run(session, plan, timeout=0.5, out=io.StringIO())
    assert time.monotonic() - started < 4
    assert caught.value.node == "lab2"
    assert caught.value.one_line() == (
        f"lab2 cannot reach lab1 (127.0.0.1) on port {unanswered}, the rendezvous port: "
        "no answer in 0.5 s (a firewall dropping it?)"
    )


def test_a_taken_rendezvous_port_is_named_and_the_mesh_still_checked(fake):
    plan = loopback_plan()
    session = fake(plan)
    with socket.socket() as busy:
        busy.bind((LOOPBACK, plan.master_port))
        busy.listen(1)
        checked, findings = preflight.check(session, plan, timeout=2.0)
        with pytest.raises(PreflightError) as caught:
            preflight.run(session, plan, timeout=2.0, out=io.StringIO())
    assert [f.line for f in findings] == [preflight.in_use_line(plan)]
    assert len(checked) == 6 and all(p.purpose == preflight.MESH for p in checked)
    assert caught.value.node == "lab1"
    assert caught.value.one_line() == (
        f"port {plan.master_port}, the rendezvous port, is already in use on lab1 (127.0.0.1): "
        "a job still running there, or one left behind?"
    )
    assert all(proc.poll() is not None for node in session.nodes.values() for proc in node.procs)


def test_one_machine_checks_only_that_the_rendezvous_port_is_free(fake):
    plan = loopback_plan(("solo",))
    session = fake(plan)
    out = io.StringIO()
    assert preflight.run(session, plan, timeout=1.0, out=out) == []
    assert f"port {plan.master_port} is free on solo" in out.getvalue()
    with socket.socket() as busy:
        busy.bind((LOOPBACK, plan.master_port))
        busy.listen(1)
        with pytest.raises(PreflightError, match="already in use on solo"):
            preflight.run(session, plan, timeout=1.0, out=io.StringIO())


def test_an_image_without_the_module_and_a_gone_container_are_one_line_each(fake, tmp_path):
    old = tmp_path / "old-image"
    (old / "deepfleet_node").mkdir(parents=True)
    (old / "deepfleet_node" / "__init__.py").write_text("")
    plan = loopback_plan()
    session = fake(plan, lab2={"pythonpath": old}, gone={"lab3"})
    checked, findings = preflight.check(session, plan, timeout=1.0)
    lines = {f.node: f.line for f in findings}
    assert lines == {
        "lab2": "lab2: its node image has no preflight (built before this deepfleet): "
        "rebuild it (`make images`) and `deepfleet up` again",
        "lab3": "lab3: cannot start the preflight listener: its deepfleet container is gone "
        "(`deepfleet down`, then `deepfleet up`)",
    }
    assert checked == []  # lab1 is the only node listening, and nobody else could probe it


def test_doctor_lists_every_failed_path_or_one_ok_line(fake):
    plan = loopback_plan()
    closed = free_port()
    checks = doctor.network_checks(fake(plan, lab2={"ports": [closed]}), plan, timeout=1.0)
    assert [(c.node, c.name, c.level) for c in checks] == [
        ("lab1", "network", "FAIL"),
        ("lab3", "network", "FAIL"),
    ]
    assert checks[1].line() == (
        f"[lab3] FAIL network: lab3 cannot reach lab2 (127.0.0.1) on port {closed}, an ephemeral "
        "port gloo/NCCL connect on: connection refused (a firewall rejecting it?)"
    )
    (ok,) = doctor.network_checks(fake(plan), plan, timeout=1.0)
    assert (ok.node, ok.level) == ("lab1", "ok")
    assert ok.detail.startswith("8 paths between 3 machines answer")


def test_a_taken_rendezvous_port_comes_before_the_paths_that_failed(fake):
    plan = loopback_plan()
    session = fake(plan, lab3={"ports": [free_port()]})
    with socket.socket() as busy:
        busy.bind((LOOPBACK, plan.master_port))
        busy.listen(1)
        with pytest.raises(PreflightError) as caught:
            preflight.run(session, plan, timeout=1.0, out=io.StringIO())
    assert caught.value.node == "lab1"
    assert caught.value.one_line() == (
        f"{preflight.in_use_line(plan)}; 2 other paths failed too (`deepfleet doctor` lists them)"
    )
