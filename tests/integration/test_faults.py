"""What makes a real LAN different from the happy path, on the 3-machine lab: machines that
freeze or stop answering, firewalls, signals, restarted machines, a stalled image load,
inputs as people have them, environment for the ranks, and a failed `up`.

Each fault is timed from the moment it is made to the job's last line; the figures land in
.lab-faults.jsonl at the repository root (for the README and the closing notes).
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from labtools import (
    DEEPFLEET,
    NODE_ENV,
    ROOT,
    ranks_gone,
    running_ranks,
    steps,
    train_until_step,
)

pytestmark = pytest.mark.lab

NODE = "deepfleet-node"
LIVENESS = "20"  # seconds: short so the lab finds a frozen machine quickly
LONG_TRAIN = ["train", "--run", "faults", "--steps", "100000", "--log-every", "20"]


def record(case: str, seconds: float, line: str) -> None:
    with (ROOT / ".lab-faults.jsonl").open("a") as fh:
        fh.write(json.dumps({"case": case, "seconds": round(seconds, 1), "line": line}) + "\n")


def lab_machine(cluster, index: int) -> str:
    return cluster.lab.nodes[index].container


def on_machine(cluster, index: int, *argv: str, check: bool = True) -> str:
    """Run argv on lab machine `index` itself (outside its node container)."""
    result = subprocess.run(
        ["docker", "exec", lab_machine(cluster, index), *argv],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def unpause_node(cluster, index: int) -> None:
    """`docker unpause` of a machine's node container, made sure of.

    On hosts with the legacy (v1) cgroup freezer, runc's thaw can wait for ever on a freeze
    it sees as unfinished, and every later job on that machine hangs behind it. The node
    container's cgroup sits under the lab machine's cgroup parent, so it is thawed from
    here, where the docker call does not return."""
    machine = lab_machine(cluster, index)
    argv = ["docker", "exec", machine, "docker", "unpause", NODE]
    try:
        subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return
    except subprocess.TimeoutExpired:
        pass
    for path in glob.glob(f"/sys/fs/cgroup/freezer/{machine}/*/freezer.state"):
        Path(path).write_text("THAWED")
    for path in glob.glob(f"/sys/fs/cgroup/{machine}/*/cgroup.freeze"):
        Path(path).write_text("0")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        paused = subprocess.run(
            ["docker", "exec", machine, "docker", "inspect", "-f", "{{.State.Paused}}", NODE],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        if paused == "false":
            return
        subprocess.run(argv, capture_output=True, text=True, timeout=30)
        time.sleep(1)
    raise AssertionError(f"{machine}: its node container stays paused")


def last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


def finish(proc, seen, timeout=300) -> tuple[str, str]:
    rest, err = proc.communicate(timeout=timeout)
    return "".join(seen) + rest, err


def states(cluster) -> dict[str, str]:
    status = json.loads(cluster.run("status", "--json").stdout)
    return {n["node"]: n["state"] for n in status["nodes"]}


# ------------------------------------------------------------------ environment


def test_node_environment_reaches_every_rank_on_every_machine(cluster):
    """Ranks start in sshd sessions; sshd keeps one SetEnv line, so all of it must be there."""
    hostfile = "".join(f"{n.ip} slots=1\n" for n in cluster.lab.nodes)
    code, out = cluster.node_exec(0, ["sh", "-c", f"printf '{hostfile}' > /tmp/env-hostfile"])
    assert code == 0, out
    master = cluster.lab.nodes[0].ip
    code, out = cluster.node_exec(
        0,
        ["deepspeed", "--hostfile", "/tmp/env-hostfile", "--ssh_port", "2222",
         "--master_addr", master, "--master_port", "29511", "--no_python", "--no_local_rank",
         "/usr/bin/printenv", *NODE_ENV, "RANK"],
    )  # fmt: skip
    assert code == 0, out
    for rank, node in enumerate(cluster.lab.nodes):
        seen = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(node.ip)]
        for value in NODE_ENV.values():
            assert value in seen, (node.name, out[-3000:])
        assert str(rank) in seen, (node.name, seen)


# ------------------------------------------------------------------ network


def test_a_blocked_rendezvous_port_fails_in_seconds_naming_both_machines(cluster):
    rule = ["OUTPUT", "-p", "tcp", "--dport", "29500", "-j", "DROP"]
    on_machine(cluster, 1, "iptables", "-I", *rule)
    try:
        start = time.monotonic()
        result = cluster.run("train", "--run", "fw", "--steps", "5", check=False, timeout=300)
        took = time.monotonic() - start
        line = last_line(result.stderr)
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr
        master = cluster.lab.nodes[0]
        assert line == (
            f"deepfleet: lab2 cannot reach lab1 ({master.ip}) on port 29500, the rendezvous "
            "port: no answer in 5 s (a firewall dropping it?)"
        ), result.stderr
        assert "deepfleet: job " not in result.stdout  # nothing was launched (the job's first line)
        assert running_ranks(cluster) == []
        doctor = cluster.run("doctor", check=False)
        assert doctor.returncode == 1
        assert re.search(
            r"^\S+\s+network\s+(✗|FAIL)\s+lab2 cannot reach lab1", doctor.stdout, re.M
        ), doctor.stdout
        record("firewall drops 29500 from lab2", took, line)
    finally:
        on_machine(cluster, 1, "iptables", "-D", *rule)
    assert ", 0 failed" in cluster.run("doctor").stdout


# ------------------------------------------------------------------ liveness


def fault_during_training(cluster, make_fault, undo_fault) -> tuple[float, str, str]:
    """Train until step 20, make the fault, and wait for the job to end by itself.

    (seconds from the fault to the job's end, its last stderr line, everything it printed);
    the fault is undone however the wait ends.
    """
    proc, seen = train_until_step(
        cluster, [*LONG_TRAIN, "--liveness-timeout", LIVENESS], 20, stderr=subprocess.PIPE
    )
    start = time.monotonic()
    make_fault()
    try:
        output, err = finish(proc, seen)
        took = time.monotonic() - start
        assert proc.returncode == 1, output[-3000:] + err
        return took, last_line(err), output
    finally:
        undo_fault()


def test_a_frozen_node_container_ends_the_job_naming_its_machine(cluster):
    def freeze():
        on_machine(cluster, 2, "docker", "pause", NODE)

    shown = []

    def thaw():
        try:
            shown.append(states(cluster)["lab3"])  # what status says while it lasts
        finally:
            unpause_node(cluster, 2)

    took, line, _ = fault_during_training(cluster, freeze, thaw)
    assert shown == ["paused"]
    assert line.startswith("deepfleet: lab3: its node container is frozen (paused)"), line
    assert took < 60, took
    record("lab3's node container frozen (docker pause)", took, line)
    # the frozen machine's ranks find their peers gone once it thaws
    assert ranks_gone(cluster, within=90) == []


def test_a_machine_that_stops_answering_ends_the_job_within_the_liveness_bound(cluster):
    """The whole machine freezes (its sshd, engine and node container): nothing answers."""

    def freeze():
        on_machine(cluster, 2, "docker", "pause", NODE)
        subprocess.run(["docker", "pause", lab_machine(cluster, 2)], check=True, timeout=60)

    def thaw():
        subprocess.run(["docker", "unpause", lab_machine(cluster, 2)], timeout=60)
        unpause_node(cluster, 2)

    took, line, _ = fault_during_training(cluster, freeze, thaw)
    assert line.startswith("deepfleet: lab3: stopped answering for "), line
    assert "the ranks on the other nodes were stopped" in line
    assert took < float(LIVENESS) + 60, took
    record("lab3 stops answering (machine frozen)", took, line)
    # what could be reached was stopped; the thawed machine's launcher may outlive its
    # peers, and `deepfleet stop` (or the next job's clean slate) ends it
    cluster.run("stop")
    assert ranks_gone(cluster, within=30) == []


def test_a_stopped_rank_process_is_found_by_its_heartbeat(cluster):
    """lab2 answers, but its rank no longer runs (SIGSTOP): only its heartbeat tells."""

    def stop_rank():
        code, out = cluster.node_exec(
            1, ["pkill", "-STOP", "-f", "deepfleet_node.train --local_rank"]
        )
        assert code == 0, out

    def resume_rank():
        cluster.node_exec(1, ["pkill", "-CONT", "-f", "deepfleet_node.train"])

    took, line, _ = fault_during_training(cluster, stop_rank, resume_rank)
    assert line.startswith("deepfleet: lab2: rank 1 stopped making progress: no heartbeat"), line
    record("lab2's rank stopped (SIGSTOP), its machine answering", took, line)
    assert ranks_gone(cluster, within=30) == []


# ------------------------------------------------------------------ signals


def test_sigterm_to_make_train_stops_every_rank_and_the_next_job_starts_clean(cluster):
    make = ["make", "-s", "train", "RUN=sigterm", "STEPS=100000"]
    proc, seen = train_until_step(cluster, [], 20, stderr=subprocess.PIPE, argv=make)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output, err = finish(proc, seen, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode != 0
    assert "interrupted (SIGTERM); stopping every rank" in output, output[-3000:]
    assert "deepfleet: stopped by SIGTERM" in err, err
    assert ranks_gone(cluster, within=10) == []
    record("SIGTERM to `make train`", took, "deepfleet: stopped by SIGTERM")
    again = cluster.run("train", "--run", "sigterm-next", "--steps", "5", "--log-every", "5")
    assert steps(again.stdout)[-1][0] == 5


def test_sighup_stops_every_rank_like_ctrl_c(cluster):
    proc, seen = train_until_step(cluster, LONG_TRAIN, 20, stderr=subprocess.PIPE)
    start = time.monotonic()
    proc.send_signal(signal.SIGHUP)
    output, err = finish(proc, seen, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert last_line(err) == "deepfleet: stopped by SIGHUP"
    assert ranks_gone(cluster, within=10) == []
    record("SIGHUP (terminal closed)", took, last_line(err))


def test_an_operator_killed_outright_leaves_a_job_the_next_one_waits_for_then_clears(cluster):
    """SIGKILL leaves no chance to stop anything: its job's lease must lapse first, then
    whatever it left behind is stopped before the next job starts."""
    proc, seen = train_until_step(cluster, LONG_TRAIN, 20, stderr=subprocess.PIPE)
    proc.kill()
    proc.communicate(timeout=60)
    refused = cluster.run("train", "--run", "after-kill", "--steps", "5", check=False)
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(err) == 1, err
    assert err[0].startswith("deepfleet: lab1: a job started from ") and "is running" in err[0]
    time.sleep(40)  # three watchdog rounds without renewal: the lease has lapsed
    # the killed job's ranks may have died of their closed pipes by now; a process such a
    # job leaves behind, planted here, must not survive into the next one
    planted = subprocess.Popen(
        ["docker", "exec", lab_machine(cluster, 1), "docker", "exec", NODE, "python", "-c",
         "import time; time.sleep(600)", "deepfleet_node.train", "--local_rank=0"],
    )  # fmt: skip
    try:
        time.sleep(3)
        start = time.monotonic()
        result = cluster.run("train", "--run", "after-kill", "--steps", "5", "--log-every", "5")
        assert "[lab2] stopped " in result.stdout, result.stdout[-3000:]
        assert "an earlier job left behind" in result.stdout
        assert steps(result.stdout)[-1][0] == 5
        record("next job after a SIGKILLed operator", time.monotonic() - start, "(trains)")
    finally:
        planted.kill()
    assert ranks_gone(cluster, within=10) == []


# ------------------------------------------------------------------ restarted machines


def test_stopped_and_missing_node_containers_are_shown_then_brought_back(cluster):
    on_machine(cluster, 1, "docker", "stop", "-t", "1", NODE)
    on_machine(cluster, 2, "docker", "rm", "-f", NODE)
    assert states(cluster) == {"lab1": "running", "lab2": "exited", "lab3": "missing"}
    result = cluster.run("train", "--run", "healed", "--steps", "5", "--log-every", "5")
    assert "[lab2] node container was exited; started it again" in result.stdout
    assert "[lab3] node container was missing; made it anew" in result.stdout
    assert steps(result.stdout)[-1][0] == 5
    assert set(states(cluster).values()) == {"running"}
    # lab3's new container has new host keys, pinned again on the master
    state = cluster.state()
    code, known = cluster.node_exec(0, ["cat", "/root/.ssh/known_hosts"])
    assert code == 0 and state["nodes"][2]["host_key"].split()[1] in known


def test_a_container_that_cannot_come_back_is_one_line_naming_the_machine(cluster):
    on_machine(cluster, 1, "docker", "pause", NODE)
    try:
        result = cluster.run("train", "--run", "paused", "--steps", "5", check=False)
        assert result.returncode == 1
        err = result.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("deepfleet: lab2: its node container "), err
        assert "paused" in err[0] and "docker unpause" in err[0]
        assert "Error" not in err[0] and "http" not in err[0]
    finally:
        unpause_node(cluster, 1)


# ------------------------------------------------------------------ inputs


def test_inputs_are_checked_on_the_operator_before_anything_is_copied(cluster, tmp_path):
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\nnot json\n')
    no_weights = tmp_path / "model"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "llama"}')
    (no_weights / "tokenizer.json").write_text("{}")
    cases = [
        (["train", "--data", str(bad)], f"deepfleet: data {bad}:3: not JSON"),
        (["train", "--data", str(empty)], f"deepfleet: data {empty} has only blank lines"),
        (["infer", "--prompts", str(empty)], f"deepfleet: prompts file {empty} has no prompts"),
        (["infer", "--prompts", str(prompts)], f"deepfleet: prompts {prompts}:2: not JSON"),
        (["train", "--model", str(no_weights)], f"deepfleet: model {no_weights} has no weights"),
    ]
    for args, want in cases:
        start = time.monotonic()
        result = cluster.run(*args, check=False, timeout=120)
        err = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(err) == 1 and err[0].startswith(want), (args, err)
        assert "copied" not in result.stdout and "deepfleet: job " not in result.stdout
        assert time.monotonic() - start < 30
    for index in range(len(cluster.lab.nodes)):
        code, _ = cluster.node_exec(index, ["test", "-e", "/workspace/data/corpus"])
        assert code != 0  # never copied


def hf_cache_layout(model: Path, cache: Path) -> Path:
    """models--org--name as the hub client leaves it: snapshot files link into ../blobs."""
    repo = cache / "models--example-org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for index, path in enumerate(sorted(model.iterdir())):
        blob = repo / "blobs" / f"blob{index:02d}"
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return repo


def test_an_hf_cache_folder_copies_as_files_once_and_trains(cluster, tmp_path):
    exported = tmp_path / "exported"
    cluster.run("fetch-model", "--run", "it", "--dest", str(exported))
    repo = hf_cache_layout(exported, tmp_path / "hub")
    args = [
        "train",
        "--run",
        "from-cache",
        "--model",
        str(repo),
        "--steps",
        "3",
        "--log-every",
        "3",
    ]
    first = cluster.run(*args)
    every = ", ".join(node.name for node in cluster.lab.nodes)
    assert f"deepfleet: /workspace/models/example-org--tiny: copied to {every}" in first.stdout
    assert steps(first.stdout)[-1][0] == 3
    code, out = cluster.node_exec(1, ["find", "/workspace/models/example-org--tiny", "-type", "l"])
    assert code == 0 and out.strip() == ""  # files, not links
    second = cluster.run(*args)
    assert f"deepfleet: /workspace/models/example-org--tiny: unchanged on {every}" in second.stdout


def test_a_failing_rank_ends_with_its_own_error_line(cluster):
    start = time.monotonic()
    result = cluster.run(
        "train", "--run", "badhook", "--steps", "5", "--", "--prepare-dataset", "nosuchmod:fn",
        check=False,
    )  # fmt: skip
    took = time.monotonic() - start
    line = last_line(result.stderr)
    assert result.returncode == 1, result.stdout[-3000:]
    assert ": deepfleet_node.train: a rank exited with code 1: " in line, line
    assert "ModuleNotFoundError: No module named 'nosuchmod'" in line, line
    assert ranks_gone(cluster, within=10) == []
    record("a rank fails (bad --prepare-dataset)", took, line)


# ------------------------------------------------------------------ images and up


def test_an_image_load_that_stops_progressing_fails_naming_the_node(
    cluster, outer_docker, monkeypatch
):
    import io

    from deepfleet.errors import ImageError
    from deepfleet.images import delivery
    from deepfleet.inventory.sshconfig import resolve
    from deepfleet.machines.connect import connect

    # 64 MB of new layer: more than every buffer between here and the frozen engine
    dockerfile = (
        b"FROM deepfleet/cpu:latest\n"
        b"RUN head -c 64000000 /dev/urandom > /opt/deepfleet/stall-test\n"
    )
    ref = "deepfleet-test/stall:1"
    outer_docker.images.build(fileobj=io.BytesIO(dockerfile), tag=ref, rm=True, forcerm=True)
    plain = delivery._file_chunks
    froze: list[float] = []

    def freezing_chunks(path):
        for index, chunk in enumerate(plain(path)):
            yield chunk
            if index == 0:  # the load has begun: the machine's engine freezes
                on_machine(cluster, 2, "pkill", "-STOP", "-x", "dockerd")
                froze.append(time.monotonic())

    monkeypatch.setattr(delivery, "_file_chunks", freezing_chunks)
    monkeypatch.setenv("DEEPFLEET_STALL_TIMEOUT", "8")
    node = resolve(["lab3"], cluster.lab.ssh_config).nodes[0]
    client = connect(node)
    try:
        with pytest.raises(ImageError) as info:
            delivery.ensure_image(outer_docker, client, ref, "lab3")
        took = time.monotonic() - froze[0]
        line = info.value.one_line()
        assert line.startswith(f"lab3: loading {ref} made no progress for 8 s"), line
        assert took < 40, took
        record("lab3's engine stops mid-load (stall timeout 8 s)", took, line)
    finally:
        on_machine(cluster, 2, "pkill", "-CONT", "-x", "dockerd", check=False)
        client.close()
        outer_docker.images.remove(ref, force=True)


def test_a_failed_up_leaves_nothing_on_any_machine(cluster, tmp_path):
    """lab3 already has a container by that name that is not deepfleet's: up fails there,
    after lab1 and lab2 made theirs (which cannot start: the cluster holds their port)."""
    probe = tmp_path / "probe.yml"
    probe.write_text("services:\n  node:\n    container_name: deepfleet-probe\n")
    on_machine(cluster, 2, "docker", "create", "--name", "deepfleet-probe", "deepfleet/cpu:latest")
    state = tmp_path / "state"
    try:
        result = subprocess.run(
            [*DEEPFLEET, "--state-dir", str(state), "up", "--ssh-config",
             str(cluster.lab.ssh_config), "--compose-override", str(cluster.lab.override),
             "--compose-override", str(probe), "lab1", "lab2", "lab3"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        err = result.stderr.strip().splitlines()
        assert any(e.startswith("deepfleet: lab3: a container named deepfleet-probe") for e in err)
        assert all(e.startswith("deepfleet: lab") for e in err), err
        assert not state.exists()
        for index in (0, 1):
            names = on_machine(cluster, index, "docker", "ps", "-a", "--format", "{{.Names}}")
            assert "deepfleet-probe" not in names.split(), names
        assert set(states(cluster).values()) == {"running"}  # the cluster was not touched
    finally:
        on_machine(cluster, 2, "docker", "rm", "-f", "deepfleet-probe", check=False)


def test_a_long_operation_reports_no_raw_engine_text_when_a_machine_vanishes(cluster):
    """status while a machine is frozen: it says so per machine, in our words, promptly."""
    subprocess.run(["docker", "pause", lab_machine(cluster, 2)], check=True, timeout=60)
    try:
        start = time.monotonic()
        result = cluster.run("--timeout", "5", "status", check=False, timeout=120)
        assert time.monotonic() - start < 30
        row = next(line for line in result.stdout.splitlines() if line.startswith("lab3"))
        assert "unreachable" in row and "Traceback" not in result.stdout + result.stderr, row
    finally:
        subprocess.run(["docker", "unpause", lab_machine(cluster, 2)], timeout=60)
