from pathlib import Path

import pytest

from deepfleet.errors import InventoryError
from deepfleet.inventory.nodes import parse_node_arg
from deepfleet.inventory.sshconfig import resolve


@pytest.mark.parametrize(
    "text, host, user, port, flavor",
    [
        ("node1", "node1", None, None, None),
        ("alice@node1", "node1", "alice", None, None),
        ("alice@10.0.0.5:2200", "10.0.0.5", "alice", 2200, None),
        ("gpu-box=cuda", "gpu-box", None, None, "cuda"),
        ("root@[fe80::1]:22=rocm", "fe80::1", "root", 22, "rocm"),
        ("fe80::1", "fe80::1", None, None, None),
    ],
)
def test_parse_node_arg(text, host, user, port, flavor):
    arg = parse_node_arg(text)
    assert (arg.host, arg.user, arg.port, arg.flavor) == (host, user, port, flavor)


@pytest.mark.parametrize(
    "text, cause",
    [
        ("node1:0", "port"),
        ("node1:99999", "port"),
        ("node1:ssh", "port"),
        ("@node1", "empty user"),
        ("node1=tpu", "unknown flavor"),
        ("[fe80::1", "unclosed"),
        ("bad host", "not a host name"),
    ],
)
def test_parse_node_arg_rejects(text, cause):
    with pytest.raises(InventoryError, match=cause) as err:
        parse_node_arg(text)
    assert err.value.one_line().startswith(text) or cause == "not a host name"


def test_resolve_uses_ssh_config(tmp_path: Path):
    config = tmp_path / "config"
    config.write_text(
        "Host lab1\n  HostName 10.1.0.2\n  User bob\n  Port 2022\n"
        f"  IdentityFile {tmp_path}/key\n  UserKnownHostsFile {tmp_path}/known\n"
    )
    inv = resolve(["lab1", "carol@other:23"], config)
    lab1, other = inv.nodes
    assert (lab1.name, lab1.host, lab1.user, lab1.port) == ("lab1", "10.1.0.2", "bob", 2022)
    assert lab1.identity_file == str(tmp_path / "key")
    assert lab1.known_hosts == str(tmp_path / "known")
    assert lab1.docker_url == "ssh://bob@10.1.0.2:2022"
    assert (other.host, other.user, other.port) == ("other", "carol", 23)
    assert other.known_hosts.endswith(".ssh/known_hosts")
    assert inv.master is lab1


def test_resolve_rejects_duplicates(tmp_path: Path):
    config = tmp_path / "config"
    config.write_text("Host a\n  HostName 10.0.0.1\nHost b\n  HostName 10.0.0.1\n")
    with pytest.raises(InventoryError, match="listed twice"):
        resolve(["a", "a"], config)
    with pytest.raises(InventoryError, match="same machine as a") as err:
        resolve(["a", "b"], config)
    assert err.value.node == "b"


def test_resolve_needs_nodes(tmp_path: Path):
    with pytest.raises(InventoryError, match="no nodes"):
        resolve([], tmp_path / "none")
