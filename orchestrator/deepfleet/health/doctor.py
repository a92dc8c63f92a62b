"""doctor: check every machine before (or while) a cluster runs, and say how to fix it.

Each check is one row per node: `ok`, `warn` or `FAIL`, with the cause and, for what is
wrong, the fix. Nothing is changed on any machine. `render` prints the rows as a table;
the parsers and verdicts below are pure and tested on recorded output.
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from docker.errors import DockerException

from deepfleet.cluster.session import open_session
from deepfleet.errors import DeepfleetError
from deepfleet.images import delivery
from deepfleet.inventory.nodes import NodeSpec
from deepfleet.layout import MASTER_PORT, SSH_PORT
from deepfleet.machines import hostprobe, links, preflight
from deepfleet.machines.connect import PinnedSSHAdapter, connect, fan_out, first_line, run_host
from deepfleet.planning import flavors
from deepfleet.planning.plan import ClusterPlan

PORTS = (SSH_PORT, MASTER_PORT)
GIB = 1024**3
# Under this much room the engine's own writes (containers, logs, checkpoints in volumes)
# fail soon after, even when the image fits.
LOW_FREE = 1 * GIB
# `docker load` (and a pull) keeps the archive's layers and unpacks them next to it
# (the load's temporary copy, or the containerd store's blobs beside their snapshots).
UNPACK_FACTOR = 2
UNLIMITED = -1  # a memlock limit, as compose writes `memlock: -1`
CAP_SYS_RESOURCE = 24
# The compose file that asks for unlimited memlock for deepfleet's node container.
NODE_COMPOSE = "compose/node.yml"
SKEW_WARN = 1.0
SKEW_FAIL = 30.0
CLOCK_SAMPLES = 3
# A FAIL of these does not stop `up`: `up` never reads the clocks, and the network checks
# are the launch preflight's (they need node containers, and a job's launch runs them).
NOT_BLOCKING_UP = frozenset({"clock", "network", "links"})
MARKS = {"ok": "✓", "warn": "!", "FAIL": "✗"}
ASCII_MARKS = {"ok": "ok", "warn": "warn", "FAIL": "FAIL"}

Run = Callable[[str], tuple[int, str, str]]


@dataclass(frozen=True)
class Check:
    node: str
    name: str
    level: str  # ok | warn | FAIL
    detail: str
    fix: str = ""  # what to do about a warn or FAIL; empty for ok

    def line(self) -> str:
        return f"[{self.node}] {self.level:<4} {self.name}: {self.detail}"


def gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


# ---------------------------------------------------------------- table


def render(checks: Iterable[Check], ascii: bool = False) -> str:
    """A table: MACHINE, CHECK, a mark, DETAIL; under a warned or failed row its fix."""
    marks = ASCII_MARKS if ascii else MARKS
    rows = [(c.node, c.name, marks.get(c.level, c.level), c.detail, c) for c in checks]
    header = ("MACHINE", "CHECK", "", "DETAIL")
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(3)]
    indent = " " * (sum(widths) + 2 * 3)  # the DETAIL column, where fix lines start

    def row(cells) -> str:
        return (
            "  ".join(cell.ljust(w) for cell, w in zip(cells[:3], widths, strict=True))
            + "  "
            + cells[3]
        )

    lines = [row(header).rstrip()]
    for *cells, check in rows:
        lines.append(row(cells).rstrip())
        if check.level != "ok" and check.fix:
            lines.append(f"{indent}fix: {check.fix}")
    return "\n".join(lines)


def wants_ascii(stream) -> bool:
    """True when the stream cannot print the marks (a latin-1 or ASCII terminal)."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "".join(MARKS.values()).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return True
    return False


def blocks_up(checks: Iterable[Check]) -> bool:
    """True when a FAIL would stop `up` (every FAIL but the clock's and the network's)."""
    return any(c.level == "FAIL" and c.name not in NOT_BLOCKING_UP for c in checks)


def summary(checks: Iterable[Check]) -> str:
    checks = list(checks)
    failed = sum(c.level == "FAIL" for c in checks)
    warned = sum(c.level == "warn" for c in checks)
    return f"doctor: {len(checks)} checks, {failed} failed, {warned} warnings"


def no_local_engine() -> Check:
    """The row for an operator machine without a Docker engine (cli's `docker.from_env`)."""
    return Check(
        "local", "docker", "warn", "no engine here, images cannot be streamed from this machine",
        fix="start Docker here, or give --image a registry reference the machines can pull",
    )  # fmt: skip


# ---------------------------------------------------------------- pure: parsers, verdicts


def _ports_in_use(text: str) -> set[int]:
    used = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            port = parts[3].rsplit(":", 1)[-1]
            if port.isdigit():
                used.add(int(port))
    return used


def parse_df(text: str) -> tuple[int, str] | None:
    """(free bytes, mount point) from `df -Pk DIR`; None when it says nothing usable."""
    for line in text.splitlines()[1:]:  # the first line is df's header
        parts = line.split()
        # -P: one line per filesystem; a mount point may hold spaces, so it is the rest
        if len(parts) >= 6 and parts[3].isdigit():
            return int(parts[3]) * 1024, " ".join(parts[5:])
    return None


def image_store_dirs(info: dict) -> list[str]:
    """Where the engine keeps image layers: its data root, and containerd's root when the
    engine uses the containerd image store (its layers live there instead)."""
    dirs = [str(info.get("DockerRootDir") or "/var/lib/docker")]
    status = dict(tuple(pair) for pair in info.get("DriverStatus") or () if len(pair) == 2)
    if "containerd.snapshotter" in str(status.get("driver-type", "")):
        dirs.append("/var/lib/containerd")
    return dirs


def layer_sizes(history: list[dict], n_layers: int) -> list[int] | None:
    """Each layer's size, bottom first, from the image's history (top first, with one
    entry per instruction); None when the entries that made layers cannot be told apart
    (an empty layer looks like an instruction that made none)."""
    sizes = [int(h.get("Size") or 0) for h in reversed(history)]
    made = [s for s in sizes if s > 0]
    return made if len(made) == n_layers else None


def missing_bytes(sizes: list[int], chains: list[str], held: set[str]) -> int:
    """The bytes of the layers the machine lacks (a layer is held when its chain is)."""
    return sum(size for size, chain in zip(sizes, chains, strict=True) if chain not in held)


def disk_need(image_size: int, present: bool, missing: int | None = None) -> int:
    """Bytes the machine still needs free for the image: none when it has it, else its
    missing layers (all of them when unknown) unpacked next to their archive."""
    if present:
        return 0
    return UNPACK_FACTOR * (image_size if missing is None else missing)


def disk_verdict(
    node: str, where: str, free: int, ref: str, image_size: int | None, present: bool,
    need: int,
) -> tuple[str, str, str]:  # fmt: skip
    """(level, detail, fix) for the room on the filesystem holding `where`."""
    fix = (
        f"free space on {where} on {node}: `docker system prune` there removes stopped "
        "containers, unused images and build cache (add -a for every unused image), or move "
        "the engine's data-root to a larger disk"
    )
    room = f"{gib(free)} free on {where}"
    if present:
        if free < LOW_FREE:
            return "warn", f"only {room} ({ref} present; containers and volumes need room)", fix
        return "ok", f"{room} ({ref} present)", ""
    if image_size is None:
        if free < LOW_FREE:
            return "warn", f"only {room}; {ref}'s size is not known here", fix
        return "ok", f"{room} ({ref}'s size is not known here: not compared)", ""
    if free < need:
        return (
            "FAIL",
            f"{node} needs ~{gib(need)} free on {where} for {ref} (twice the "
            f"{gib(need / UNPACK_FACTOR)} of layers it lacks: the load unpacks them), "
            f"has {gib(free)}",
            fix,
        )
    if free - need < LOW_FREE:
        return "warn", f"{room}: {ref} needs ~{gib(need)}, leaving {gib(free - need)}", fix
    if need == 0:  # another tag already holds every layer: the load only names it
        return "ok", f"{room} ({ref}'s layers are all there already)", ""
    return "ok", f"{room}, {ref} needs ~{gib(need)}", ""


_LIMIT_LINE = re.compile(r"^Max locked memory\s+(\S+)\s+(\S+)", re.MULTILINE)
_SYSTEMD_LIMIT = re.compile(r"^LimitMEMLOCK(Soft)?=(\S+)", re.MULTILINE)


def _limit(value: str) -> int | None:
    if value in ("unlimited", "infinity"):
        return UNLIMITED
    return int(value) if value.isdigit() else None


def parse_memlock(text: str) -> tuple[int, int] | None:
    """(soft, hard) memlock in bytes, UNLIMITED for none, from /proc/PID/limits or
    `systemctl show docker -p LimitMEMLOCK -p LimitMEMLOCKSoft`; None when neither is there."""
    match = _LIMIT_LINE.search(text)
    if match:
        soft, hard = _limit(match.group(1)), _limit(match.group(2))
        return (soft, hard) if soft is not None and hard is not None else None
    found = {bool(m.group(1)): _limit(m.group(2)) for m in _SYSTEMD_LIMIT.finditer(text)}
    hard = found.get(False)
    if hard is None:
        return None
    soft = found.get(True)
    return (hard if soft is None else soft), hard


def has_capability(capeff: str, bit: int) -> bool | None:
    """Whether a /proc/PID/status CapEff mask (hex) holds capability `bit`."""
    try:
        return bool(int(capeff.strip(), 16) >> bit & 1)
    except ValueError:
        return None


def _bytes(limit: int) -> str:
    if limit == UNLIMITED:
        return "unlimited"
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if limit >= size:
            return f"{limit / size:g} {unit}"
    return f"{limit} bytes"


MEMLOCK_FIX = (
    "LimitMEMLOCK=infinity in a docker.service drop-in (`sudo systemctl edit docker`, add "
    "[Service] and that line, then `sudo systemctl restart docker`); rootless Docker: raise "
    "memlock for its user in /etc/security/limits.conf"
)


def memlock_verdict(limits: tuple[int, int], can_raise: bool | None) -> tuple[str, str, str]:
    """(level, detail, fix) for the engine's memlock: what its containers get, and whether
    it can give deepfleet's node container the unlimited one compose/node.yml asks for
    (raising a hard limit takes CAP_SYS_RESOURCE)."""
    soft, hard = limits
    if soft == hard == UNLIMITED:
        return "ok", "unlimited (containers may pin memory: RDMA/NCCL, DeepSpeed)", ""
    shown = _bytes(soft) if soft == hard else f"{_bytes(soft)} soft, {_bytes(hard)} hard"
    if hard == UNLIMITED or can_raise:
        return (
            "ok",
            f"engine's own limit {shown}; the node container gets unlimited ({NODE_COMPOSE}"
            " sets ulimits memlock -1, and this engine may raise it)",
            "",
        )
    if can_raise is False:
        return (
            "warn",
            f"engine's limit is {shown} and it cannot raise a container's (no "
            f"CAP_SYS_RESOURCE, or rootless): the node container's memlock -1 from "
            f"{NODE_COMPOSE} is refused at start unless a compose override lowers it, and "
            "pinned memory (RDMA/NCCL, DeepSpeed) stays under it",
            MEMLOCK_FIX,
        )
    return (
        "warn",
        f"engine's limit is {shown}: containers started without --ulimit get it; the node "
        f"container's memlock -1 ({NODE_COMPOSE}) is granted only if the engine runs as root",
        MEMLOCK_FIX,
    )


def parse_epoch(text: str) -> tuple[float, float] | None:
    """(seconds, uncertainty) from `date +%s.%N`; a date without %N (busybox) gives whole
    seconds, taken as the middle of the second it names."""
    whole, _, frac = text.strip().partition(".")
    if not whole.lstrip("-").isdigit():
        return None
    if frac.isdigit():
        return float(f"{whole}.{frac}"), 0.0
    return int(whole) + 0.5, 0.5


def clock_skew(t0: float, remote: float, t1: float) -> float:
    """The machine's clock minus this one's, its reading taken as made halfway between
    sending the command (t0) and having the answer (t1), as NTP does."""
    return remote - (t0 + t1) / 2


def best_skew(samples: Iterable[tuple[float, float, float, float]]) -> tuple[float, float]:
    """(skew, error bound) from (t0, remote, uncertainty, t1) readings: the one with the
    shortest round trip, whose midpoint guess can be least wrong."""
    t0, remote, unsure, t1 = min(samples, key=lambda s: s[3] - s[0])
    return clock_skew(t0, remote, t1), (t1 - t0) / 2 + unsure


def clock_verdict(node: str, skew: float, bound: float) -> tuple[str, str, str]:
    """(level, detail, fix): judged on what the skew is at least, given its error bound."""
    way = "ahead of" if skew > 0 else "behind"
    detail = f"{node}'s clock is {abs(skew):.2f} s {way} this machine's (±{bound:.2f} s)"
    least = abs(skew) - bound
    fix = (
        f"enable NTP on {node} (`sudo timedatectl set-ntp true`, and check `timedatectl "
        "status` says synchronized), and on this machine too"
    )
    if least > SKEW_FAIL:
        return (
            "FAIL",
            f"{detail}: TLS certificate checks (pulls, hub downloads) and SSH certificates "
            "can fail, and log lines and checkpoint times disagree between machines",
            fix,
        )
    if least > SKEW_WARN:
        return "warn", f"{detail}: log lines and checkpoint times disagree between machines", fix
    return "ok", f"within {max(abs(skew), bound):.2f} s of this machine's", ""


def ports_fix(node: str, busy: list[int]) -> str:
    what = {
        SSH_PORT: "an sshd, or another cluster's node container",
        MASTER_PORT: "a job left behind",
    }
    held = "; ".join(f"{p}: {what.get(p, 'another program')}" for p in busy)
    query = " or ".join(f"sport = :{p}" for p in busy)
    return (
        f"`sudo ss -ltnp '( {query} )'` on {node} names the process ({held}); stop it, or "
        "`deepfleet down` the cluster that holds it"
    )


def passthrough_fix(problem: str, node: str) -> str:
    if "toolkit" in problem:
        return (
            "install nvidia-container-toolkit, then `sudo nvidia-ctk runtime configure "
            "--runtime=docker` and `sudo systemctl restart docker`"
        )
    if "driver" in problem and "flavor" not in problem:
        return "update the NVIDIA driver, or build the cuda image for the CUDA the driver runs"
    if "asked for" in problem or "built for" in problem:
        return f"give the machine the flavor it can run: `{node}=cpu` in the node list"
    return "see the detail; `deepfleet doctor` again once it is fixed"


def network_fix(line: str) -> str:
    if "in use" in line:
        return (
            "`deepfleet stop` ends a job still running; otherwise stop what holds the port "
            "(`sudo ss -ltnp` on that machine names it)"
        )
    if "cannot reach" in line:
        return (
            "let TCP through between the machines on that port and the ephemeral range "
            "(`sysctl net.ipv4.ip_local_port_range`) in their firewalls, e.g. `sudo ufw allow "
            "from <the other machine's address> proto tcp`"
        )
    return "`deepfleet doctor` again; if it repeats, `deepfleet down` and `deepfleet up`"


def ssh_fix(node: NodeSpec) -> str:
    where = f"{node.user}@{node.host}"
    key = f" -i {node.identity_file}" if node.identity_file else ""
    return (
        f"`ssh -p {node.port}{key} {where} docker version` from here must log in without a "
        f"prompt (the key, the host key in {node.known_hosts}, the machine up and sshd running)"
    )


# What the machine says when the engine does not answer (over plain SSH, as the user).
ENGINE_SH = r"""
command -v docker >/dev/null 2>&1 || echo cli=missing
t=; command -v timeout >/dev/null 2>&1 && t="timeout 5"
$t docker version --format '{{.Server.Version}}' 2>&1 >/dev/null | head -n 2 | sed 's/^/said=/'
set -- $(pidof dockerd 2>/dev/null)
if [ -z "${1:-}" ]; then
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = dockerd ] && { set -- "${p#/proc/}"; break; }
  done
fi
if [ -n "${1:-}" ]; then
  echo "pid=$1"
  sed -n 's/^State:[[:space:]]*\([A-Z]\).*/state=\1/p' "/proc/$1/status" 2>/dev/null
fi
sock=/var/run/docker.sock
case "${DOCKER_HOST:-}" in unix://*) sock=${DOCKER_HOST#unix://} ;; esac
echo "sock=$sock"
[ -S "$sock" ] && echo sock_present=1
command -v systemctl >/dev/null 2>&1 && echo "unit=$(systemctl is-active docker 2>/dev/null)"
true
"""


def parse_facts(text: str) -> dict[str, str]:
    """key=value lines; a repeated key keeps its values joined by a space."""
    facts: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key:
            facts[key] = f"{facts[key]} {value}".strip() if key in facts else value.strip()
    return facts


def engine_cause(facts: dict[str, str], node: str, user: str) -> tuple[str, str]:
    """(detail, fix) for an engine that does not answer a machine whose SSH works."""
    said = facts.get("said", "")[:200]  # the docker CLI's own words, kept to a line
    sock = facts.get("sock") or "/var/run/docker.sock"
    pid = facts.get("pid", "")
    journal = "`journalctl -u docker` says why"
    if facts.get("cli") == "missing":
        return (
            f"docker is not installed on {node} (ssh works; no `docker` command for {user})",
            "install Docker Engine there (https://docs.docker.com/engine/install/), or put "
            "docker on the PATH of non-interactive SSH sessions",
        )
    if "permission denied" in said.lower():
        return (
            f"{user} may not use the engine on {node} (ssh works; permission denied on {sock})",
            f"`sudo usermod -aG docker {user}` on {node} (it takes effect at the next SSH "
            "login), or connect as a user who may",
        )
    if not pid:
        failed = " (the docker unit failed)" if facts.get("unit") == "failed" else ""
        return (
            f"engine not running on {node} (ssh works; {sock} refuses, no dockerd process){failed}",
            f"`sudo systemctl start docker` on {node} (`sudo systemctl enable docker` starts "
            f"it at boot; {journal} it stopped)",
        )
    if facts.get("state") == "T":
        return (
            f"engine frozen on {node} (ssh works; dockerd, pid {pid}, is stopped by a signal)",
            f"`sudo kill -CONT {pid}` on {node}, or `sudo systemctl restart docker`",
        )
    if not facts.get("sock_present"):
        return (
            f"engine not reachable on {node} (ssh works; {sock} is missing, though dockerd "
            f"runs as pid {pid})",
            f"`sudo systemctl restart docker` on {node} makes the socket anew; if the engine "
            f"listens elsewhere, set DOCKER_HOST for {user}'s SSH sessions",
        )
    return (
        f"engine not answering on {node} (ssh works; dockerd runs as pid {pid}, {sock} "
        f"does not answer{': ' + said if said else ''})",
        f"`sudo systemctl restart docker` on {node}; {journal} it hangs",
    )


# ---------------------------------------------------------------- on the machines


def check_engine(node: NodeSpec, timeout: float, exc: DeepfleetError) -> Check:
    """The ssh+docker FAIL, split into SSH's fault or the engine's: connect() opens SSH
    first, so its "SSH works" error means the engine did not answer; plain SSH then asks
    the machine why."""
    if not str(exc).startswith("SSH works"):
        return Check(node.name, "ssh+docker", "FAIL", str(exc), ssh_fix(node))
    try:
        adapter = PinnedSSHAdapter(node, timeout)
    except Exception:  # SSH went away since: connect()'s own words stand
        return Check(node.name, "engine", "FAIL", str(exc), ssh_fix(node))
    try:
        code, out, _ = adapter.run_host(ENGINE_SH, timeout=max(timeout, 20.0))
    except Exception:
        code, out = 1, ""
    finally:
        adapter.close()
    if code != 0 and not out:
        return Check(
            node.name, "engine", "FAIL", str(exc),
            f"`sudo systemctl status docker` on {node.name}; start or restart it",
        )  # fmt: skip
    detail, fix = engine_cause(parse_facts(out), node.name, node.user)
    return Check(node.name, "engine", "FAIL", detail, fix)


def _local_size(local, ref: str) -> tuple[int | None, object]:
    if local is None:
        return None, None
    try:
        image = local.images.get(ref)
        return int(image.attrs.get("Size") or 0) or None, image
    except (DockerException, ValueError):  # not here, or the engine would not say
        return None, None


def _missing(client, local_image) -> int | None:
    """Bytes of the operator's image whose layers the machine lacks (None: not known)."""
    try:
        diff_ids = local_image.attrs.get("RootFS", {}).get("Layers") or []
        sizes = layer_sizes(local_image.history(), len(diff_ids))
        if sizes is None:
            return None
        return missing_bytes(sizes, delivery.chain_ids(diff_ids), delivery.node_chains(client))
    except DockerException:
        return None


def check_disk(node: str, client, run: Run, info: dict, local, ref: str, present: bool) -> Check:
    """Room for the image on the filesystem(s) holding the engine's image store."""
    image_size, local_image = (None, None) if present else _local_size(local, ref)
    missing = _missing(client, local_image) if local_image is not None else None
    need = disk_need(image_size or 0, present, missing)
    tightest = None
    for where in image_store_dirs(info):
        code, out, _ = run(f"df -Pk -- {shlex.quote(where)}")
        found = parse_df(out) if code == 0 else None
        if found and (tightest is None or found[0] < tightest[0]):
            tightest = (found[0], where)
    if tightest is None:
        dirs = " or ".join(image_store_dirs(info))
        return Check(
            node, "disk", "warn", f"could not read the free space on {dirs} (df)",
            f"`df -h {dirs}` on {node}",
        )  # fmt: skip
    level, detail, fix = disk_verdict(
        node, tightest[1], tightest[0], ref, image_size, present, need
    )
    return Check(node, "disk", level, detail, fix)


MEMLOCK_SH = r"""
set -- $(pidof dockerd 2>/dev/null)
if [ -z "${1:-}" ]; then
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = dockerd ] && { set -- "${p#/proc/}"; break; }
  done
fi
if [ -n "${1:-}" ] && [ -r "/proc/$1/limits" ]; then
  grep '^Max locked memory' "/proc/$1/limits"
  sed -n 's/^CapEff:[[:space:]]*/capeff=/p' "/proc/$1/status"
elif command -v systemctl >/dev/null 2>&1; then
  systemctl show docker -p LimitMEMLOCK -p LimitMEMLOCKSoft 2>/dev/null
fi
true
"""


def check_memlock(node: str, run: Run, info: dict) -> Check:
    """The engine's memlock limit, what its containers inherit unless told otherwise."""
    code, out, _ = run(MEMLOCK_SH)
    limits = parse_memlock(out) if code == 0 else None
    if limits is None:
        return Check(
            node, "memlock", "warn", "could not read the engine's memlock limit",
            f"`cat /proc/$(pidof dockerd)/limits` on {node} shows it; {MEMLOCK_FIX}",
        )  # fmt: skip
    capeff = parse_facts(out).get("capeff")
    can_raise = has_capability(capeff, CAP_SYS_RESOURCE) if capeff else None
    if any("rootless" in str(o) for o in info.get("SecurityOptions") or ()):
        can_raise = False  # its capabilities are its user namespace's, not the host's
    level, detail, fix = memlock_verdict(limits, can_raise)
    return Check(node, "memlock", level, detail, fix)


def check_clock(node: str, run: Run, clock=time.time, samples: int = CLOCK_SAMPLES) -> Check:
    """The machine's clock against this one's, from the quickest of a few readings."""
    readings = []
    for _ in range(samples):
        t0 = clock()
        code, out, _ = run("date +%s.%N")
        t1 = clock()
        parsed = parse_epoch(out) if code == 0 else None
        if parsed:
            readings.append((t0, parsed[0], parsed[1], t1))
    if not readings:
        return Check(
            node, "clock", "warn", "could not read the machine's clock (date +%s)",
            f"`date` on {node}",
        )  # fmt: skip
    level, detail, fix = clock_verdict(node, *best_skew(readings))
    return Check(node, "clock", level, detail, fix)


def _guarded(node: str, name: str, fn) -> Check:
    """A check that cannot be made is a warning, never the end of the machine's checks."""
    try:
        return fn()
    except Exception as exc:  # paramiko and docker-py raise many types
        return Check(
            node, name, "warn", f"not checked: {first_line(exc)}",
            f"`deepfleet doctor` again; if it repeats, check {node}'s {name} by hand",
        )  # fmt: skip


def check_node(node: NodeSpec, local, image: str | None, cluster_up: bool, timeout: float):
    checks: list[Check] = []

    def add(name, level, detail, fix=""):
        checks.append(Check(node.name, name, level, detail, fix))

    try:
        client = connect(node, timeout)
    except DeepfleetError as exc:
        checks.append(check_engine(node, timeout, exc))
        return checks
    run: Run = lambda cmd: run_host(client, cmd)  # noqa: E731
    try:
        version = client.version()
        add("ssh+docker", "ok", f"{node.docker_url}, engine {version.get('Version')}")
        facts = hostprobe.probe(client, node.name, run_host)
        flavor = hostprobe.choose_flavor(facts, node.flavor)
        gpus = f"{facts.nvidia_gpus} NVIDIA" if facts.nvidia_gpus else (
            "AMD (/dev/kfd)" if facts.has_amd else "none"
        )  # fmt: skip
        if facts.nvidia_driver:
            gpus += f", driver {facts.nvidia_driver}"
        add("gpus", "ok", f"{gpus}; flavor {flavor}")
        ref = image or flavors.get(flavor).image
        labels = delivery.local_labels(local, ref)
        for problem in hostprobe.problems(facts, flavor, ref, labels.get(delivery.CUDA_LABEL)):
            add("gpu passthrough", "FAIL", problem, passthrough_fix(problem, node.name))
        want = delivery.local_image_id(local, ref) if local is not None else None
        try:
            have = client.images.get(ref).id
        except Exception:
            have = None
        present = bool(have and (want is None or have == want))
        if present:
            add("image", "ok", f"{ref} present")
        elif want:
            add("image", "ok", f"{ref} will be streamed from this machine at `up`")
        elif delivery.names_registry(ref):
            add(
                "image", "warn", f"{ref} will be pulled at `up`",
                f"`docker pull {ref}` on {node.name} must work (registry reachable, logged in)",
            )  # fmt: skip
        else:
            add(
                "image", "FAIL", f"{ref} is not built here, nor on {node.name}",
                f"`make images FLAVOR={flavor}` on this machine (or give --image a reference "
                "the machines can pull)",
            )  # fmt: skip
        try:
            info = client.info()  # the probe read it a moment ago; only the data root is new
        except DockerException:
            info = {}
        checks.append(
            _guarded(
                node.name,
                "disk",
                lambda: check_disk(node.name, client, run, info, local, ref, present),
            )
        )
        checks.append(_guarded(node.name, "memlock", lambda: check_memlock(node.name, run, info)))
        checks.append(_guarded(node.name, "clock", lambda: check_clock(node.name, run)))
        code, out, _ = run("ss -ltnH 2>/dev/null || netstat -ltn 2>/dev/null")
        if code == 0 and out.strip():
            busy = sorted(_ports_in_use(out) & set(PORTS))
            if busy and not cluster_up:
                add(
                    "ports", "FAIL", f"port(s) {busy} already in use on the host network",
                    ports_fix(node.name, busy),
                )  # fmt: skip
            else:
                add(
                    "ports",
                    "ok",
                    f"{', '.join(map(str, PORTS))} " + ("in use by deepfleet" if busy else "free"),
                )
        else:
            add(
                "ports", "warn", "could not list listening ports (no ss/netstat)",
                f"install iproute2 (ss) on {node.name}, or check ports {PORTS} by hand",
            )  # fmt: skip
    except DeepfleetError as exc:
        add(
            "probe", "FAIL", exc.one_line(),
            f"`ssh {node.user}@{node.host} docker info` on this machine shows what the engine "
            "says",
        )  # fmt: skip
    finally:
        client.close()
    return checks


def run(nodes: list[NodeSpec], local, image: str | None, cluster_up: bool, timeout: float):
    results, errors = fan_out(
        nodes, lambda n: check_node(n, local, image, cluster_up, timeout), lambda n: n.name
    )
    checks = [c for n in nodes for c in results.get(n.name, [])]
    checks += [
        Check(
            name,
            "doctor",
            "FAIL",
            e.one_line(),
            f"`deepfleet doctor` again; if it repeats, check {name} by hand (`docker info` there)",
        )  # fmt: skip
        for name, e in errors.items()
    ]
    return checks


def network_checks(session, plan: ClusterPlan | None = None, timeout: float = 5.0) -> list[Check]:
    """The launch preflight, listing every path that fails (a launch stops at the first)."""
    try:
        plan = plan or session.plan()
        started = time.monotonic()
        checked, findings = preflight.check(session, plan, timeout)
    except DeepfleetError as exc:  # e.g. the saved reports no longer make a plan
        return [
            Check(
                exc.node or "cluster",
                "network",
                "FAIL",
                exc.one_line(),
                "`deepfleet status` shows each machine; `deepfleet up` again if one changed",
            )  # fmt: skip
        ]
    if findings:
        return [Check(f.node, "network", "FAIL", f.line, network_fix(f.line)) for f in findings]
    took = time.monotonic() - started
    detail = f"{preflight.summary(plan, checked)} ({took:.1f} s)"
    return [Check(plan.master.name, "network", "ok", detail)]


def cluster_network_checks(store, timeout: float = 15.0, probe_timeout: float = 5.0):
    """network_checks for the cluster that is up; a node that cannot be reached is a warning
    here, because its own ssh+docker line already says why."""
    try:
        session = open_session(store, timeout)
    except DeepfleetError as exc:
        return [
            Check(
                "cluster",
                "network",
                "warn",
                f"not checked: {exc.one_line()}",
                "the machine's own FAIL above says what to do; then `deepfleet doctor` again",
            )  # fmt: skip
        ]
    try:
        return network_checks(session, timeout=probe_timeout)
    finally:
        session.close()


def links_checks(records: list[dict], failures: list[str], age: float | None) -> list[Check]:
    """Rows for the measured links: a warning for each link (or machine) far slower than the
    others or with a high round-trip time, and for each link that could not be measured."""
    checks = [Check(v.node, "links", "warn", v.detail, v.fix) for v in links.assess(records)]
    for line in failures:
        node = line.split(":", 1)[0].split(" ")[0] if line else "cluster"
        checks.append(
            Check(
                "operator" if line.startswith("this machine") else node,
                "links",
                "warn",
                f"not measured: {line}",
                "a firewall between them? the `network` rows say which ports answer; then "
                "`deepfleet links`",
            )  # fmt: skip
        )
    if not checks and records:
        slowest = min(records, key=links.rate)
        detail = (
            f"{len(records)} links {links.age_text(age)}; the slowest "
            f"{links.link_name(slowest)} {links.rate(slowest) / links.MB:.1f} MB/s, "
            f"round trips up to {max(r['rtt_s'] for r in records) * 1e3:.2f} ms"
        )
        checks.append(Check(records[0]["b"], "links", "ok", detail))
    return checks


def cluster_links_checks(store, timeout: float = 15.0) -> list[Check]:
    """links_checks for the cluster that is up, measured again when the recorded table is
    older than the links' max age (and recorded)."""
    try:
        state = store.load()
        if links.stale(state, time.time()):
            session = open_session(store, timeout)
            try:
                measured = links.measure(session.state, session.clients)
                state = session.state
                state.record_links(measured.links, measured.failures, measured.measured_at)
                store.save(state)
            finally:
                session.close()
    except DeepfleetError as exc:
        return [
            Check(
                "cluster",
                "links",
                "warn",
                f"not measured: {exc.one_line()}",
                "the machine's own FAIL above says what to do; then `deepfleet links`",
            )  # fmt: skip
        ]
    return links_checks(state.links, state.link_failures, state.links_age(time.time()))
