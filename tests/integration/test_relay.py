"""The image relay on the lab's machines: sent from here once, passed machine to machine.

The session cluster's `up` already relays the node image to three fresh machines
(test_cluster checks its figures); here a small image nobody holds shows the relay's
bytes and its fallback when one machine cannot reach the next.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import tarfile
import time

import pytest
from labtools import lab_index

from deepfleet import progress
from deepfleet.images import fanout, relay
from deepfleet.inventory.sshconfig import resolve
from deepfleet.machines.connect import connect

pytestmark = pytest.mark.lab
PAYLOAD_MB = 24


def _fresh_image(outer_docker, tag: str):
    """A one-layer image no lab machine holds (random bytes do not dedupe)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = os.urandom(PAYLOAD_MB << 20)
        info = tarfile.TarInfo("payload.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    outer_docker.api.import_image_from_data(buf.getvalue(), repository=tag)
    return outer_docker.images.get(tag)


@pytest.fixture
def machines(cluster):
    nodes = resolve([n.name for n in cluster.lab.nodes], cluster.lab.ssh_config).nodes
    clients = {n.name: connect(n) for n in nodes}
    yield nodes, clients
    for client in clients.values():
        client.close()


def _relay(outer_docker, machines, ref, out=None):
    nodes, clients = machines
    plan = fanout.plan_images(
        {n.name: ref for n in nodes},
        {ref: outer_docker.images.get(ref).id},
        {},
        {n.name: n.host for n in nodes},
    )
    assert [c.nodes for c in plan.chains] == [("lab1", "lab2", "lab3")]
    out = out if out is not None else io.StringIO()
    lines = []
    outcome = fanout.put_images(
        outer_docker, clients, plan, lines.append, progress.Board(out, tty=False)
    )
    return outcome, lines


def _cleanup(outer_docker, clients, ref):
    for client in clients.values():
        try:
            client.images.remove(ref, force=True)
        except Exception:
            pass
    outer_docker.images.remove(ref, force=True)


def _no_relay_left(clients):
    for name, client in clients.items():
        left = client.containers.list(all=True, filters={"name": relay.RELAY_CONTAINER})
        assert not left, f"{name} kept a relay container"


def test_relay_sends_one_image_from_here_for_three_machines(cluster, outer_docker, machines):
    ref = "deepfleet-test/relay:1"
    image = _fresh_image(outer_docker, ref)
    _, clients = machines
    try:
        outcome, lines = _relay(outer_docker, machines, ref)
        assert not outcome.errors, outcome.errors
        assert {r.action for r in outcome.results.values()} == {"relayed"}, lines
        for name, client in clients.items():
            assert client.images.get(ref).id == image.id, name
        size = PAYLOAD_MB << 20
        assert size <= outcome.sent_here <= 1.1 * size + (1 << 20), outcome.sent_here
        _no_relay_left(clients)
    finally:
        _cleanup(outer_docker, clients, ref)


def test_a_machine_its_neighbour_cannot_reach_gets_the_image_straight_from_here(
    cluster, outer_docker, machines
):
    ref = "deepfleet-test/relay:2"
    image = _fresh_image(outer_docker, ref)
    _, clients = machines
    lab3 = next(n for n in cluster.lab.nodes if n.name == "lab3")
    container = f"deepfleet-lab-{lab_index(lab3)}"
    block = ["iptables", "-I", "INPUT", "-p", "tcp", "--dport", str(relay.RELAY_PORT), "-j", "DROP"]
    subprocess.run(["docker", "exec", container, *block], check=True)
    try:
        outcome, lines = _relay(outer_docker, machines, ref)
        assert not outcome.errors, outcome.errors
        actions = {name: r.action for name, r in outcome.results.items()}
        assert actions == {"lab1": "relayed", "lab2": "relayed", "lab3": "streamed"}, lines
        said = [line for line in lines if line.startswith("[lab3]")]
        assert said and "cannot reach" in said[0] and "straight from here" in said[0], lines
        for name, client in clients.items():
            assert client.images.get(ref).id == image.id, name
        _no_relay_left(clients)
    finally:
        unblock = [block[0], "-D", *block[2:]]
        subprocess.run(["docker", "exec", container, *unblock], check=False)
        _cleanup(outer_docker, clients, ref)


def _refused(sock: socket.socket) -> bool:
    """Whether the far end closed the connection (within 15 s) instead of taking it."""
    sock.settimeout(15)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_stranger_connecting_first_is_refused_and_the_transfer_completes(
    cluster, outer_docker, machines, monkeypatch
):
    """A stranger (here: this machine, which is not lab2) reaches lab3's relay port before
    lab2 does, once with bytes that are not the secret, once saying nothing and holding on:
    the first is closed and named, the second blocks nothing, and lab3 still loads the
    image from lab2, untouched by either."""
    ref = "deepfleet-test/relay:3"
    image = _fresh_image(outer_docker, ref)
    nodes, clients = machines
    lab3 = next(n for n in nodes if n.name == "lab3")
    strangers: list[socket.socket] = []
    seen = {}

    class Intruded(relay._HopRun):
        def __init__(self, hop, *args, **kw):
            super().__init__(hop, *args, **kw)
            if hop.node != "lab3":
                return
            assert self.ready.wait(relay.READY_TIMEOUT) and not self.ended.is_set()
            quiet = socket.create_connection((lab3.host, relay.RELAY_PORT), timeout=10)
            strangers.append(quiet)  # says nothing, holds on until the end
            loud = socket.create_connection((lab3.host, relay.RELAY_PORT), timeout=10)
            strangers.append(loud)
            seen["addr"] = loud.getsockname()[0]
            try:
                loud.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(1 << 16))
            except OSError:
                pass  # closed on us already
            seen["closed"] = _refused(loud)
            deadline = time.monotonic() + 10
            while not self.refused and time.monotonic() < deadline:
                time.sleep(0.1)

    monkeypatch.setattr(relay, "_HopRun", Intruded)
    out = io.StringIO()
    try:
        outcome, lines = _relay(outer_docker, machines, ref, out)
        shown = out.getvalue().splitlines()
        assert not outcome.errors, outcome.errors
        actions = {name: r.action for name, r in outcome.results.items()}
        assert actions == {"lab1": "relayed", "lab2": "relayed", "lab3": "relayed"}, lines
        assert seen["closed"], "lab3 kept the stranger's connection"
        said = [x for x in shown if x.startswith("[lab3] relay: refused")]
        assert said, shown
        assert f"from {seen['addr']}:" in said[0] and "secret" in said[0], said
        for name, client in clients.items():
            assert client.images.get(ref).id == image.id, name
        size = PAYLOAD_MB << 20
        assert size <= outcome.sent_here <= 1.1 * size + (1 << 20), outcome.sent_here
        _no_relay_left(clients)
    finally:
        for sock in strangers:
            sock.close()
        _cleanup(outer_docker, clients, ref)
