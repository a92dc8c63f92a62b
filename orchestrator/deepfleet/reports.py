"""Reports: a node container's `detect --json` output as a typed NodeReport."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from .errors import ReportError

SCHEMA = 1


@dataclass(frozen=True)
class GPU:
    index: int
    vendor: str
    name: str
    memory_bytes: int | None = None
    driver: str | None = None
    runtime: str | None = None  # NVIDIA: the newest CUDA the driver runs; AMD: ROCm release
    compute_capability: str | None = None
    gfx_target: str | None = None
    pci_bus_id: str | None = None


@dataclass(frozen=True)
class NodeReport:
    hostname: str
    ips: tuple[str, ...]
    cpu_count: int
    memory_bytes: int
    accelerator: str  # what the image's torch can drive: cuda, rocm, cpu
    gpu_vendor: str
    gpus: tuple[GPU, ...]
    versions: dict[str, str | None] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    # GPU architectures the image's torch carries kernels for (sm_90, gfx942, ...)
    torch_arch_list: tuple[str, ...] = ()
    # The smallest cgroup limit over the node container and its ancestors (a machine-wide
    # limit shows here when the container shares the host's cgroup namespace); None: none.
    memory_limit_bytes: int | None = None
    cpu_quota: float | None = None  # cores, from the CFS quota

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def memory_room(self) -> int:
        """The memory a job may use on that machine: its RAM, or less under a limit."""
        if self.memory_limit_bytes is None:
            return self.memory_bytes
        if self.memory_bytes <= 0:  # MemTotal unread: the limit is all that is known
            return self.memory_limit_bytes
        return min(self.memory_bytes, self.memory_limit_bytes)

    @property
    def gpu_summary(self) -> str:
        if not self.gpus:
            return "none"
        names: dict[str, int] = {}
        for gpu in self.gpus:
            names[gpu.name] = names.get(gpu.name, 0) + 1
        return ", ".join(f"{n}x {name}" for name, n in names.items())


def _gpu(raw: dict) -> GPU:
    return GPU(
        index=int(raw["index"]),
        vendor=str(raw.get("vendor") or "other"),
        name=str(raw.get("name") or "unknown"),
        memory_bytes=int(raw["memory_bytes"]) if raw.get("memory_bytes") is not None else None,
        driver=raw.get("driver"),
        runtime=raw.get("runtime"),
        compute_capability=raw.get("compute_capability"),
        gfx_target=raw.get("gfx_target"),
        pci_bus_id=raw.get("pci_bus_id"),
    )


def _optional(raw: dict, key: str, kind):
    """None stays None (absent in reports from older images); a value must be positive."""
    value = raw.get(key)
    if value is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0):
        raise ValueError(f"{key} {value!r} is not a positive number")
    return kind(value)


def parse(text: str | bytes, node: str | None = None) -> NodeReport:
    """Parse detect's JSON; anything malformed is a ReportError naming the node."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        snippet = " ".join(text.split())[:120]
        raise ReportError(f"detect printed no JSON report ({exc.msg}): {snippet!r}", node) from exc
    if not isinstance(raw, dict):
        raise ReportError("detect report is not a JSON object", node)
    if raw.get("schema") != SCHEMA:
        raise ReportError(f"detect report schema {raw.get('schema')!r}, expected {SCHEMA}", node)
    try:
        return NodeReport(
            hostname=str(raw["hostname"]),
            ips=tuple(str(ip) for ip in raw.get("ips") or ()),
            cpu_count=int(raw["cpu_count"]),
            memory_bytes=int(raw["memory_bytes"]),
            accelerator=str(raw.get("accelerator") or "cpu"),
            gpu_vendor=str(raw.get("gpu_vendor") or "none"),
            gpus=tuple(_gpu(g) for g in raw.get("gpus") or ()),
            versions={
                k: (str(v) if v is not None else None)
                for k, v in (raw.get("versions") or {}).items()
            },
            errors=tuple(f"{e.get('tool')}: {e.get('error')}" for e in raw.get("errors") or ()),
            torch_arch_list=tuple(str(a) for a in raw.get("torch_arch_list") or ()),
            memory_limit_bytes=_optional(raw, "memory_limit_bytes", int),
            cpu_quota=_optional(raw, "cpu_quota", float),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportError(f"detect report is missing or has a bad field: {exc}", node) from exc
