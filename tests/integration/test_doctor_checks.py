"""doctor's table on the session cluster: every machine passes (disk, memlock, clock and the
rest), then one machine whose engine is out of reach while its sshd answers fails on that
machine alone, naming the cause.

A lab machine's dockerd cannot be stopped on its own: the machine's entrypoint execs it
under tini (docker/lab/entrypoint.sh), so the machine would stop with it. The socket is
moved aside instead, which is what a client sees of an engine `systemctl stop docker`
stopped (no socket to connect to); dockerd itself runs on, so doctor says the socket is
missing though dockerd runs. Moving it back restores the engine as it was.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass

import pytest

pytestmark = pytest.mark.lab

SOCKET = "/var/run/docker.sock"
HIDDEN = "/var/run/docker.sock.doctor-test"
MARKS = {"✓": "ok", "!": "warn", "✗": "FAIL"}
MACHINE_CHECKS = {"ssh+docker", "gpus", "image", "disk", "memlock", "clock", "ports"}
SUMMARY = re.compile(r"^doctor: (\d+) checks, (\d+) failed, (\d+) warnings?$", re.MULTILINE)


@dataclass
class Row:
    machine: str
    check: str
    mark: str
    detail: str
    fix: str = ""


def table(stdout: str) -> list[Row]:
    """doctor.render's rows: MACHINE CHECK MARK DETAIL, a `fix:` line under some."""
    rows: list[Row] = []
    for line in stdout.splitlines():
        if line.startswith(" ") and line.strip().startswith("fix: ") and rows:
            rows[-1].fix = line.strip()[len("fix: ") :]
            continue
        cells = line.split(None, 3)
        if len(cells) == 4 and cells[2] in MARKS:
            rows.append(Row(*cells))
    return rows


def on_machine(node, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run argv on a lab machine itself (outside its node container)."""
    result = subprocess.run(
        ["docker", "exec", node.container, *argv], capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def engine_answers(node) -> bool:
    return (
        on_machine(node, "docker", "info", "--format", "{{.ServerVersion}}", check=False).returncode
        == 0
    )


def doctor(cluster, monkeypatch, check: bool) -> subprocess.CompletedProcess:
    # the marks, not the ASCII words, whatever this environment's locale says
    monkeypatch.setenv("PYTHONIOENCODING", "utf-8")
    return cluster.run("doctor", check=check, timeout=300)


def test_doctor_passes_every_machine_with_a_mark_per_check(cluster, monkeypatch):
    result = doctor(cluster, monkeypatch, check=True)
    out = result.stdout
    rows = table(out)
    assert "✗" not in out, out
    for node in cluster.lab.nodes:
        mine = {r.check: r for r in rows if r.machine == node.name}
        assert MACHINE_CHECKS <= set(mine), (node.name, out)
        assert all(r.mark in ("✓", "!") for r in mine.values()), out
        for name in ("ssh+docker", "gpus", "image", "clock", "ports"):
            assert mine[name].mark == "✓", (node.name, name, out)
        assert "free on " in mine["disk"].detail, out
        # the machines share this host's kernel clock
        assert mine["clock"].detail.startswith("within "), out
        if mine["memlock"].mark == "!":  # lab machines run without CAP_SYS_RESOURCE
            assert "CAP_SYS_RESOURCE" in mine["memlock"].detail, out
    assert all(r.fix for r in rows if r.mark == "!"), out
    assert any(r.check == "network" and r.mark == "✓" for r in rows), out
    total, failed, warned = map(int, SUMMARY.search(out).groups())
    assert (total, failed, warned) == (len(rows), 0, sum(r.mark == "!" for r in rows)), out


def test_an_engine_out_of_reach_fails_that_machine_alone_naming_the_cause(cluster, monkeypatch):
    lab2 = cluster.lab.nodes[1]
    assert lab2.name == "lab2" and engine_answers(lab2)
    on_machine(lab2, "mv", SOCKET, HIDDEN)
    try:
        result = doctor(cluster, monkeypatch, check=False)
        out = result.stdout
        assert result.returncode == 1, out + result.stderr
        rows = table(out)
        failed = [r for r in rows if r.mark == "✗"]
        assert [(r.machine, r.check) for r in failed] == [("lab2", "engine")], out
        (row,) = failed
        assert row.detail.startswith(
            f"engine not reachable on lab2 (ssh works; {SOCKET} is missing, though dockerd "
            "runs as pid "
        ), out
        assert "systemctl restart docker" in row.fix, out
        assert [r.check for r in rows if r.machine == "lab2"] == ["engine"], out
        for node in (cluster.lab.nodes[0], cluster.lab.nodes[2]):
            mine = {r.check: r.mark for r in rows if r.machine == node.name}
            assert MACHINE_CHECKS <= set(mine) and "✗" not in mine.values(), out
        # the cluster's network check needs every machine: a warning, lab2's row says why
        assert [(r.machine, r.mark) for r in rows if r.check == "network"] == [("cluster", "!")], (
            out
        )
        assert SUMMARY.search(out).group(2) == "1", out
    finally:
        on_machine(lab2, "sh", "-c", f"[ -S {HIDDEN} ] && mv {HIDDEN} {SOCKET}", check=False)
        deadline = time.monotonic() + 30
        while not engine_answers(lab2) and time.monotonic() < deadline:
            time.sleep(1)
    assert engine_answers(lab2)
    assert SUMMARY.search(doctor(cluster, monkeypatch, check=True).stdout).group(2) == "0"
