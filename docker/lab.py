"""The simulated LAN: N containers, each a "machine" with its own IP, Docker engine and sshd.

    python docker/lab.py up --nodes 2     # writes .lab/ssh_config, .lab/known_hosts, .lab/nodes
    python docker/lab.py up --nodes 3 --cpus "0.9 0.5 0.3" --mem "6g 4g 2g"
    python docker/lab.py up --nodes 4 --link 200mbit
    python docker/lab.py up --nodes 3 --registry --slurm 2
    python docker/lab.py down

Unlike machines: --cpus (cores, a CFS quota) and --mem (bytes, or 512m, 6g: binary units
as `docker run -m`) give each machine its own limits, one value per machine or one value
for all, `max` for none. They sit on the cgroup parent of that machine's engine
(/deepfleet-lab-N, see lab/entrypoint.sh), so they bound every container deepfleet starts
there, without swap to spill into, and node containers see them (detect reports
cpu_quota and memory_limit_bytes). set_limits() changes them on a running lab.

Shaped links: --link 200mbit caps what each machine sends and receives, and what this
machine (the operator) sends to them, with tc on the lab's own interfaces, so transfer
figures measure a LAN's links rather than the two CPUs the machines share.

Every machine mounts the same host folder (.lab/shared) at /shared, as a site's machines
share a network filesystem. --registry starts the lab's registry on the operator
(labregistry.py), --slurm N a Slurm cluster on the first N machines (labslurm.py); on a
running lab, `lab.py registry` and `lab.py slurm --nodes N` do the same.

Everything it makes carries the label deepfleet.lab=1 and is removed by `down`, which
`up` also runs first so a crashed earlier run leaves nothing behind. The operator reaches
the machines the way it reaches a real LAN: SSH with a key and pinned host keys.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import labregistry
import labslurm
from docker.errors import APIError, DockerException, NotFound

ROOT = Path(__file__).resolve().parents[1]
LABEL = "deepfleet.lab"
PREFIX = "deepfleet-lab"
NETWORK = f"{PREFIX}-net"
IMAGE = "deepfleet/lab-node:latest"
LOCAL_BASE = "deepfleet/base:bookworm"
SHARED = "/shared"  # the same host folder in every machine: the lab's network filesystem


CFS_PERIOD_US = 100_000
MIN_CPUS = 0.01  # the kernel's smallest CFS quota is 1 ms per 100 ms period
MIN_MEMORY = 64 * 1024**2  # below this a node container cannot run its sshd and detect
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_NO_LIMIT = ("max", "none", "-")


class LabError(Exception):
    pass


@dataclass(frozen=True)
class LabNode:
    name: str  # ssh alias, e.g. lab1
    container: str
    ip: str
    cpus: float | None = None  # its CPU quota in cores; None: the host's CPUs
    memory_bytes: int | None = None  # its memory limit; None: the host's memory


def parse_size(value) -> int:
    """Bytes from 2147483648, "2g", "512m", "1.5GiB" (binary units, as `docker run -m`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE_RE.fullmatch(str(value).strip())
    if not match:
        raise LabError(f"memory {value!r} is not a size (bytes, or e.g. 512m, 6g)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _gib(size: int) -> str:
    return f"{size / 1024**3:.1f} GiB"


def check_limits(where: str, cpus, mem, host_cpus: int, host_memory: int):
    """(cores, bytes) for one machine, None meaning no limit; LabError for a bad value."""
    if cpus is not None and str(cpus).strip().lower() not in _NO_LIMIT:
        try:
            cpus = float(cpus)
        except (TypeError, ValueError):
            raise LabError(f"{where}: cpus {cpus!r} is not a number of cores (e.g. 0.5)") from None
        if not MIN_CPUS <= cpus <= host_cpus:  # NaN fails this too
            raise LabError(
                f"{where}: cpus {cpus:g} is outside {MIN_CPUS:g}..{host_cpus}"
                f" (the host has {host_cpus} CPUs)"
            )
    else:
        cpus = None
    if mem is not None and str(mem).strip().lower() not in _NO_LIMIT:
        try:
            size = parse_size(mem)
        except LabError as exc:
            raise LabError(f"{where}: {exc}") from None
        if not MIN_MEMORY <= size <= host_memory:
            raise LabError(
                f"{where}: memory {mem!r} is outside 64m..{_gib(host_memory)} (what the host has)"
            )
        mem = size
    else:
        mem = None
    return cpus, mem


def _per_machine(values, count: int, what: str) -> list:
    if values is None:
        return [None] * count
    if isinstance(values, str):
        values = values.replace(",", " ").split()
    elif not isinstance(values, (list, tuple)):
        values = [values]
    values = list(values)
    if len(values) == 1:
        return values * count  # one value: every machine
    if len(values) != count:
        raise LabError(
            f"--{what} has {len(values)} values for {count} machines:"
            " give one per machine, or one for all"
        )
    return values


def machine_limits(count: int, cpus, mem, info: dict) -> list[tuple[float | None, int | None]]:
    """Each machine's (cores, bytes) from up()'s cpus and mem, checked against the host
    (`info`: the engine's `docker info`)."""
    host_cpus, host_memory = int(info["NCPU"]), int(info["MemTotal"])
    pairs = zip(_per_machine(cpus, count, "cpus"), _per_machine(mem, count, "mem"), strict=True)
    return [
        check_limits(f"lab{i}", c, m, host_cpus, host_memory) for i, (c, m) in enumerate(pairs, 1)
    ]


# Run inside a lab machine (it has the host's cgroup tree, read-write): the limits of its
# engine's cgroup parent. $1 the parent, $2 the CFS quota in us or max, $3 bytes or max.
_LIMITS_SCRIPT = f"""
set -eu
name=$1 quota=$2 mem=$3 cg=/sys/fs/cgroup
if [ -f $cg/cgroup.controllers ]; then
  for c in cpu memory; do
    grep -qw $c $cg/cgroup.subtree_control || echo +$c >$cg/cgroup.subtree_control
  done
  mkdir -p $cg/$name
  echo "$quota {CFS_PERIOD_US}" >$cg/$name/cpu.max
  echo "$mem" >$cg/$name/memory.max
  if [ -f $cg/$name/memory.swap.max ]; then
    if [ "$mem" = max ]; then echo max; else echo 0; fi >$cg/$name/memory.swap.max
  fi
else
  mkdir -p $cg/cpu/$name $cg/memory/$name
  if [ "$quota" = max ]; then quota=-1; fi
  if [ "$mem" = max ]; then mem=-1; fi
  echo {CFS_PERIOD_US} >$cg/cpu/$name/cpu.cfs_period_us
  echo "$quota" >$cg/cpu/$name/cpu.cfs_quota_us
  sw=$cg/memory/$name/memory.memsw.limit_in_bytes
  if [ -f $sw ]; then echo -1 >$sw; fi
  echo "$mem" >$cg/memory/$name/memory.limit_in_bytes
  if [ -f $sw ]; then echo "$mem" >$sw; fi
fi
"""
# Run in a throwaway container after `down`: the machines' cgroup parents, emptied by then.
_RMDIR_SCRIPT = f"""
for d in /sys/fs/cgroup/{PREFIX}-[0-9]* /sys/fs/cgroup/*/{PREFIX}-[0-9]*; do
  [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {{}} + 2>/dev/null
done
true
"""


def _write_limits(container, cpus: float | None, mem: int | None) -> None:
    quota = "max" if cpus is None else str(round(cpus * CFS_PERIOD_US))
    memory = "max" if mem is None else str(mem)
    code, out = container.exec_run(
        ["sh", "-c", _LIMITS_SCRIPT, "sh", container.name, quota, memory]
    )
    if code != 0:
        detail = " ".join(out.decode(errors="replace").split())
        raise LabError(f"{container.name}: cannot set cpus {quota} / memory {memory}: {detail}")


def set_limits(index: int, cpus: float | None, mem: str | int | None, client=None) -> None:
    """Give running machine `index` (lab<index>) a CPU quota in cores and a memory limit
    (bytes or "2g"), at once and for the containers already there; None clears either."""
    client = client or _client()
    info = client.info()
    cpus, mem = check_limits(f"lab{index}", cpus, mem, int(info["NCPU"]), int(info["MemTotal"]))
    try:
        container = client.containers.get(f"{PREFIX}-{index}")
    except NotFound:
        raise LabError(f"lab{index}: no such lab machine ({PREFIX}-{index})") from None
    _write_limits(container, cpus, mem)


def _client():
    return docker.from_env(timeout=600)


def down(client=None, lab_dir: Path | None = None) -> list[str]:
    """Remove every lab container, volume and network; returns what was removed."""
    client = client or _client()
    removed = []
    # each object may vanish between list and remove (another down, a container's --rm)
    for c in client.containers.list(all=True, filters={"label": LABEL}):
        if _gone_or(lambda c=c: c.remove(force=True, v=True)):
            removed.append(c.name)
    for v in client.volumes.list(filters={"label": LABEL}):
        if _gone_or(lambda v=v: v.remove(force=True)):
            removed.append(v.name)
    for n in client.networks.list(filters={"label": LABEL}):
        if _gone_or(n.remove):
            removed.append(n.name)
    if any(r.startswith(f"{PREFIX}-") and r[len(PREFIX) + 1 :].isdigit() for r in removed):
        _remove_cgroups(client)
    if lab_dir is not None:
        shutil.rmtree(lab_dir, ignore_errors=True)
    return removed


def _gone_or(remove) -> bool:
    """remove(); False when the object was already gone."""
    try:
        remove()
    except NotFound:
        return False
    return True


def _remove_cgroups(client) -> None:
    """rmdir the machines' cgroup parents (hygiene: a busy one stays, up() resets it)."""
    try:
        client.containers.run(
            IMAGE,
            entrypoint=["sh", "-c", _RMDIR_SCRIPT],
            remove=True,
            labels={LABEL: "1"},
            cgroupns="host",
            security_opt=["apparmor=unconfined"],
            volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}},
        )
    except DockerException:
        pass


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


def _start_node(client, index: int, pubkey: str, shared: Path):
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
        # The host's cgroup namespace: the engine's containers then see their cgroup paths
        # from the host's root (/deepfleet-lab-N/...), and so their machine's limits.
        cgroupns="host",
        # What a nested engine needs here, --privileged being refused (see DEVELOPERS.md).
        cap_add=["ALL"],
        cap_drop=["SYS_RESOURCE"],
        security_opt=["seccomp=unconfined", "apparmor=unconfined"],
        volumes={
            "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
            volume.name: {"bind": "/var/lib/docker", "mode": "rw"},
            str(shared): {"bind": SHARED, "mode": "rw"},
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


def write_compose_override(lab_dir: Path, cpu_hierarchy: str | None = None) -> None:
    """Clamp the node spec's memlock to what lab machines have, and let the node container
    see its machine's limits.

    Lab machines run without CAP_SYS_RESOURCE, so a container there cannot raise its
    memlock limit above the one the machine itself got from this host. The limits sit on
    the machine engine's cgroup parent: with the host's cgroup namespace (`cgroup: host`)
    a cgroup v2 container mounts the whole tree and reads its ancestors' cpu.max and
    memory.max. Under cgroup v1 a container's hierarchies are its own level only;
    memory.stat still carries the ancestors' memory limit, but the CPU quota needs the cpu
    hierarchy (`cpu_hierarchy`, its real path on the machine) mounted read-only.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = -1 if hard == resource.RLIM_INFINITY else hard
    text = (
        "# written by docker/lab.py: lab machines cannot raise memlock; node containers\n"
        "# see their machine's CPU quota and memory limit\n"
        "services:\n  node:\n    ulimits:\n"
        f"      memlock:\n        soft: {limit}\n        hard: {limit}\n"
        "    cgroup: host\n"
    )
    if cpu_hierarchy:
        text += f"    volumes:\n      - {cpu_hierarchy}:{cpu_hierarchy}:ro\n"
    (lab_dir / "compose.override.yml").write_text(text)


_RATE_RE = re.compile(r"\d+(?:\.\d+)?(?:[kmg]?bit|[kmg]?bps)", re.IGNORECASE)


def check_rate(rate: str) -> str:
    """A tc rate such as 200mbit or 1gbit."""
    if not _RATE_RE.fullmatch(rate.strip()):
        raise LabError(f"link rate {rate!r}: give a tc rate such as 200mbit or 1gbit")
    return rate.strip().lower()


def _tbf(device: str, rate: str) -> list[str]:
    # a burst above a veth's 64 KB offload segments, or tbf drops them all
    return ["tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate,
            "burst", "512kb", "latency", "50ms"]  # fmt: skip


def _host_run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise LabError(f"shaping {what}: {' '.join(command)}: {done.stderr.strip()}")


def _host_device(ifindex: int) -> str:
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name = line.split(":")[0].strip()
        index = Path(f"/sys/class/net/{name}/ifindex")
        if index.is_file() and int(index.read_text()) == ifindex:
            return name
    raise LabError(f"no interface with index {ifindex} on this machine")


def _lab_devices(client):
    """(how to run tc there, device, what it is) for each shaped interface of the lab."""
    for container in client.containers.list(filters={"label": LABEL}):
        pid = str(container.attrs["State"]["Pid"])
        yield ["nsenter", "-t", pid, "-n"], "eth0", container.name
        code, out = container.exec_run(["cat", "/sys/class/net/eth0/iflink"])
        if code != 0:
            raise LabError(f"{container.name}: cannot read its eth0's peer index")
        veth = _host_device(int(out.decode().strip()))
        yield [], veth, f"{container.name}'s veth {veth}"
    network = client.networks.get(NETWORK)
    bridge = f"br-{network.id[:12]}"
    yield [], bridge, f"the lab bridge {bridge}"


def unshape_links(client) -> None:
    """Take the link caps off again (a missing qdisc is no error)."""
    for prefix, device, _ in _lab_devices(client):
        subprocess.run([*prefix, "tc", "qdisc", "del", "dev", device, "root"], capture_output=True)


def shape_links(client, rate: str) -> list[str]:
    """Cap every lab machine's link at `rate` each way, as a switch port would, and this
    machine's (the operator's) link to them too: tc tbf on the machine's eth0 (what it
    sends), on its veth's host end (what it receives) and on the lab bridge (what the
    operator sends). Only the lab's own interfaces are touched. Returns the devices."""
    rate = check_rate(rate)
    shaped = []
    for prefix, device, what in _lab_devices(client):
        _host_run([*prefix, *_tbf(device, rate)], what)
        shaped.append(what)
    return shaped


def _cpu_hierarchy(client, container) -> str | None:
    """cgroup v1: the cpu hierarchy's real path on the machine (cpu may be cpu,cpuacct)."""
    if str(client.info().get("CgroupVersion", "2")) != "1":
        return None
    code, out = container.exec_run(["readlink", "-f", "/sys/fs/cgroup/cpu"])
    path = out.decode(errors="replace").strip()
    if code != 0 or not path.startswith("/sys/fs/cgroup/"):
        raise LabError(f"{container.name}: no cgroup v1 cpu hierarchy under /sys/fs/cgroup")
    return path


def up(
    count: int,
    lab_dir: Path,
    base_image: str = "local",
    client=None,
    cpus=None,
    mem=None,
    link: str | None = None,
    registry: bool = False,
    slurm: int = 0,
) -> list[LabNode]:
    """Start `count` machines. `cpus` (cores) and `mem` (bytes or "6g") are lists with one
    value per machine, or one value (or a list of one) for all; None or "max": no limit.
    `link` (a tc rate, 200mbit) caps each machine's link and the operator's; `registry`
    starts the lab's registry, `slurm` a Slurm cluster on that many machines."""
    if count < 1:
        raise LabError("the lab needs at least one node")
    if not 0 <= slurm <= count:
        raise LabError(f"--slurm {slurm}: the lab has {count} machines")
    client = client or _client()
    limits = machine_limits(count, cpus, mem, client.info())  # before anything changes
    if link:
        check_rate(link)
    down(client, lab_dir)
    build_image(client, base_image)
    lab_dir.mkdir(parents=True)
    lab_dir.chmod(0o700)
    pubkey = _operator_key(lab_dir)
    client.networks.create(NETWORK, driver="bridge", labels={LABEL: "1"})
    try:
        shared = lab_dir / "shared"
        shared.mkdir()
        containers = [_start_node(client, i, pubkey, shared) for i in range(1, count + 1)]
        nodes, keys = [], {}
        for index, (container, (cores, memory)) in enumerate(
            zip(containers, limits, strict=True), 1
        ):
            _wait_ready(container)
            # always written: a parent left from an earlier lab may still carry limits
            _write_limits(container, cores, memory)
            container.reload()
            ip = container.attrs["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
            node = LabNode(f"lab{index}", container.name, ip, cores, memory)
            nodes.append(node)
            keys[node.name] = _host_key(container)
        write_ssh_files(lab_dir, nodes, keys)
        write_compose_override(lab_dir, _cpu_hierarchy(client, containers[0]))
        if link:
            shape_links(client, link)
        if registry:
            start_registry(lab_dir, client)
        if slurm:
            start_slurm(slurm, client)
        return nodes
    except BaseException:
        down(client, lab_dir)
        raise


def machines(client) -> list:
    """The running lab's machines, lab1 first."""
    found = client.containers.list(filters={"label": LABEL, "name": f"{PREFIX}-"})
    machines = [c for c in found if c.name[len(PREFIX) + 1 :].isdigit()]
    return sorted(machines, key=lambda c: int(c.name[len(PREFIX) + 1 :]))


def start_registry(lab_dir: Path, client=None) -> labregistry.LabRegistry:
    """The lab's registry on the operator, trusted by every lab machine's engine."""
    client = client or _client()
    try:
        return labregistry.start(
            client, lab_dir, machines(client), image=IMAGE, network=NETWORK, prefix=PREFIX,
            label=LABEL,
        )  # fmt: skip
    except labregistry.RegistryError as exc:
        raise LabError(str(exc)) from None


def find_registry(lab_dir: Path, client=None) -> labregistry.LabRegistry:
    try:
        return labregistry.find(client or _client(), lab_dir, PREFIX, NETWORK)
    except labregistry.RegistryError as exc:
        raise LabError(str(exc)) from None


def start_slurm(count: int, client=None) -> labslurm.SlurmNode:
    """slurmctld on lab1, slurmd on lab1..lab<count>; returns the controller."""
    client = client or _client()
    found = machines(client)[:count]
    if len(found) < count:
        raise LabError(f"slurm on {count} machines: the lab has {len(found)}")
    nodes = []
    for container in found:
        container.reload()
        ip = container.attrs["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]
        nodes.append(labslurm.SlurmNode(container.attrs["Config"]["Hostname"], ip, container))
    try:
        return labslurm.start(nodes)
    except labslurm.SlurmError as exc:
        raise LabError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start the simulated LAN")
    p_up.add_argument("--nodes", type=int, default=2)
    p_up.add_argument("--base-image", default="local")
    p_up.add_argument(
        "--cpus", help='CPU cores per machine, e.g. "0.9 0.5 0.3", or one for all (max: none)'
    )
    p_up.add_argument(
        "--mem", help='memory per machine, e.g. "6g 4g 2g", or one for all (max: none)'
    )
    p_up.add_argument("--link", help="each machine's link rate, e.g. 200mbit (tc tbf)")
    p_up.add_argument("--registry", action="store_true", help="start the lab's registry too")
    p_up.add_argument("--slurm", type=int, default=0, metavar="N",
                      help="a Slurm cluster on the first N machines")  # fmt: skip
    sub.add_parser("registry", help="start the lab's registry on a running lab")
    p_slurm = sub.add_parser("slurm", help="start Slurm on a running lab's first N machines")
    p_slurm.add_argument("--nodes", type=int, default=2)
    sub.add_parser("down", help="remove everything the lab made")
    parser.add_argument("--dir", type=Path, default=ROOT / ".lab")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "up":
            nodes = up(
                args.nodes, args.dir.resolve(), args.base_image, None, args.cpus, args.mem,
                args.link, args.registry, args.slurm,
            )  # fmt: skip
            for node in nodes:
                limits = [f"{node.cpus:g} cpus"] if node.cpus else []
                limits += [f"{_gib(node.memory_bytes)} memory"] if node.memory_bytes else []
                shown = f", limits {', '.join(limits)}" if limits else ""
                print(f"lab: {node.name} {node.ip} ({node.container}{shown})")
            if args.link:
                print(f"lab: every link capped at {args.link} (the operator's too)")
            print(f"lab: ssh config in {args.dir / 'ssh_config'}")
            if args.registry:
                _say_registry(find_registry(args.dir.resolve()))
            if args.slurm:
                _say_slurm(args.slurm)
        elif args.cmd == "registry":
            _say_registry(start_registry(args.dir.resolve()))
        elif args.cmd == "slurm":
            start_slurm(args.nodes)
            _say_slurm(args.nodes)
        else:
            removed = down(lab_dir=args.dir.resolve())
            print(f"lab: removed {len(removed)} objects")
    except (LabError, APIError, NotFound, subprocess.CalledProcessError) as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


def _say_registry(registry: labregistry.LabRegistry) -> None:
    push = f"deepfleet push-image {registry.address} --cert-dir {registry.trust_dir}"
    print(f"lab: registry at {registry.address}, trusted by every lab machine; push with `{push}`")


def _say_slurm(count: int) -> None:
    names = ", ".join(f"lab{i}" for i in range(1, count + 1))
    print(f"lab: Slurm controller on lab1, nodes {names}; submit there: `ssh -F .lab/ssh_config"
          f" lab1 sbatch --wait {SHARED}/job.sbatch`")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
