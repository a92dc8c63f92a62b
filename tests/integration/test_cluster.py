"""The whole path on a 2-machine simulated LAN: up, status, hostfile, train, infer, down.

Tests run in file order on one cluster of three machines (building it streams the image to
all three at once, onto fresh engines).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess

import pytest
from labtools import DEEPFLEET, ROOT

pytestmark = pytest.mark.lab

STEP_RE = re.compile(r"^\[(\S+)\] step (\d+)/(\d+) loss ([0-9.]+)")
RUN = "it"
PROMPTS = ["The lighthouse keeper", "The first boat is", "She writes the weather"]


def test_up_reports_every_node(cluster):
    status = json.loads(cluster.run("status", "--json").stdout)
    nodes = {n["node"]: n for n in status["nodes"]}
    assert set(nodes) == {n.name for n in cluster.lab.nodes} == {"lab1", "lab2", "lab3"}
    for node in nodes.values():
        assert node["state"] == "running"
        assert node["versions"]["deepspeed"] == "0.19.8"
        assert node["gpu_summary"] == "none" and node["gpus"] == []
        assert node["uptime_s"] > 0
    out = cluster.up_output
    if "present" not in out:  # fresh machines: the image was relayed, sent from here once
        for name in ("lab1", "lab2", "lab3"):
            assert f"[{name}] image relayed" in out, out
        sent, received = map(
            int, re.search(r"(\d+) MB sent from here, (\d+) MB received", out).groups()
        )
        assert received >= 3 * sent * 0.99 and sent > 100, out
    state = cluster.state()
    assert all(n["host_key"].startswith("ssh-ed25519 ") for n in state["nodes"])


def test_doctor_passes_on_the_running_cluster(cluster):
    result = cluster.run("doctor")
    assert ", 0 failed" in result.stdout
    for node in ("lab1", "lab2", "lab3"):
        for check, detail in (
            ("gpus", "none; flavor cpu"),
            ("image", "deepfleet/cpu:latest present"),
        ):
            row = rf"^{node}\s+{check}\s+(✓|ok)\s+{re.escape(detail)}$"
            assert re.search(row, result.stdout, re.M), result.stdout


def test_hostfile_lists_every_node_and_parses_with_deepspeed(cluster):
    code, out = cluster.node_exec(
        0,
        [
            "python",
            "-c",
            "from deepspeed.launcher.runner import fetch_hostfile;"
            "print(dict(fetch_hostfile('/workspace/.deepfleet/hostfile')))",
        ],
    )
    assert code == 0, out
    parsed = ast.literal_eval(out.strip().splitlines()[-1])
    assert parsed == {n.ip: 1 for n in cluster.lab.nodes}


def test_host_keys_are_pinned_not_ignored(cluster):
    code, out = cluster.node_exec(0, ["cat", "/root/.ssh/config", "/root/.ssh/known_hosts"])
    assert code == 0
    assert "StrictHostKeyChecking yes" in out
    assert "StrictHostKeyChecking no" not in out
    for node in cluster.lab.nodes:
        assert f"[{node.ip}]:2222 ssh-ed25519 " in out
    # the private key reached the master only
    assert cluster.node_exec(0, ["test", "-f", "/root/.ssh/deepfleet_cluster"])[0] == 0
    assert cluster.node_exec(1, ["test", "-f", "/root/.ssh/deepfleet_cluster"])[0] != 0


def test_two_node_training_with_unequal_slots_lowers_loss(cluster):
    result = cluster.run(
        "train", "--run", RUN, "--config", "zero2", "--slots", "lab1=2",
        "--steps", "40", "--log-every", "5", "--save-every", "20",
        timeout=1500,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    losses = [float(m.group(4)) for m in map(STEP_RE.match, lines) if m]
    assert len(losses) >= 4, result.stdout[-3000:]
    assert losses[-1] < losses[0] * 0.8, losses
    # every machine ran ranks: each one's job log holds its ranks' lines, labelled with its name
    logs = cluster.run("logs", "--job", RUN).stdout.splitlines()
    for node in cluster.lab.nodes:
        ran = re.compile(rf"\[{node.name}(/rank\d+)?\] === {RUN} rank ")  # lab1 runs 2
        assert any(ran.match(line) for line in logs), "\n".join(logs[-40:])


def test_checkpoints_and_export_exist(cluster):
    run_dir = f"/workspace/checkpoints/{RUN}"
    code, out = cluster.node_exec(0, ["ls", f"{run_dir}/final"])
    assert code == 0, out
    assert "config.json" in out and "model.safetensors" in out and "tokenizer.json" in out
    for index in (0, 1):  # ZeRO shards live on the node that owns them
        code, out = cluster.node_exec(index, ["find", f"{run_dir}/checkpoints", "-name", "*.pt"])
        assert code == 0 and out.strip(), out
    code, out = cluster.node_exec(0, ["cat", f"{run_dir}/metrics.jsonl"])
    metrics = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert metrics and metrics[-1]["step"] == 40


def test_make_infer_three_replicas_equal_single_process_generate(cluster, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    output = tmp_path / "out.jsonl"
    env = cluster.env()
    result = subprocess.run(
        ["make", "-s", "infer", f"RUN={RUN}", f"PROMPTS={prompts}", f"OUTPUT={output}",
         "MAX_NEW_TOKENS=24", "MODE=replicas", "SLOTS=lab1=2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "inference mode replicas" in result.stdout
    # four replicas: two ranks on lab1, one on each other machine
    assert re.search(r"generated \d+ tokens in .*, 4 ranks\)", result.stdout), result.stdout[-3000:]
    # each completion once, from rank 0 (no second copy printed by the operator)
    for prompt in PROMPTS:
        assert result.stdout.count(f"] {prompt} => ") == 1, result.stdout[-3000:]
    got = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in got] == PROMPTS

    # The reference: plain transformers generate, one process, same exported model.
    model = f"/workspace/checkpoints/{RUN}/final"
    code, out = cluster.node_exec(
        0,
        ["python", "-m", "deepfleet_node.infer", "--reference", "--model", model,
         "--prompt", *PROMPTS, "--max-new-tokens", "24", "--output", "/tmp/ref.jsonl"],
    )  # fmt: skip
    assert code == 0, out
    code, out = cluster.node_exec(0, ["cat", "/tmp/ref.jsonl"])
    ref = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [r["completion"] for r in got] == [r["completion"] for r in ref]
    assert any(r["completion"].strip() for r in got)


def test_second_up_is_refused_while_a_cluster_is_up(cluster):
    result = cluster.run("up", "--ssh-config", str(cluster.lab.ssh_config), "lab1", check=False)
    assert result.returncode == 1
    assert "already up" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_host_key_is_refused_and_leaves_nothing(cluster, tmp_path):
    config = tmp_path / "ssh_config"
    text = cluster.lab.ssh_config.read_text().replace(
        str(cluster.lab.dir / "known_hosts"), str(tmp_path / "empty_known_hosts")
    )
    config.write_text(text)
    state = tmp_path / "state"
    result = subprocess.run(
        [*DEEPFLEET, "--state-dir", str(state), "up", "--ssh-config", str(config), "lab2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepfleet: lab2: host key of root@"), err
    assert "not in" in err[0]
    assert not state.exists()


def test_cuda_asked_of_a_machine_without_nvidia_is_refused_before_anything_starts(
    cluster, tmp_path
):
    state = tmp_path / "state"
    result = subprocess.run(
        [*DEEPFLEET, "--state-dir", str(state), "up", "--ssh-config", str(cluster.lab.ssh_config),
         "--image", "deepfleet/cpu:latest", "lab2=cuda"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepfleet: lab2: "), err
    assert "/dev/nvidia" in err[0] and "NVIDIA container toolkit" in err[0]
    assert not state.exists()
    # the running cluster's container on that machine was not touched
    code, out = cluster.node_exec(1, ["true"])
    assert code == 0, out


def test_a_rebuilt_image_streams_only_its_new_layers(cluster, outer_docker, tmp_path):
    import io

    from deepfleet.images.delivery import ensure_image
    from deepfleet.inventory.sshconfig import resolve
    from deepfleet.machines.connect import connect

    dockerfile = b"FROM deepfleet/cpu:latest\nRUN echo rebuilt > /opt/deepfleet/rebuilt\n"
    ref = "deepfleet-test/derived:1"
    image, _ = outer_docker.images.build(
        fileobj=io.BytesIO(dockerfile), tag=ref, rm=True, forcerm=True
    )
    node = resolve(["lab1"], cluster.lab.ssh_config).nodes[0]
    client = connect(node)
    try:
        result = ensure_image(outer_docker, client, ref, "lab1")
        assert result.action == "streamed"
        assert result.bytes_sent < 5_000_000, result.describe()  # vs ~2 GB for the whole image
        assert client.images.get(ref).id == image.id
        assert ensure_image(outer_docker, client, ref, "lab1").action == "present"
    finally:
        client.images.remove(ref, force=True)
        client.close()
        outer_docker.images.remove(ref, force=True)
