from pathlib import Path

import pytest
import yaml

from deepfleet.errors import ClusterFileError, InventoryError
from deepfleet.inventory import clusterfile
from deepfleet.inventory.nodes import NodeSpec
from deepfleet.inventory.sshconfig import resolve


@pytest.fixture
def ssh_config(tmp_path: Path) -> Path:
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host lab1\n  HostName 10.1.0.2\n  User bob\n  Port 2022\n"
        f"  IdentityFile {tmp_path}/key\n  UserKnownHostsFile {tmp_path}/known\n"
        "Host lab2\n  HostName 10.1.0.3\n"
    )
    return config


WORDS = ["lab1", "carol@lab2:2201=cuda", "10.0.0.7=cpu", "root@[fe80::1]:22=rocm"]


def test_render_init_reads_back_to_the_same_inventory(tmp_path: Path, ssh_config: Path):
    inv = resolve(WORDS, ssh_config)
    override = tmp_path / "gpu.override.yml"
    text = clusterfile.render_init(
        inv,
        image="reg.local:5000/deepfleet/cuda:1",
        slots={"lab2": 2, "10.0.0.7": 0},
        compose_overrides=[override],
        ssh_config=ssh_config,
    )
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    loaded = clusterfile.load(path)
    assert loaded.inventory() == inv
    assert loaded.slots == {"lab2": 2, "10.0.0.7": 0}
    assert loaded.image == "reg.local:5000/deepfleet/cuda:1"
    assert loaded.compose_overrides == (override,)
    assert loaded.ssh_config == ssh_config
    assert (loaded.cpu_slots, loaded.relay_port, loaded.flavor) == (None, None, None)
    # what the SSH config says for a name stays there, so the file follows later edits of it
    assert yaml.safe_load(text)["machines"][0] == {"name": "lab1"}
    for key in ("image", "flavor", "ssh_config", "cpu_slots", "relay_port", "compose_overrides"):
        assert f"# {key}: " in text or f"\n{key}:" in text


def test_render_init_keeps_the_default_ssh_config_portable(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host lab1\n  HostName 10.1.0.2\n  User bob\n")
    inv = resolve(["lab1", "dave@other"])
    text = clusterfile.render_init(inv)
    assert "# ssh_config: ~/.ssh/config" in text and "\nssh_config:" not in text
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    assert clusterfile.load(path).inventory() == inv


def test_render_init_refuses_slots_for_unknown_nodes(ssh_config: Path):
    with pytest.raises(InventoryError, match="slots given for unknown nodes: nope"):
        clusterfile.render_init(resolve(["lab1"], ssh_config), slots={"nope": 1})


def test_file_gives_the_same_nodes_as_the_words(tmp_path: Path, ssh_config: Path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        f"ssh_config: {ssh_config}\n"
        "machines:\n"
        "  - name: lab1\n"
        "  - {name: lab2, user: carol, port: 2201, flavor: cuda}\n"
        "  - name: 10.0.0.7\n    flavor: cpu\n"
        "  - {name: 'fe80::1', user: root, port: 22, flavor: rocm}\n"
    )
    assert clusterfile.load(path).inventory() == resolve(WORDS, ssh_config)


def test_fields_beyond_a_word_resolve_without_an_ssh_config(tmp_path: Path, ssh_config: Path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        f"ssh_config: {ssh_config}\n"
        "machines:\n"
        "  - {name: lab9, host: 172.20.0.9, user: root, port: 2222, key: keys/id}\n"
        "  - {name: lab1, host: 172.20.0.2, key: /k/other}\n"  # over the SSH config's
    )
    lab9, lab1 = clusterfile.load(path).inventory().nodes
    known = str(Path("~/.ssh/known_hosts").expanduser())
    assert lab9 == NodeSpec("lab9", "172.20.0.9", "root", 2222, str(tmp_path / "keys/id"), known)
    assert lab1 == NodeSpec("lab1", "172.20.0.2", "bob", 2022, "/k/other", str(tmp_path / "known"))


def test_relative_paths_are_taken_from_the_files_folder(tmp_path: Path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "cluster.yaml").write_text(
        "ssh_config: ssh/config\n"
        "compose_overrides: [o.yml, ../shared/b.yml, /abs/c.yml, ~/d.yml]\n"
        "cpu_slots: 3\nrelay_port: 29700\nflavor: cpu\n"
        "machines: [{name: a, key: keys/id}]\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # not the file's folder
    loaded = clusterfile.load("site/cluster.yaml")
    assert loaded.ssh_config == folder / "ssh" / "config"
    assert loaded.compose_overrides == (
        folder / "o.yml",
        tmp_path / "shared" / "b.yml",
        Path("/abs/c.yml"),
        tmp_path / "home" / "d.yml",
    )
    assert loaded.machines[0].key == str(folder / "keys" / "id")
    assert (loaded.cpu_slots, loaded.relay_port, loaded.flavor) == (3, 29700, "cpu")
    assert loaded.inventory().ssh_config == str(folder / "ssh" / "config")


M = "machines:\n  - name: lab1\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (M + "  - name: lab2\n    port: abc\n", "machines[1].port: 'abc' is not of type 'integer'"),
        (M + "    port: 70000\n", "machines[0].port: 70000 is greater than the maximum of 65535"),
        (
            M + "    flavor: tpu\n",
            "machines[0].flavor: 'tpu' is not one of ['cpu', 'cuda', 'rocm']",
        ),
        (M + "    slots: -1\n", "machines[0].slots: -1 is less than the minimum of 0"),
        (
            M + "    hots: x\n",
            "machines[0].hots: unknown key; known: name, host, user, port, key, flavor, slots",
        ),
        (
            M + "image: x\nnodes: [a]\n",
            "nodes: unknown key; known: image, flavor, ssh_config, "
            "cpu_slots, relay_port, compose_overrides, machines",
        ),
        ("machines:\n  - user: bob\n", "machines[0].name: required but not given"),
        ("", "machines: required but not given"),
        ("machines: []\n", "machines: [] should be non-empty"),
        ("- lab1\n", "['lab1'] is not of type 'object'"),
        (M + "cpu_slots: 0\n", "cpu_slots: 0 is less than the minimum of 1"),
        (M + "compose_overrides: o.yml\n", "compose_overrides: 'o.yml' is not of type 'array'"),
        (
            "machines:\n  - name: alice@gpu1\n",
            "machines[0].name: 'alice@gpu1' is not a bare host "
            "name; user, port and flavor have their own fields",
        ),
        (
            "machines:\n  - name: bad host\n",
            "machines[0].name: 'bad host' is not a host name or address",
        ),
        (
            M + "    host: x=cpu\n",
            "machines[0].host: 'x=cpu' is not a bare host name; user, port "
            "and flavor have their own fields",
        ),
        (M + "  - name: lab1\n", "machines[1].name: 'lab1' is listed twice"),
        (
            "machines: [\n",
            "not YAML: line 2 column 1: expected the node content, but found '<stream end>'",
        ),
    ],
)
def test_each_error_is_one_line_naming_the_file_and_field(
    tmp_path: Path, monkeypatch, text, message
):
    monkeypatch.chdir(tmp_path)
    Path("cluster.yaml").write_text(text)
    with pytest.raises(ClusterFileError) as err:
        clusterfile.load("cluster.yaml")
    assert err.value.one_line() == f"cluster.yaml: {message}"
    assert "\n" not in str(err.value)


def test_missing_and_unreadable_files(tmp_path: Path):
    with pytest.raises(ClusterFileError) as err:
        clusterfile.load(tmp_path / "nope.yaml")
    assert err.value.one_line() == f"{tmp_path}/nope.yaml: cannot read: No such file or directory"
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ClusterFileError, match="bin.yaml: not UTF-8 text"):
        clusterfile.load(binary)


def test_cluster_file_errors_are_inventory_errors():
    # so whatever handles a bad NODES list handles a bad cluster file the same way
    assert issubclass(ClusterFileError, InventoryError)
