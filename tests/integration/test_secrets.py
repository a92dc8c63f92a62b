"""An HF token handed to a job is used for the hub download and then is nowhere: not in
a log, a file, an image, `docker inspect` or `status`.

The hub is a local stand-in (hubstub.py) bound to the lab network's gateway, so the node
containers on the lab machines download from it through the real path (`deepfleet train
--model org/name` -> snapshot_download on every node, HF_ENDPOINT and HF_TOKEN in the exec
environment). It refuses any request without the token, so a job that succeeds proves the
token reached every node's download, and only there.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from hubstub import HubStub, network_gateway
from labtools import DEEPFLEET, ROOT, lab_module

from deepfleet.jobs.submit import HUB_FILES

pytestmark = pytest.mark.lab

TOKEN = "hf_secretTOKEN123"
# What the greps look for: matches TOKEN, yet is not TOKEN, so no grep's own command line
# (in /proc, a shell history, an engine's log of its execs) can be what they find.
NEEDLE = f"{TOKEN[:9]}[{TOKEN[9]}]{TOKEN[10:]}"
REPO = "example-org/tiny"
NODE = "deepfleet-node"  # the deepfleet container on every lab machine
PATTERNS = HUB_FILES  # what deepfleet's prefetch step fetches
STEP_RE = re.compile(r"^\[(\S+)\] step (\d+)/(\d+) loss ([0-9.]+)", re.M)
# Left out of a node's /: kernel views, and nothing a process could have written to.
NOT_FILES = {"proc", "sys", "dev"}
# On a lab machine (outside the node container): the engine's records of the node
# container and its image (config, env, logs), the machine's logs, homes and temp files.
LAB_MACHINE_DIRS = [
    "/var/lib/docker/containers", "/var/lib/docker/image", "/var/log", "/root", "/home",
    "/etc", "/tmp",
]  # fmt: skip

assert re.fullmatch(NEEDLE, TOKEN) and NEEDLE != TOKEN


def hub_env(cluster, **extra) -> dict:
    """The operator's environment without any hub setting of its own, plus `extra`."""
    env = {k: v for k, v in cluster.env().items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    return {**env, **extra}


def deepfleet(env: dict, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DEEPFLEET, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def on_machine(node, argv: list[str], timeout=600) -> subprocess.CompletedProcess:
    """argv on a lab machine itself (the container that plays it), bytes out."""
    return subprocess.run(
        ["docker", "exec", node.container, *argv], capture_output=True, timeout=timeout
    )


def grep(node, roots: list[str], in_node: bool, pattern: str = NEEDLE) -> list[str]:
    """The files under `roots` whose content matches `pattern`, on a lab machine or in its
    node container (roots ["/"]: every top-level folder but NOT_FILES).

    grep exits 1 when nothing matched. A 2 is accepted only for files that vanished
    between listing and reading (a /tmp file of a process that ended): anything else
    (grep missing, an unreadable tree) fails the test rather than passing it.
    """
    inside = ["docker", "exec", NODE] if in_node else []
    if roots == ["/"]:
        listing = on_machine(node, [*inside, "ls", "-A", "/"])
        assert listing.returncode == 0, listing.stderr
        roots = [f"/{name}" for name in listing.stdout.decode().split() if name not in NOT_FILES]
    # -D skip: FIFOs, sockets and devices are not read (a FIFO would block the walk).
    result = on_machine(node, [*inside, "grep", "-rlE", "-D", "skip", "-e", pattern, *roots])
    found = result.stdout.decode(errors="replace").splitlines()
    errors = [
        line
        for line in result.stderr.decode(errors="replace").splitlines()
        if not line.endswith("No such file or directory")
    ]
    where = f"{node.name}{' ' + NODE if in_node else ''}"
    assert result.returncode in (0, 1, 2) and not errors, (where, result.returncode, errors)
    return [f"{where}:{path}" for path in found]


def build_tiny_repo(cluster, dest: Path) -> Path:
    """A tiny model made by the node image itself (lab1), copied out as the hub repo."""
    work = "/tmp/hubstub-tiny"
    code, out = cluster.node_exec(
        0,
        ["python", "-m", "deepfleet_node.tiny", "--out", f"{work}/model",
         "--data-out", f"{work}/train.txt"],
    )  # fmt: skip
    assert code == 0, out
    node = cluster.lab.nodes[0]
    copied = on_machine(node, ["docker", "cp", f"{NODE}:{work}/model", "-"])
    assert copied.returncode == 0, copied.stderr.decode(errors="replace")
    with tarfile.open(fileobj=io.BytesIO(copied.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.10.12 / 3.11.4; our own node's tar of a folder we made
            tar.extractall(dest)
    cluster.node_exec(0, ["rm", "-rf", work])
    model = dest / "model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    return model


def allowed(model: Path) -> dict[str, str]:
    """The repo files the prefetch step fetches, with their sha256."""
    files = {p.relative_to(model).as_posix(): p for p in model.rglob("*") if p.is_file()}
    return {
        name: hashlib.sha256(path.read_bytes()).hexdigest()
        for name, path in files.items()
        if any(fnmatch.fnmatch(name, pattern) for pattern in PATTERNS)
    }


def test_a_hub_model_that_cannot_be_fetched_fails_in_one_line_without_the_token(cluster):
    env = hub_env(cluster, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="1")
    result = deepfleet(env, "train", "--model", "example-org/not-cached-model", "--steps", "1",
                       timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepfleet: lab"), err
    assert "example-org/not-cached-model" in err[0]
    assert TOKEN not in result.stdout + result.stderr


def test_hf_token_is_used_for_the_download_and_reaches_nothing_else(
    cluster, outer_docker, tmp_path
):
    nodes = cluster.lab.nodes
    addresses = {n.ip for n in nodes}
    model = build_tiny_repo(cluster, tmp_path)
    wanted = allowed(model)
    assert "model.safetensors" in wanted and "config.json" in wanted, wanted

    gateway = network_gateway(outer_docker, lab_module.NETWORK)
    try:
        hub = HubStub(gateway, {REPO: model}, token=TOKEN)
    except OSError as exc:
        pytest.fail(
            f"cannot bind the hub stand-in to {lab_module.NETWORK}'s gateway {gateway} ({exc}):"
            " the tests must run on the Docker engine's own host"
        )
    with hub:
        commit = hub.commit(REPO)

        # A wrong token: the stub refuses it on every node, the job stops before training,
        # in one line naming a node. (Also proves the stub is what the nodes talk to.)
        wrong = "hf_wrongTOKEN456"
        refused = deepfleet(
            hub_env(cluster, HF_TOKEN=wrong, HF_ENDPOINT=hub.endpoint),
            "train", "--model", REPO, "--run", "hubtoken", "--steps", "2", timeout=600,
        )  # fmt: skip
        assert refused.returncode != 0, refused.stdout[-3000:]
        err = refused.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("deepfleet: lab"), err
        assert f"cannot download {REPO}" in err[0], err
        assert not STEP_RE.search(refused.stdout)
        assert wrong not in refused.stdout + refused.stderr
        seen = [r for r in hub.requests if r.repo is not None]
        assert {r.client for r in seen} == addresses, hub.requests
        assert all(r.auth == "other" and r.status == 401 for r in seen), seen
        before = len(hub.requests)

        # The token: every node downloads the repo with it, then the ranks train on it.
        env = hub_env(cluster, HF_TOKEN=TOKEN, HF_ENDPOINT=hub.endpoint)
        run = deepfleet(
            env, "train", "--model", REPO, "--run", "hubtoken", "--steps", "2",
            "--log-every", "1",
        )  # fmt: skip
        output = run.stdout + run.stderr
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        assert f"{REPO} is in every node's HF cache" in run.stdout
        assert max(int(m.group(2)) for m in STEP_RE.finditer(run.stdout)) == 2, run.stdout[-3000:]
        seen = hub.requests[before:]

    # The stub saw the token, and only in the Authorization header, from every node, and
    # every file the prefetch step wants went to every node (no one else asked). Requests
    # about no repo are huggingface_hub's own public look-ups (hubstub.PUBLIC).
    about_repo = [r for r in seen if r.repo is not None]
    assert about_repo and all(r.repo == REPO for r in about_repo), seen
    assert all(r.authorized and r.status in (200, 206) for r in about_repo), seen
    assert all(r.status == 200 for r in seen if r.repo is None), seen
    assert not any(r.token_elsewhere for r in seen), seen
    assert {r.client for r in seen} == addresses, seen
    for address in addresses:
        got = {r.path for r in seen if r.client == address and r.method == "GET"}
        assert f"/api/models/{REPO}/revision/main" in got, (address, sorted(got))
        missing = [f for f in wanted if f"/{REPO}/resolve/{commit}/{f}" not in got]
        assert missing == [], (address, missing, sorted(got))
    snapshot = f"/workspace/hf-cache/hub/models--{REPO.replace('/', '--')}/snapshots/{commit}"
    for index in range(len(nodes)):
        code, out = cluster.node_exec(
            index, ["sha256sum", *(f"{snapshot}/{f}" for f in sorted(wanted))]
        )
        assert code == 0, out
        sums = {line.split()[1][len(snapshot) + 1 :]: line.split()[0] for line in out.splitlines()}
        assert sums == wanted, (nodes[index].name, sums)

    # Nowhere on the operator's side: the CLI's output, `status`, the state dir.
    assert TOKEN not in output
    for args in (["status"], ["status", "--json"]):
        status = deepfleet(env, *args, timeout=300)
        assert status.returncode == 0, status.stderr[-3000:]
        assert TOKEN not in status.stdout + status.stderr, args
        if "--json" in args:
            assert len(json.loads(status.stdout)["nodes"]) == len(nodes)
    state_files = [p for p in cluster.state_dir.rglob("*") if p.is_file()]
    assert state_files, cluster.state_dir
    assert [str(p) for p in state_files if TOKEN.encode() in p.read_bytes()] == []

    # Nowhere on any machine: every file of every node container (its volumes, the HF
    # cache included), the engine's records and logs there, the container's config and
    # logs, and its image's config and history.
    leaks = []
    for node in nodes:
        leaks += grep(node, ["/"], in_node=True)
        leaks += grep(node, LAB_MACHINE_DIRS, in_node=False)
        image = on_machine(node, ["docker", "inspect", "--format", "{{.Image}}", NODE])
        assert image.returncode == 0, image.stderr
        image_id = image.stdout.decode().strip()
        for argv in (
            ["docker", "inspect", NODE],
            ["docker", "logs", NODE],
            ["docker", "image", "inspect", image_id],
            ["docker", "history", "--no-trunc", image_id],
        ):
            result = on_machine(node, argv)
            assert result.returncode == 0, (node.name, argv, result.stderr)
            if TOKEN.encode() in result.stdout + result.stderr:
                leaks.append(f"{node.name}: {' '.join(argv)}")
    assert leaks == []

    # The same grep does find what the download wrote in the HF cache volume: the commit
    # the stub served, in refs/main, is found as the token would have been.
    found = grep(nodes[0], ["/workspace"], in_node=True, pattern=commit)
    ref = f"/workspace/hf-cache/hub/models--{REPO.replace('/', '--')}/refs/main"
    assert f"{nodes[0].name} {NODE}:{ref}" in found, found
