"""The simulated LAN: N containers, each a "machine" with its own IP, Docker engine and sshd.

    python docker/lab.py up --nodes 2     # writes .lab/ssh_config, .lab/known_hosts, .lab/nodes
    python docker/lab.py down

Everything it makes carries the label deepfleet.lab=1 and is removed by `down`, which
`up` also runs first so a crashed earlier run leaves nothing behind. The operator reaches
the machines the way it reaches a real LAN: SSH with a key and pinned host keys.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.errors import APIError, NotFound

ROOT = Path(__file__).resolve().parents[1]
LABEL = "deepfleet.lab"
PREFIX = "deepfleet-lab"
NETWORK = f"{PREFIX}-net"
IMAGE = "deepfleet/lab-node:latest"
LOCAL_BASE = "deepfleet/base:bookworm"


class LabError(Exception):
    pass


@dataclass(frozen=True)
class LabNode:
    name: str  # ssh alias, e.g. lab1
    container: str
    ip: str


def _client():
    return docker.from_env(timeout=600)


def down(client=None, lab_dir: Path | None = None) -> list[str]:
    """Remove every lab container, volume and network; returns what was removed."""
    client = client or _client()
    removed = []
    for c in client.containers.list(all=True, filters={"label": LABEL}):
        c.remove(force=True, v=True)
        removed.append(c.name)
    for v in client.volumes.list(filters={"label": LABEL}):
        v.remove(force=True)
        removed.append(v.name)
    for n in client.networks.list(filters={"label": LABEL}):
        n.remove()
        removed.append(n.name)
    if lab_dir is not None:
        shutil.rmtree(lab_dir, ignore_errors=True)
    return removed


def build_image(client, base_image: str) -> None:
    if base_image == "local":
        subprocess.run([str(ROOT / "images" / "make-base.sh"), LOCAL_BASE], check=True)
        base_image = LOCAL_BASE
    for chunk in client.api.build(
        path=str(Path(__file__).parent / "lab"),
        tag=IMAGE,
        buildargs={"BASE_IMAGE": base_image},
        rm=True,
        forcerm=True,
        decode=True,
    ):
        if "error" in chunk:
            raise LabError(f"building {IMAGE}: {chunk['error'].strip()}")


def _operator_key(lab_dir: Path) -> str:
    key = lab_dir / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deepfleet-lab", "-f", str(key)],
        check=True,
    )
    return (lab_dir / "id_ed25519.pub").read_text().strip()


def _start_node(client, index: int, pubkey: str):
    name = f"{PREFIX}-{index}"
    volume = client.volumes.create(name=f"{name}-docker", labels={LABEL: "1"})
    return client.containers.run(
        IMAGE,
        name=name,
        hostname=f"lab{index}",
        detach=True,
        labels={LABEL: "1"},
        network=NETWORK,
        environment={"LAB_AUTHORIZED_KEY": pubkey, "LAB_NODE_NAME": name},
        # What a nested engine needs here, --privileged being refused (see DEVELOPERS.md).
        cap_add=["ALL"],
        cap_drop=["SYS_RESOURCE"],
        security_opt=["seccomp=unconfined", "apparmor=unconfined"],
        volumes={
            "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
            volume.name: {"bind": "/var/lib/docker", "mode": "rw"},
        },
    )


def _wait_ready(container, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        if container.status != "running":
            logs = container.logs(tail=20).decode(errors="replace")
            raise LabError(f"{container.name} stopped while booting: {logs}")
        code, _ = container.exec_run(["docker", "info", "--format", "{{.ServerVersion}}"])
        if code == 0:
            return
        time.sleep(1)
    raise LabError(f"{container.name}: its Docker engine did not start in {timeout:.0f}s")


def _host_key(container) -> str:
    code, out = container.exec_run(["cat", "/etc/ssh/ssh_host_ed25519_key.pub"])
    if code != 0:
        raise LabError(f"{container.name}: no ssh host key")
    kind, key = out.decode().split()[:2]
    return f"{kind} {key}"


def write_ssh_files(lab_dir: Path, nodes: list[LabNode], host_keys: dict[str, str]) -> None:
    key = lab_dir / "id_ed25519"
    known = lab_dir / "known_hosts"
    config = []
    for node in nodes:
        config += [
            f"Host {node.name}",
            f"  HostName {node.ip}",
            "  User root",
            "  Port 22",
            f"  IdentityFile {key}",
            f"  UserKnownHostsFile {known}",
            "  StrictHostKeyChecking yes",
            "",
        ]
    (lab_dir / "ssh_config").write_text("\n".join(config))
    known.write_text("".join(f"{n.ip} {host_keys[n.name]}\n" for n in nodes))
    (lab_dir / "nodes").write_text(" ".join(n.name for n in nodes) + "\n")


def write_compose_override(lab_dir: Path) -> None:
    """Clamp the node spec's memlock to what lab machines have.

    Lab machines run without CAP_SYS_RESOURCE, so a container there cannot raise its
    memlock limit above the one the machine itself got from this host.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = -1 if hard == resource.RLIM_INFINITY else hard
    (lab_dir / "compose.override.yml").write_text(
        "# written by docker/lab.py: lab machines cannot raise memlock\n"
        "services:\n  node:\n    ulimits:\n"
        f"      memlock:\n        soft: {limit}\n        hard: {limit}\n"
    )


def up(count: int, lab_dir: Path, base_image: str = "local", client=None) -> list[LabNode]:
    if count < 1:
        raise LabError("the lab needs at least one node")
    client = client or _client()
    down(client, lab_dir)
    build_image(client, base_image)
    lab_dir.mkdir(parents=True)
    lab_dir.chmod(0o700)
    pubkey = _operator_key(lab_dir)
    client.networks.create(NETWORK, driver="bridge", labels={LABEL: "1"})
    try:
        containers = [_start_node(client, i, pubkey) for i in range(1, count + 1)]
        nodes, keys = [], {}
        for index, container in enumerate(containers, 1):
            _wait_ready(container)
            container.reload()
            ip = container.attrs["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
            node = LabNode(name=f"lab{index}", container=container.name, ip=ip)
            nodes.append(node)
            keys[node.name] = _host_key(container)
        write_ssh_files(lab_dir, nodes, keys)
        write_compose_override(lab_dir)
        return nodes
    except BaseException:
        down(client, lab_dir)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start the simulated LAN")
    p_up.add_argument("--nodes", type=int, default=2)
    p_up.add_argument("--base-image", default="local")
    sub.add_parser("down", help="remove everything the lab made")
    parser.add_argument("--dir", type=Path, default=ROOT / ".lab")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "up":
            nodes = up(args.nodes, args.dir.resolve(), args.base_image)
            for node in nodes:
                print(f"lab: {node.name} {node.ip} ({node.container})")
            print(f"lab: ssh config in {args.dir / 'ssh_config'}")
        else:
            removed = down(lab_dir=args.dir.resolve())
            print(f"lab: removed {len(removed)} objects")
    except (LabError, APIError, NotFound, subprocess.CalledProcessError) as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
