import io
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from unitdata import detect_report, two_node_plan

from deepfleet.errors import StateError
from deepfleet.inventory.nodes import NodeSpec
from deepfleet.jobs.launch import LinePrefixer, launch_spec
from deepfleet.machines import keys, transfer
from deepfleet.machines.state import ClusterState, NodeState, StateStore


def test_state_round_trip_is_atomic_and_private(tmp_path: Path):
    store = StateStore(tmp_path / "st")
    spec = NodeSpec("lab1", "10.0.0.2", "root", 22, "/k", "/kh", None)
    state = ClusterState(
        cluster="abcd",
        image="",
        nodes=[
            NodeState(
                spec, "cpu", "cid", "deepfleet-node", "sha256:1", "ssh-ed25519 AAA", detect_report()
            )
        ],
        slots={"lab1": 2},
    )
    store.save(state)
    assert stat.S_IMODE(store.dir.stat().st_mode) == 0o700
    assert [p.name for p in store.dir.iterdir()] == ["cluster.json"]
    loaded = store.load()
    assert loaded == state
    assert loaded.reports()["lab1"].versions["deepspeed"] == "0.19.8"
    assert loaded.inventory.master.host == "10.0.0.2"
    store.remove()
    with pytest.raises(StateError, match="no cluster is up"):
        store.load()


def test_corrupt_state_is_a_clear_error(tmp_path: Path):
    store = StateStore(tmp_path)
    (tmp_path / "cluster.json").write_text("{not json")
    with pytest.raises(StateError, match="cannot read"):
        store.load()


def test_keypair_is_openssh_and_private(tmp_path: Path):
    pair = keys.generate("deepfleet-test")
    path = tmp_path / "k"
    keys.write_private(path, pair)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # ssh-keygen derives the same public key from the private file: the format is right.
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()[:2]
    assert derived == pair.public_openssh.split()[:2]
    assert keys.read(path) == pair


def test_known_hosts_lines():
    assert (
        keys.known_hosts_line("10.0.0.2", 2222, "ssh-ed25519 AAAA")
        == "[10.0.0.2]:2222 ssh-ed25519 AAAA"
    )
    assert keys.known_hosts_line("h", 22, "ssh-ed25519 AAAA x") == "h ssh-ed25519 AAAA"


def _container_digest(path: Path) -> str:
    """The exact shell the nodes run, run here."""
    return subprocess.run(
        ["sh", "-c", transfer._DIGEST, "digest", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_local_digest_matches_the_node_side_digest(tmp_path: Path):
    tree = tmp_path / "model"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha")
    (tree / "a.b").write_bytes(b"\x00\x01")
    (tree / "sub" / "w.bin").write_bytes(b"weights" * 100)
    assert transfer.local_digest(tree) == _container_digest(tree)
    before = transfer.local_digest(tree)
    (tree / "sub" / "w.bin").write_bytes(b"changed")
    assert transfer.local_digest(tree) != before
    assert _container_digest(tmp_path / "nothing") == "missing"


def test_single_file_digest_matches_its_directory(tmp_path: Path):
    data = tmp_path / "corpus.txt"
    data.write_text("hello\n")
    landed = tmp_path / "landed"
    landed.mkdir()
    (landed / "corpus.txt").write_text("hello\n")
    assert transfer.local_digest(data) == _container_digest(landed)


def test_tar_files_modes():
    blob = transfer.tar_files({"config": (b"Host *\n", 0o600)})
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        member = tar.getmember("config")
        assert member.mode == 0o600
        assert tar.extractfile(member).read() == b"Host *\n"


def test_prefixer_labels_pdsh_lines_with_node_names():
    out = []
    p = LinePrefixer(two_node_plan(), out.append)
    p.feed(b"10.0.0.3: step 5/60 loss 4.1\n[INFO] runner starting\n10.0.0.2: ste")
    p.feed(b"p 5/60 loss 4.0\npartial")
    p.close()
    assert out == [
        "[lab2] step 5/60 loss 4.1\n",
        "[lab1] [INFO] runner starting\n",
        "[lab1] step 5/60 loss 4.0\n",
        "[lab1] partial\n",
    ]


def test_the_first_dead_rank_is_reported_once_with_its_node():
    # DeepSpeed's launch.py, on lab2, when its rank was killed (recorded in the lab)
    died = (
        b"10.0.0.3: [2026-11-25 16:20:40,326] [ERROR] [launch.py:259:sigkill_handler] "
        b"['/opt/venv/bin/python3.11', '-u', '-m', 'deepfleet_node.train', '--local_rank=0'] "
        b"exits with return code = -9\n"
    )
    calls, out = [], []
    p = LinePrefixer(two_node_plan(), out.append, on_rank_failed=lambda *a: calls.append(a))
    p.feed(b"10.0.0.2: step 5/60 loss 4.0\n" + died + died.replace(b"10.0.0.3", b"10.0.0.2"))
    assert calls == [("lab2", -9)] and p.failed == ("lab2", -9)
    assert out[1].startswith("[lab2] [2026-11-25 16:20:40,326] [ERROR]")


def test_launch_spec_has_explicit_master_and_ssh_port():
    spec = launch_spec(two_node_plan(), "deepfleet_node.train", ["--steps", "3"])
    argv = list(spec.argv)
    assert argv[0] == "deepspeed"
    assert argv[argv.index("--master_addr") + 1] == "10.0.0.2"
    assert argv[argv.index("--ssh_port") + 1] == "2222"
    assert argv[argv.index("--module") + 1] == "deepfleet_node.train"
    assert argv[-2:] == ["--steps", "3"]
