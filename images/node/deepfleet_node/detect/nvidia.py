"""NVIDIA: nvidia-smi's --query-gpu CSV, -q -x XML and -L listing, and the collector that
merges them."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable

from .merge import _match
from .parsing import _clean, _csv_rows, _one_line, _strip_ansi, _to_int, normalize_pci, to_bytes
from .runner import _Ctx

NVIDIA_QUERY_FIELDS = (
    "index",
    "name",
    "memory.total",
    "driver_version",
    "pci.bus_id",
    "uuid",
    "compute_cap",
    "mig.mode.current",
)

_CSV_HEADER_CELL_RE = re.compile(r"^([a-z_][a-zA-Z0-9_.]*)(?:\s*\[([^\]]+)\])?$")


def _csv_header(row: list[str]) -> list[tuple[str, str | None]] | None:
    """Header cells as (field, unit), or None when the row is data, not a header."""
    parsed = []
    for cell in row:
        match = _CSV_HEADER_CELL_RE.match(cell)
        if not match:
            return None
        parsed.append((match.group(1), match.group(2)))
    # Data rows of a one-column query (e.g. 'Default') never contain a known field name.
    if not any(name in NVIDIA_QUERY_FIELDS or "." in name or "_" in name for name, _ in parsed):
        return None
    return parsed


def parse_nvidia_smi_csv(text: str, fields: Iterable[str] | None = None) -> list[dict]:
    """Rows of ``nvidia-smi --query-gpu=... --format=csv[,noheader][,nounits]``.

    Columns are named by the header when there is one, otherwise by ``fields`` (the order
    the query asked for). Returns one dict per GPU with the report's keys that the query
    covered; unknown columns are ignored.
    """
    rows = _csv_rows(_strip_ansi(text))
    if not rows:
        return []
    header = _csv_header(rows[0])
    if header is not None:
        rows = rows[1:]
    elif fields is not None:
        header = [(name, None) for name in fields]
    else:
        raise ValueError("CSV has no header and no field list was given")
    names = [name for name, _ in header]
    units = dict(header)
    gpus = []
    for position, row in enumerate(rows):
        if len(row) != len(names):
            raise ValueError(
                f"CSV row {position + 1} has {len(row)} values for {len(names)} columns: "
                + _one_line(", ".join(row), 120)
            )
        raw = dict(zip(names, row, strict=True))
        index = _to_int(raw.get("index"))
        mig_mode = _clean(raw.get("mig.mode.current"))
        gpus.append(
            {
                "index": position if index is None else index,
                "name": _clean(raw.get("name")),
                "memory_bytes": to_bytes(
                    raw.get("memory.total"), units.get("memory.total") or "MiB"
                )
                if "memory.total" in raw
                else None,
                "driver": _clean(raw.get("driver_version")),
                "pci_bus_id": normalize_pci(raw.get("pci.bus_id")),
                "uuid": _clean(raw.get("uuid")),
                "compute_capability": _clean(raw.get("compute_cap")),
                "mig": (mig_mode or "").lower() == "enabled",
            }
        )
    return gpus


def _xml_text(element: ET.Element | None, path: str) -> str | None:
    if element is None:
        return None
    found = element.find(path)
    return None if found is None else _clean(found.text)


def parse_nvidia_smi_xml(text: str) -> dict:
    """``nvidia-smi -q -x``: driver and CUDA version, GPUs with MIG mode and MIG devices."""
    try:
        root = ET.fromstring(_strip_ansi(text).strip())
    except ET.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from None
    if root.tag != "nvidia_smi_log":
        raise ValueError(f"unexpected XML root <{root.tag}>")
    # R610 renamed the header fields to KMD/UMD versions; accept either spelling.
    driver = _xml_text(root, "driver_version") or _xml_text(root, "kmd_version")
    cuda = _xml_text(root, "cuda_version") or _xml_text(root, "cuda_umd_version")
    gpus = []
    for position, gpu in enumerate(root.findall("gpu")):
        mig_devices = []
        for mig in gpu.findall("mig_devices/mig_device"):
            mig_devices.append(
                {
                    "index": _to_int(_xml_text(mig, "index")),
                    "profile": None,
                    "uuid": _xml_text(mig, "uuid"),
                    "memory_bytes": to_bytes(_xml_text(mig, "fb_memory_usage/total"), "MiB"),
                    "gpu_instance_id": _to_int(_xml_text(mig, "gpu_instance_id")),
                    "compute_instance_id": _to_int(_xml_text(mig, "compute_instance_id")),
                }
            )
        current_mig = _xml_text(gpu, "mig_mode/current_mig")
        gpus.append(
            {
                # -q lists GPUs in nvidia-smi index order; minor_number is a device node.
                "index": position,
                "name": _xml_text(gpu, "product_name"),
                "memory_bytes": to_bytes(_xml_text(gpu, "fb_memory_usage/total"), "MiB"),
                "driver": driver,
                "runtime": cuda,
                "compute_capability": _xml_text(gpu, "compute_cap"),
                "pci_bus_id": normalize_pci(_xml_text(gpu, "pci/pci_bus_id") or gpu.get("id")),
                "uuid": _xml_text(gpu, "uuid"),
                "mig": (current_mig or "").lower() == "enabled",
                "mig_devices": mig_devices,
            }
        )
    return {"driver_version": driver, "cuda_version": cuda, "gpus": gpus}


_NVIDIA_L_GPU_RE = re.compile(r"^GPU\s+(\d+):\s*(.*?)\s*\(UUID:\s*([^)\s]+)\s*\)\s*$")
_NVIDIA_L_MIG_RE = re.compile(r"^MIG\s+(.*?)\s+Device\s+(\d+):\s*\(UUID:\s*([^)\s]+)\s*\)\s*$")


def parse_nvidia_smi_list(text: str) -> list[dict]:
    """``nvidia-smi -L``: GPUs with their UUIDs and the MIG devices under each."""
    gpus: list[dict] = []
    for raw in _strip_ansi(text).splitlines():
        line = raw.strip()
        if not line:
            continue
        gpu = _NVIDIA_L_GPU_RE.match(line)
        if gpu:
            gpus.append(
                {
                    "index": int(gpu.group(1)),
                    "name": gpu.group(2) or None,
                    "uuid": gpu.group(3),
                    "mig_devices": [],
                }
            )
            continue
        mig = _NVIDIA_L_MIG_RE.match(line)
        if mig and gpus:
            gpus[-1]["mig_devices"].append(
                {"index": int(mig.group(2)), "profile": mig.group(1), "uuid": mig.group(3)}
            )
            continue
        raise ValueError(f"unrecognised line: {_one_line(line, 120)}")
    return gpus


def _nvidia_query(ctx: _Ctx) -> tuple[str, list[dict] | None]:
    """('missing' | 'failed' | 'unparseable' | 'ok', GPUs) from the CSV query."""
    fields = list(NVIDIA_QUERY_FIELDS)
    while True:
        # With a header (no 'noheader') every column names itself, so a retry with fewer
        # fields cannot shift values into the wrong keys.
        argv = ["nvidia-smi", "--query-gpu=" + ",".join(fields), "--format=csv,nounits"]
        result = ctx.run(argv)
        if result is None:
            return (
                "failed" if any(e["tool"] == "nvidia-smi" for e in ctx.errors) else "missing"
            ), None
        bad = re.search(r'Field "([^"]+)" is not a valid field to query', result.output)
        if bad and bad.group(1) in fields and bad.group(1) not in ("index", "name"):
            # Older drivers do not know newer fields (compute_cap needs R510+): drop and retry.
            fields.remove(bad.group(1))
            continue
        if result.returncode != 0:
            ctx.fail(result)
            return "failed", None
        gpus = ctx.parse("nvidia-smi", parse_nvidia_smi_csv, result.stdout, fields)
        return ("unparseable", None) if gpus is None else ("ok", gpus)


def _collect_nvidia(ctx: _Ctx) -> list[dict]:
    status, gpus = _nvidia_query(ctx)
    if status in ("missing", "failed"):
        # A failed query (NVML/driver trouble) would fail the same way with -q -x.
        return []
    xml = None
    result = ctx.run(["nvidia-smi", "-q", "-x"])
    if result is not None:
        if result.returncode == 0:
            xml = ctx.parse("nvidia-smi", parse_nvidia_smi_xml, result.stdout)
        else:
            ctx.fail(result)
    if gpus is None:
        if not xml or not xml["gpus"]:
            return []
        gpus = [dict(g) for g in xml["gpus"]]
    for gpu in gpus:
        gpu.setdefault("runtime", None)
        gpu.setdefault("mig_devices", [])
    if xml:
        pairs = _match(gpus, xml["gpus"], ("uuid", "pci_bus_id"))
        for i, gpu in enumerate(gpus):
            other = pairs.get(i, {})
            gpu["runtime"] = gpu.get("runtime") or xml.get("cuda_version")
            for key in ("driver", "name", "memory_bytes", "pci_bus_id", "uuid"):
                gpu[key] = gpu.get(key) or other.get(key)
            gpu["mig"] = bool(gpu.get("mig") or other.get("mig"))
            if other.get("mig_devices"):
                gpu["mig_devices"] = [dict(m) for m in other["mig_devices"]]
    if any(g["mig"] for g in gpus):
        # Only -L names MIG devices' UUIDs on older drivers, and CUDA_VISIBLE_DEVICES uses them.
        listed = ctx.run(["nvidia-smi", "-L"])
        if listed is not None and listed.returncode == 0:
            entries = ctx.parse("nvidia-smi", parse_nvidia_smi_list, listed.stdout) or []
            pairs = _match(gpus, entries, ("uuid", "index"))
            for i, gpu in enumerate(gpus):
                by_index = {m["index"]: m for m in gpu["mig_devices"]}
                for mig in pairs.get(i, {}).get("mig_devices", []):
                    known = by_index.get(mig["index"])
                    if known is None:
                        known = {
                            "index": mig["index"],
                            "profile": None,
                            "uuid": None,
                            "memory_bytes": None,
                            "gpu_instance_id": None,
                            "compute_instance_id": None,
                        }
                        gpu["mig_devices"].append(known)
                    known["profile"] = mig["profile"]
                    known["uuid"] = known.get("uuid") or mig["uuid"]
    for gpu in gpus:
        gpu.update(vendor="nvidia", source="nvidia-smi", gfx_target=None)
    return gpus
