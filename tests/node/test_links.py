"""deepfleet_node.links on loopback: the listener answers only its secret, the prober
measures both ways and the round trip, and every part ends in bounded time."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time

import pytest

from deepfleet_node import links

LOOPBACK = "127.0.0.1"
SECRET = "a1b2c3d4e5f60718293a4b5c6d7e8f90"


def env(secret: str | None = SECRET) -> dict:
    out = {k: v for k, v in os.environ.items() if k != links.SECRET_ENV}
    if secret is not None:
        out[links.SECRET_ENV] = secret
    return out


def first_line(proc: subprocess.Popen, timeout: float = 10.0) -> dict:
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        assert selector.select(timeout), "the listener printed nothing"
    return json.loads(proc.stdout.readline())


@pytest.fixture
def listener():
    procs = []

    def start(seconds: float = 30.0, secret: str | None = SECRET):
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepfleet_node.links", "serve", "--host", LOOPBACK,
             "--seconds", str(seconds)],
            env=env(secret), stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(proc)
        return proc, first_line(proc)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


def closed(s: socket.socket) -> bool:
    """The listener closed it (a reset: it did not read what the stranger sent)."""
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def probe(port: int, secret: str = SECRET, *args: str, timeout: float = 60) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "deepfleet_node.links", "probe", f"{LOOPBACK}:{port}", *args],
        env=env(secret), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # one JSON line
    return json.loads(lines[0])


def test_the_prober_measures_both_ways_and_the_round_trip(listener):
    proc, answer = listener()
    assert answer["pid"] == proc.pid
    result = probe(answer["port"], SECRET, "--seconds", "0.3")
    assert result["ok"] and result["error"] is None, result
    assert result["a_to_b_bps"] > 10e6 and result["b_to_a_bps"] > 10e6  # loopback: fast
    assert 0 < result["rtt_s"] < 0.05
    assert result["seconds"] < 5


def test_a_wrong_secret_is_refused_and_the_listener_counts_it(listener):
    proc, answer = listener(seconds=3)
    result = probe(answer["port"], "not-the-secret")
    assert not result["ok"] and result["error"] == links.WRONG_SECRET
    assert result["a_to_b_bps"] is None and result["rtt_s"] is None
    # a stranger speaking anything else, and one that says nothing, are closed too
    with socket.create_connection((LOOPBACK, answer["port"]), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert s.recv(100) == links.REFUSED and closed(s)
    started = time.monotonic()
    with socket.create_connection((LOOPBACK, answer["port"]), timeout=10) as s:
        assert s.recv(100) == links.REFUSED and closed(s)
    assert time.monotonic() - started < links.DEFAULT_TIMEOUT + 2
    proc.wait(15)  # exits by itself after its seconds
    assert json.loads(proc.stdout.readline()) == {"refused": 3}


def test_the_secret_is_compared_whole():
    assert links.parse_header(links.header(SECRET, "ping"), SECRET) == ("ping", [])
    assert links.parse_header(links.header(SECRET[:-1], "ping"), SECRET) is None
    assert links.parse_header(links.header(SECRET + "0", "ping"), SECRET) is None
    assert links.parse_header(b"deepfleet-link/1\n", SECRET) is None
    assert links.parse_header(b"\xff\xfe junk\n", SECRET) is None


def test_no_secret_no_listener():
    done = subprocess.run(
        [sys.executable, "-m", "deepfleet_node.links", "serve", "--seconds", "5"],
        env=env(None), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == links.EXIT_NO_SECRET
    assert "no secret" in json.loads(done.stdout)["error"]


def test_a_direction_stops_at_its_bytes_or_its_seconds(listener):
    _, answer = listener()
    port = answer["port"]
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.sendall(links.header(SECRET, "source", 1_000_000, 30))
        assert links._read_line(s) == links.OK
        started = time.monotonic()
        total = 0
        while chunk := s.recv(1 << 16):
            total += len(chunk)
        assert total == 1_000_000 and time.monotonic() - started < 5
    started = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.settimeout(10)
        s.sendall(links.header(SECRET, "source", 1 << 40, 0.3))  # a terabyte: time ends it
        assert links._read_line(s) == links.OK
        while s.recv(1 << 16):
            pass
    assert time.monotonic() - started < 5


def test_a_listener_that_never_answers_costs_a_bounded_time():
    with socket.socket() as silent:  # accepts (the kernel does) and never says a word
        silent.bind((LOOPBACK, 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = probe(port, SECRET, "--timeout", "1", timeout=30)
        took = time.monotonic() - started
    assert not result["ok"] and result["error"] == "timeout"
    assert took < 10, took


def test_nothing_listening_is_one_error():
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    result = probe(port, SECRET, "--timeout", "1")
    assert not result["ok"] and result["error"] == "refused"


def test_a_bad_target_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "deepfleet_node.links", "probe", "nohostport"],
        env=env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "HOST:PORT" in done.stderr
