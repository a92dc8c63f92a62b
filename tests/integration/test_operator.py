"""The operator's tools on the lab cluster: quiet job output with everything kept in each
machine's job log, `logs -f` from a second process while a job runs, `exec`, `shell` on a
real pseudo-terminal, and `status --json` against its schema."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time

import jsonschema
import pytest
from labtools import DEEPFLEET, ROOT

from deepfleet.health import status as status_module

pytestmark = pytest.mark.lab

JOB = "oplogs"
DS_CHATTER = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING)\]")


def _popen(cluster, *args):
    return subprocess.Popen(
        [*DEEPFLEET, *args], env=cluster.env(), cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _read_until(proc, pattern: re.Pattern, timeout: float) -> str:
    """What proc printed until a line matches pattern (or it ends, or time runs out)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if pattern.search(line):
            break
    return "".join(seen)


@pytest.fixture(scope="module")
def followed(cluster):
    """A training job, and `deepfleet logs -f` started from a second process while it runs."""
    train = _popen(cluster, "train", "--run", JOB, "--steps", "30", "--log-every", "5")
    follower = None
    try:
        head = _read_until(train, re.compile(r"deepfleet: job oplogs: "), 600)
        assert "deepfleet: job oplogs: " in head, head[-3000:]
        follower = _popen(cluster, "logs", "-f")  # the current job, as a second terminal asks
        followed = _read_until(follower, re.compile(r"^\[lab\d\] step 10/30 "), 600)
        rest, _ = train.communicate(timeout=900)
        assert train.returncode == 0, (head + rest)[-4000:]
    finally:
        for proc in (train, follower):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    return head + rest, followed


def test_the_terminal_shows_progress_without_the_libraries_chatter(followed):
    terminal, _ = followed
    assert re.search(r"^\[lab\d\] step 30/30 loss ", terminal, re.M), terminal[-3000:]
    assert not DS_CHATTER.search(terminal), terminal[-3000:]
    assert "spawned with command" not in terminal


def test_logs_follow_shows_every_machine_and_the_chatter_while_the_job_runs(followed):
    _, followed_lines = followed
    assert re.search(r"^\[lab\d\] step 10/30 ", followed_lines, re.M), followed_lines[-3000:]
    for name in ("lab1", "lab2", "lab3"):
        assert f"[{name}] === {JOB} rank " in followed_lines, followed_lines[-3000:]
    assert DS_CHATTER.search(followed_lines), followed_lines[-3000:]  # kept in the logs


def test_logs_after_the_job_of_one_machine_only(cluster, followed):
    result = cluster.run("logs", "lab2", "--job", JOB)
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("[lab2] ") for line in lines), result.stdout[-2000:]
    assert any(DS_CHATTER.search(line) for line in lines)
    missing = cluster.run("logs", "--job", "never-ran", check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "deepfleet: no logs of job 'never-ran' on lab1, lab2, lab3"
    ]


def test_status_json_follows_its_schema_and_shows_the_job(cluster, followed):
    current = json.loads(cluster.run("status", "--json").stdout)
    jsonschema.validate(current, status_module.schema())
    assert [n["state"] for n in current["nodes"]] == ["running"] * 3
    job = current["job"]
    assert job["name"] == JOB and job["running"] is False
    assert job["step"] == job["steps"] == 30 and job["loss"] > 0
    table = cluster.run("status").stdout
    assert f"job {JOB}: not running" in table and "step 30/30 loss " in table


def test_exec_runs_in_the_machines_container_and_passes_its_exit_status(cluster):
    result = cluster.run(
        "exec", "lab2", "--", "sh", "-c", "cat /etc/hostname; pwd; echo oops >&2; exit 7",
        check=False,
    )  # fmt: skip
    assert result.returncode == 7
    hostname = cluster.node_exec(1, ["cat", "/etc/hostname"])[1].strip()
    assert result.stdout.split() == [hostname, "/workspace"]
    assert result.stderr.strip() == "oops"
    missing = cluster.run("exec", "lab2", "--", "no-such-tool", check=False)
    assert missing.returncode == 127 and "no-such-tool" in missing.stderr
    unknown = cluster.run("exec", "lab9", "--", "true", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().startswith("deepfleet: no machine 'lab9' in this cluster")


def test_shell_is_an_interactive_terminal_in_the_container(cluster):
    pid, fd = pty.fork()
    if pid == 0:  # the child: deepfleet on the pseudo-terminal, as a person types it
        os.environ.update(cluster.env())
        os.chdir(ROOT)
        os.execvp(DEEPFLEET[0], [*DEEPFLEET, "shell", "lab3"])
    out = b""
    try:
        os.write(fd, b"tty; echo answer=$((6*7)); cat /etc/hostname; exit 3\n")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the terminal closed: the shell ended
                break
            if not chunk:
                break
            out += chunk
    finally:
        _, code = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    # a real terminal inside (bash's bracketed-paste escape may come first on the line)
    assert re.search(r"(^|\r)/dev/pts/\d+\r?$", text, re.M), text
    assert "answer=42" in text
    assert cluster.node_exec(2, ["cat", "/etc/hostname"])[1].strip() in text
    assert os.waitstatus_to_exitcode(code) == 3


def _rows(doctor_stdout: str) -> list[tuple[str, str, str]]:
    """(machine, check, mark) of each row of doctor's table; details hold timings."""
    rows = []
    for line in doctor_stdout.splitlines():
        cells = line.split(None, 3)
        if len(cells) >= 3 and cells[2] in ("✓", "!", "✗", "ok", "warn", "FAIL"):
            rows.append(tuple(cells[:3]))
    return rows


def test_a_cluster_file_from_init_reaches_the_same_machines_as_nodes(cluster, tmp_path):
    path = tmp_path / "cluster.yaml"
    made = cluster.run("init", "--out", str(path))  # from the cluster that is up
    assert "wrote" in made.stdout and "(3 machines)" in made.stdout
    names = [n.name for n in cluster.lab.nodes]
    by_words = cluster.run("doctor", "--ssh-config", str(cluster.lab.ssh_config), *names,
                           check=False)  # fmt: skip
    by_file = cluster.run("doctor", "--cluster-file", str(path), check=False)
    assert by_words.returncode == by_file.returncode
    rows = _rows(by_words.stdout)
    assert {machine for machine, _, _ in rows} >= set(names), by_words.stdout
    assert _rows(by_file.stdout) == rows, by_file.stdout
