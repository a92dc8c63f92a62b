"""The machine around the GPUs: its addresses, memory, and the cgroup limits this process
runs under."""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .parsing import _json_from_text, to_bytes
from .runner import _Ctx


def parse_ip_addr_json(text: str) -> list[str]:
    """``ip -j addr``: the host's addresses without loopback and link-local ones."""
    data = _json_from_text(text)
    if not isinstance(data, list):
        raise ValueError("ip -j output is not a list")
    addresses = []
    for iface in data:
        if not isinstance(iface, dict) or "LOOPBACK" in (iface.get("flags") or []):
            continue
        for info in iface.get("addr_info") or []:
            if info.get("family") in ("inet", "inet6") and info.get("local"):
                addresses.append(str(info["local"]))
    return _usable_ips(addresses)


def _usable_ips(candidates: Iterable[str]) -> list[str]:
    result = []
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate.split("%")[0])
        except ValueError:
            continue
        if address.is_loopback or address.is_link_local or address.is_unspecified:
            continue
        text = str(address)
        if text not in result:
            result.append(text)
    return result


def parse_meminfo(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return to_bytes(line.partition(":")[2].strip(), "kB")
    return None


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


CGROUP_ROOT = "/sys/fs/cgroup"

# cgroup v1 writes "no limit" as a page-rounded LONG_MAX (9223372036854771712); anything
# this large is no limit.
_NO_LIMIT_BYTES = 1 << 60


def _positive_int(text: str | None) -> int | None:
    try:
        value = int((text or "").strip())
    except ValueError:
        return None
    return value if 0 < value < _NO_LIMIT_BYTES else None


def _quota(quota: str | None, period: str | None) -> float | None:
    """Cores from a CFS quota and period in microseconds; None for none or garbage."""
    try:
        q, p = int((quota or "").strip()), int((period or "").strip())
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _levels(mount: str, path: str) -> list[str]:
    """The directories of cgroup `path` and every ancestor under `mount`, deepest first.

    Where the container sees only its own level (a private cgroup namespace, or cgroup v1's
    own-level mount), the deeper ones do not exist there and `mount` itself is that level.
    """
    parts = [p for p in path.strip().split("/") if p]
    if ".." in parts:  # a cgroup outside this namespace: only the mount's own level
        parts = []
    return [mount + "".join(f"/{p}" for p in parts[:n]) for n in range(len(parts), -1, -1)]


def _lowest(values: Iterable[Any]) -> Any:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def cgroup_limits(read_text: Callable[[str], str | None]) -> dict:
    """The memory limit (bytes) and CPU quota (cores) this process runs under, or None each.

    The smallest over its cgroup and every ancestor visible under /sys/fs/cgroup: a
    machine-wide limit set on a parent cgroup bounds every container under it, and is
    visible when the container shares the host's cgroup namespace. cgroup v2: memory.max
    and cpu.max ("max 100000" = none, "30000 100000" = 0.3 cores). v1: memory.limit_in_bytes
    and memory.stat's hierarchical_memory_limit (which carries the ancestors' limit even
    where only the own level is mounted), cpu.cfs_quota_us / cpu.cfs_period_us.
    """
    lines = [line.split(":", 2) for line in (read_text("/proc/self/cgroup") or "").splitlines()]
    lines = [parts for parts in lines if len(parts) == 3]
    memory: list[int | None] = []
    cpu: list[float | None] = []
    if read_text(f"{CGROUP_ROOT}/cgroup.controllers") is not None:  # v2, unified
        path = next((p for h, c, p in lines if h == "0" and not c), "/")
        for level in _levels(CGROUP_ROOT, path):
            memory.append(_positive_int(read_text(f"{level}/memory.max")))
            fields = (read_text(f"{level}/cpu.max") or "").split()
            cpu.append(_quota(*fields) if len(fields) == 2 else None)
    else:  # v1: one hierarchy per controller

        def path_of(controller: str) -> str:
            return next((p for _, c, p in lines if controller in c.split(",")), "/")

        for level in _levels(f"{CGROUP_ROOT}/memory", path_of("memory")):
            memory.append(_positive_int(read_text(f"{level}/memory.limit_in_bytes")))
            for line in (read_text(f"{level}/memory.stat") or "").splitlines():
                key, _, value = line.partition(" ")
                if key == "hierarchical_memory_limit":
                    memory.append(_positive_int(value))
        for level in _levels(f"{CGROUP_ROOT}/cpu", path_of("cpu")):
            cpu.append(
                _quota(
                    read_text(f"{level}/cpu.cfs_quota_us"), read_text(f"{level}/cpu.cfs_period_us")
                )
            )
    quota = _lowest(cpu)
    return {
        "memory_limit_bytes": _lowest(memory),
        "cpu_quota": round(quota, 4) if quota is not None else None,
    }


def _cpu_count(quota: float | None) -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    # A container's --cpus limit is a CFS quota, invisible to the affinity mask.
    if quota and quota > 0:
        count = min(count, max(1, math.ceil(quota)))
    return count


def _host_ips(ctx: _Ctx, hostname: str) -> list[str]:
    result = ctx.run(["ip", "-j", "addr"])
    if result is not None and result.returncode == 0:
        try:
            return parse_ip_addr_json(result.stdout)
        except ValueError:
            pass
    result = ctx.run(["hostname", "-I"])
    if result is not None and result.returncode == 0:
        ips = _usable_ips(result.stdout.split())
        if ips:
            return ips
    candidates: list[str] = []

    def resolve() -> None:
        try:
            candidates.extend(str(info[4][0]) for info in socket.getaddrinfo(hostname, None))
        except OSError:
            pass

    # getaddrinfo has no timeout of its own and a broken resolver can stall for minutes.
    resolver = threading.Thread(target=resolve, daemon=True)
    resolver.start()
    resolver.join(min(ctx.timeout, 3.0))
    candidates = list(candidates)
    try:
        # Connecting a UDP socket sends nothing; it only picks the outgoing interface.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            candidates.append(probe.getsockname()[0])
    except OSError:
        pass
    return _usable_ips(candidates)
