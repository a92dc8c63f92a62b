"""Reports: a node container's `detect --json` output as a typed NodeReport.

Its shape is the node package's schemas/report.schema.json, the file detect checks its
own reports against; here every report is validated against that file's top level, which
reports saved from older images also meet.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources

from deepfleet.errors import ReportError


@cache
def _schema() -> dict:
    return json.loads(
        (resources.files("deepfleet_node") / "schemas" / "report.schema.json").read_text()
    )


# jsonschema is imported only when a report is checked: the node image, which has none,
# imports this module too (the memory model's tests, through compat) but never parses a report.
@cache
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(_schema())


def _schema_error(raw: dict):
    """The most telling way raw breaks the schema, or None."""
    from jsonschema.exceptions import best_match

    return best_match(_validator().iter_errors(raw))


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


def _not_json(token: str):
    # Python's json reads NaN and Infinity, which JSON has not; the schema cannot refuse a
    # NaN (no comparison fails on it), so they stop here.
    raise ValueError(f"{token} is not a JSON number")


def _where(path) -> str:
    where = ""
    for part in path:
        where += f"[{part}]" if isinstance(part, int) else f"{'.' if where else ''}{part}"
    return where


def _schema_problem(error) -> str:
    """One line naming the field and what is wrong with it, in the schema's words."""
    where = _where(error.absolute_path)

    def at(key) -> str:
        return f"{where}.{key}" if where else str(key)

    if error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        return f"{at(missing)} is missing"
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        unknown = sorted(str(k) for k in error.instance if k not in known)
        return f"{at(unknown[0])} is not a known key"
    title = error.schema.get("title")
    if title:
        return f"{where} {error.instance!r} is not {title}"
    return f"{where} {error.message}" if where else error.message


def parse(text: str | bytes, node: str | None = None) -> NodeReport:
    """Parse detect's JSON; anything malformed is a ReportError naming the node."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    try:
        raw = json.loads(text, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        snippet = " ".join(text.split())[:120]
        raise ReportError(f"detect printed no JSON report ({exc.msg}): {snippet!r}", node) from exc
    except ValueError as exc:
        raise ReportError(f"detect report is not plain JSON: {exc}", node) from exc
    if not isinstance(raw, dict):
        raise ReportError("detect report is not a JSON object", node)
    # Named first: a report of another schema would break other fields than this one.
    expected = _schema()["properties"]["schema"]["const"]
    if raw.get("schema") != expected:
        raise ReportError(f"detect report schema {raw.get('schema')!r}, expected {expected}", node)
    error = _schema_error(raw)
    if error is not None:
        problem = _schema_problem(error)
        raise ReportError(f"detect report is missing or has a bad field: {problem}", node)
    limit, quota = raw.get("memory_limit_bytes"), raw.get("cpu_quota")
    return NodeReport(
        hostname=raw["hostname"],
        ips=tuple(raw.get("ips") or ()),
        cpu_count=int(raw["cpu_count"]),
        memory_bytes=int(raw["memory_bytes"]),
        accelerator=str(raw.get("accelerator") or "cpu"),
        gpu_vendor=str(raw.get("gpu_vendor") or "none"),
        gpus=tuple(_gpu(g) for g in raw.get("gpus") or ()),
        versions={
            k: (str(v) if v is not None else None) for k, v in (raw.get("versions") or {}).items()
        },
        errors=tuple(f"{e['tool']}: {e['error']}" for e in raw.get("errors") or ()),
        torch_arch_list=tuple(raw.get("torch_arch_list") or ()),
        # None or absent (reports from older images): no limit
        memory_limit_bytes=None if limit is None else int(limit),
        cpu_quota=None if quota is None else float(quota),
    )
