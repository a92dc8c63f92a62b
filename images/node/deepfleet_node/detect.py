"""Node inventory: what this machine (or container) has and what its torch can use.

``python -m deepfleet_node.detect --json`` prints one JSON report (schema 1) and exits 0,
whatever the GPU tools do. Only the standard library is imported here: torch is probed in
a child process with a timeout, because importing it or initialising a broken driver can
hang or crash, and the report must come out regardless.

Layers:
- pure parsers (``parse_*``): tool output text -> plain dicts, raising ValueError on
  anything they do not recognise;
- ``run_tool``: runs one external command with a hard timeout;
- ``collect``: runs the tools through an injectable runner and composes the report.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import io
import ipaddress
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
DEFAULT_TIMEOUT = 10.0
TIMEOUT_ENV = "DEEPFLEET_DETECT_TIMEOUT"
# Importing torch and counting devices takes far longer than any SMI call (cold page cache,
# CUDA/HIP init), so it gets its own, larger budget.
TORCH_TIMEOUT_ENV = "DEEPFLEET_DETECT_TORCH_TIMEOUT"
DEFAULT_TORCH_TIMEOUT = 60.0
VISIBLE_ENV_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")

# Where vendor tools live when a container's PATH was not set up for them.
EXTRA_TOOL_DIRS = ("/opt/rocm/bin", "/usr/lib/wsl/lib", "/usr/local/nvidia/bin")

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

GPU_KEYS = (
    "index",
    "physical_index",
    "vendor",
    "name",
    "memory_bytes",
    "driver",
    "runtime",
    "compute_capability",
    "gfx_target",
    "pci_bus_id",
    "uuid",
    "mig",
    "mig_devices",
    "source",
)

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_UNIT_BYTES = {
    "b": 1,
    "byte": 1,
    "bytes": 1,
    # GPU tools say KB/MB/GB but mean KiB/MiB/GiB (rocminfo pools, amd-smi VRAM: an 8 GiB
    # RX 6600 reports "8176 MB"), so both spellings are binary here.
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}


# --------------------------------------------------------------------------- helpers


def _strip_ansi(text: str) -> str:
    return _ANSI_RE.sub("", text)


def _clean(value: Any) -> str | None:
    """A tool's value, or None for the many ways tools say 'unknown'."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    if text.startswith("[") and text.endswith("]"):
        # nvidia-smi: [N/A], [Not Supported], [Requested functionality has been deprecated]
        return None
    if text.lower() in {"n/a", "na", "none", "unknown", "not supported", "unsupported", "null"}:
        return None
    return text


def _to_int(value: Any) -> int | None:
    text = _clean(value)
    if text is None:
        return None
    try:
        return int(text, 0) if text.lower().startswith("0x") else int(text)
    except ValueError:
        return None


def to_bytes(value: Any, default_unit: str = "b") -> int | None:
    """Parse '81559 MiB', '4278190080', {'value': 8176, 'unit': 'MB'} into bytes."""
    if isinstance(value, dict):
        return to_bytes(value.get("value"), str(value.get("unit") or default_unit))
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number, unit = float(value), default_unit
    else:
        text = _clean(value)
        if text is None:
            return None
        match = re.match(r"^([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)", text)
        if not match:
            return None
        number = float(match.group(1))
        unit = match.group(2) or default_unit
    factor = _UNIT_BYTES.get(unit.lower())
    if factor is None:
        return None
    return int(number * factor)


def normalize_pci(value: Any) -> str | None:
    """'00000000:8D:00.0' (NVIDIA) and '0000:8d:00.0' (AMD) -> '0000:8d:00.0'."""
    text = _clean(value)
    if text is None:
        return None
    match = re.match(
        r"^(?:([0-9a-fA-F]+):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$",
        text,
    )
    if not match:
        return text
    domain = int(match.group(1) or "0", 16)
    bus, dev, fn = int(match.group(2), 16), int(match.group(3), 16), int(match.group(4))
    return f"{domain:04x}:{bus:02x}:{dev:02x}.{fn}"


def _bdf(pci: str | None) -> str | None:
    """Bus/device/function without the domain: rocminfo's BDFID has no domain."""
    if not pci:
        return None
    match = re.match(r"^(?:[0-9a-f]+:)?([0-9a-f]{2}:[0-9a-f]{2}\.[0-7])$", pci)
    return match.group(1) if match else None


def _amd_uuid(value: Any) -> str | None:
    """rocm-smi 'Unique ID' 0x8d14... and rocminfo 'GPU-8d14...' name the same GPU.

    rocminfo prints 'GPU-XX' when the GPU has no unique id (consumer cards, APUs).
    """
    text = _clean(value)
    if text is None:
        return None
    lowered = text.lower()
    if lowered.startswith("gpu-"):
        lowered = lowered[4:]
    if lowered.startswith("0x"):
        lowered = lowered[2:]
    if not lowered or set(lowered) <= {"x"} or not re.fullmatch(r"[0-9a-f]+", lowered):
        return None
    return "GPU-" + lowered


def gfx_from_override(value: str | None) -> str | None:
    """HSA_OVERRIDE_GFX_VERSION '10.3.0' -> 'gfx1030', '9.0.10' -> 'gfx90a'."""
    text = _clean(value)
    if text is None:
        return None
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    major, minor, step = (int(p) for p in parts)
    return f"gfx{major}{minor:x}{step:x}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Lines that name a cause, preferred over whatever else a failing tool printed.
_STRONG_ERROR_RE = re.compile(
    r"\berror\b|fail|unable|cannot|can't|couldn't|not loaded|not initialized|mismatch|"
    r"no devices were found|no amd gpus|not a valid field|permission denied",
    re.IGNORECASE,
)
_WEAK_ERROR_RE = re.compile(
    r"no such file|not found|invalid|unknown|denied|warning|not supported", re.IGNORECASE
)


def summarize_error(text: str, returncode: int | None = None) -> str:
    """One line naming why a tool failed, picked from what it printed."""
    lines = [ln.strip() for ln in _strip_ansi(text or "").splitlines() if ln.strip()]
    for pattern in (_STRONG_ERROR_RE, _WEAK_ERROR_RE):
        for line in lines:
            if pattern.search(line):
                return _one_line(line)
    if lines:
        return _one_line(lines[0])
    if returncode is not None:
        return f"exited with status {returncode} and printed nothing"
    return "printed nothing"


def _json_from_text(text: str) -> Any:
    """First JSON value in text; tools print warnings before it ('WARNING: No AMD GPUs')."""
    text = text or ""
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            return decoder.raw_decode(stripped)[0]
        except json.JSONDecodeError:
            pass
    for match in re.finditer(r"^[ \t]*([{\[])", text, re.MULTILINE):
        try:
            return decoder.raw_decode(text[match.start(1) :])[0]
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON value found in output")


# --------------------------------------------------------------------------- NVIDIA parsers


def _csv_rows(text: str) -> list[list[str]]:
    reader = csv.reader(io.StringIO(text), skipinitialspace=True)
    return [[cell.strip() for cell in row] for row in reader if any(c.strip() for c in row)]


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


# --------------------------------------------------------------------------- AMD parsers


def _norm_key(key: Any) -> str:
    return " ".join(str(key).replace("\t", " ").split()).rstrip(":").strip().lower()


def _pick(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = mapping.get(key)
        if _clean(value) is not None:
            return value
    return None


def _rocm_smi_card_to_gpu(card: int, props: Mapping[str, Any]) -> dict:
    """One rocm-smi device, whatever the output format; keys already normalised."""
    series = _clean(_pick(props, "card series", "card series name", "device name"))
    model = _clean(_pick(props, "card model"))
    name = series or model
    if name and re.fullmatch(r"0x[0-9a-fA-F]+", name):
        # rocm-smi prints the bare PCI device id when its name table lacks the card.
        name = f"AMD GPU {name}"
    gfx = _clean(_pick(props, "gfx version"))
    return {
        "card": card,
        "name": name,
        "memory_bytes": to_bytes(_pick(props, "vram total memory (b)"), "b"),
        "pci_bus_id": normalize_pci(_pick(props, "pci bus")),
        "uuid": _amd_uuid(_pick(props, "unique id")),
        "gfx_target": gfx.lower() if gfx else None,
        "node_id": _to_int(_pick(props, "node id")),
        "device_id": _clean(_pick(props, "device id", "gpu id")),
    }


def _rocm_smi_cards(cards: Mapping[int, Mapping[str, Any]], driver: str | None) -> dict:
    gpus = [_rocm_smi_card_to_gpu(card, props) for card, props in sorted(cards.items())]
    return {"driver": driver, "gpus": gpus}


def parse_rocm_smi_json(text: str) -> dict:
    """``rocm-smi ... --json``: {"card0": {...}, "system": {"Driver version": ...}}.

    Key spelling changes between ROCm releases ('Card series' vs 'Card Series'), so keys are
    compared case- and space-insensitively.
    """
    data = _json_from_text(_strip_ansi(text))
    if not isinstance(data, dict):
        raise ValueError("rocm-smi JSON is not an object")
    cards: dict[int, dict] = {}
    driver = None
    for key, value in data.items():
        match = re.fullmatch(r"card(\d+)", str(key).strip(), re.IGNORECASE)
        if match and isinstance(value, dict):
            cards[int(match.group(1))] = {_norm_key(k): v for k, v in value.items()}
        elif str(key).lower() == "system" and isinstance(value, dict):
            system = {_norm_key(k): v for k, v in value.items()}
            driver = _clean(system.get("driver version"))
    return _rocm_smi_cards(cards, driver)


def parse_rocm_smi_csv(text: str) -> dict:
    """``rocm-smi ... --csv``: a 'device' column of cardN plus one column per property."""
    rows = _csv_rows(_strip_ansi(text))
    start = next((i for i, row in enumerate(rows) if row and _norm_key(row[0]) == "device"), None)
    if start is None:
        raise ValueError("no 'device' header row")
    header = [_norm_key(cell) for cell in rows[start]]
    cards: dict[int, dict] = {}
    for row in rows[start + 1 :]:
        match = re.fullmatch(r"card(\d+)", row[0].strip(), re.IGNORECASE) if row else None
        if not match:
            continue
        cards[int(match.group(1))] = dict(zip(header[1:], row[1:], strict=False))
    return _rocm_smi_cards(cards, None)


_ROCM_SMI_TEXT_RE = re.compile(r"^GPU\[(\d+)\]\s*:\s*(.*)$")


def parse_rocm_smi_text(text: str) -> dict:
    """rocm-smi's sectioned text ('GPU[0]\t\t: Card series: \t\tArcturus ...')."""
    cards: dict[int, dict] = {}
    driver = None
    for raw in _strip_ansi(text).splitlines():
        line = raw.strip()
        match = _ROCM_SMI_TEXT_RE.match(line)
        if match:
            key, sep, value = match.group(2).partition(":")
            if sep:
                cards.setdefault(int(match.group(1)), {})[_norm_key(key)] = value.strip()
        elif line.lower().startswith("driver version:"):
            driver = _clean(line.partition(":")[2])
    if not cards:
        raise ValueError("no 'GPU[n] : key: value' lines")
    return _rocm_smi_cards(cards, driver)


def _amd_smi_gpu(entry: Mapping[str, Any]) -> dict:
    def section(name: str) -> Mapping[str, Any]:
        value = entry.get(name)
        return value if isinstance(value, dict) else {}

    asic, bus, board = section("asic"), section("bus"), section("board")
    vram, driver = section("vram"), section("driver")
    name = _clean(asic.get("market_name")) or _clean(board.get("product_name"))
    gfx = _clean(asic.get("target_graphics_version"))
    return {
        "index": _to_int(entry.get("gpu")),
        "name": name,
        "memory_bytes": to_bytes(vram.get("size"), "MB"),
        "pci_bus_id": normalize_pci(bus.get("bdf")),
        "driver": _clean(driver.get("version")),
        "gfx_target": gfx.lower() if gfx else None,
        "uuid": None,
        "node_id": _to_int(_pick(entry, "node_id") or _pick(asic, "node_id")),
    }


def _lower_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {_norm_key(k).replace(" ", "_"): _lower_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lower_keys(v) for v in value]
    return value


def parse_amd_smi_static_json(text: str) -> list[dict]:
    """``amd-smi static --json``: a bare list (older amd-smi) or {"gpu_data": [...]}.

    Entries without a "gpu" key (CPU/SMU sections when amd_hsmp is loaded) are skipped.
    """
    data = _lower_keys(_json_from_text(_strip_ansi(text)))
    if isinstance(data, dict):
        if "gpu" in data:
            data = [data]
        else:
            data = data.get("gpu_data", data.get("gpus"))
    if not isinstance(data, list):
        raise ValueError("amd-smi JSON has no GPU list")
    return [_amd_smi_gpu(e) for e in data if isinstance(e, dict) and "gpu" in e]


def parse_amd_smi_static_text(text: str) -> list[dict]:
    """``amd-smi static`` without --json: 'GPU: 0' blocks of indented 'KEY: value' lines."""
    entries: list[dict] = []
    stack: list[tuple[int, dict]] = []
    current: dict | None = None
    for raw in _strip_ansi(text).splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip())
        key, sep, value = raw.strip().partition(":")
        if not sep:
            continue
        key, value = _norm_key(key).replace(" ", "_"), value.strip()
        if indent == 0:
            current = None
            stack = []
            if key == "gpu":
                current = {"gpu": value}
                entries.append(current)
                stack = [(-1, current)]
            continue
        if current is None:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else current
        if value:
            parent[key] = value
        else:
            child: dict = {}
            parent[key] = child
            stack.append((indent, child))
    if not entries:
        raise ValueError("no 'GPU: n' blocks")
    return [_amd_smi_gpu(e) for e in entries]


def parse_amd_smi_version(text: str) -> dict:
    """``amd-smi version``: 'AMDSMI Tool: ... | ROCm version: 6.4.1 | amdgpu version: ...'."""
    fields = {}
    for part in _strip_ansi(text).replace("\n", "|").split("|"):
        key, sep, value = part.partition(":")
        if sep and key.strip():
            fields[_norm_key(key)] = value.strip()
    if not fields:
        raise ValueError("no 'key: value' fields")
    return fields


_ROCMINFO_AGENT_RE = re.compile(r"^\s*Agent\s+(\d+)\s*$")
_ROCMINFO_SUB_RE = re.compile(r"^\s*(Pool|ISA)\s+(\d+)\s*$")
_ROCMINFO_KV_RE = re.compile(r"^(\s*)([^:]+?)\s*:(.*)$")


def parse_rocminfo(text: str) -> dict:
    """``rocminfo``: HSA agents (CPU, GPU, and others such as the 'DSP' NPU agent).

    Each agent's own attributes are the lines at the indentation of its 'Name:' line;
    deeper lines belong to Pool/ISA sub-blocks or to nested lists (Cache Info), so values
    are read by structure, not by line numbers.
    """
    clean = _strip_ansi(text)
    lines = clean.splitlines()
    runtime = None
    agents: list[dict] = []
    current: dict | None = None
    agent_indent: int | None = None
    sub: dict | None = None
    for raw in lines:
        if _ROCMINFO_AGENT_RE.match(raw):
            current = {"agent": int(_ROCMINFO_AGENT_RE.match(raw).group(1)), "pools": [], "isa": []}
            agents.append(current)
            agent_indent, sub = None, None
            continue
        if raw.strip().startswith("*** Done"):
            current = None
            continue
        if current is None:
            match = _ROCMINFO_KV_RE.match(raw)
            if match and _norm_key(match.group(2)) == "runtime version":
                runtime = _clean(match.group(3))
            continue
        sub_match = _ROCMINFO_SUB_RE.match(raw)
        if sub_match:
            sub = {}
            current["pools" if sub_match.group(1) == "Pool" else "isa"].append(sub)
            continue
        match = _ROCMINFO_KV_RE.match(raw)
        if not match:
            continue
        indent = len(match.group(1).expandtabs())
        key, value = _norm_key(match.group(2)), match.group(3).strip()
        if agent_indent is None:
            agent_indent = indent
        if indent <= agent_indent:
            sub = None
            current.setdefault(key, value)
        elif sub is not None:
            sub.setdefault(key, value)
    if not agents:
        raise ValueError(summarize_error(clean) if clean.strip() else "no HSA agents listed")
    parsed = []
    for agent in agents:
        parsed.append(
            {
                "agent": agent["agent"],
                "name": _clean(agent.get("name")),
                "marketing_name": _clean(agent.get("marketing name")),
                "vendor_name": _clean(agent.get("vendor name")),
                "device_type": (_clean(agent.get("device type")) or "").upper() or None,
                "uuid": _amd_uuid(agent.get("uuid")),
                "node_id": _to_int(agent.get("node")),
                "chip_id": _to_int((agent.get("chip id") or "").split("(")[0]),
                "bdfid": _to_int(agent.get("bdfid")),
                "compute_units": _to_int(agent.get("compute unit")),
                "memory_properties": _clean(agent.get("memory properties")),
                "pools": [
                    {"segment": p.get("segment", ""), "bytes": _rocminfo_size(p.get("size"))}
                    for p in agent["pools"]
                ],
                "isa": [_clean(i.get("name")) for i in agent["isa"] if _clean(i.get("name"))],
            }
        )
    return {"runtime_version": runtime, "agents": parsed}


def _rocminfo_size(value: str | None) -> int | None:
    # '201310208(0xbffc000) KB': the hex in parentheses repeats the decimal.
    if not value:
        return None
    match = re.match(r"^\s*(\d+)(?:\([^)]*\))?\s*([A-Za-z]*)", value)
    return to_bytes(f"{match.group(1)} {match.group(2) or 'B'}") if match else None


def rocminfo_gpus(parsed: Mapping[str, Any]) -> list[dict]:
    """GPU agents only (NPU/DSP/AIE and CPU agents are not GPUs), in ROCr order."""
    gpus = []
    for agent in parsed.get("agents", []):
        if agent.get("device_type") != "GPU":
            continue
        vram = None
        for pool in agent.get("pools", []):
            segment = pool.get("segment", "").upper()
            if segment.startswith("GLOBAL") and "COARSE" in segment:
                vram = pool.get("bytes")
                break
        bdfid = agent.get("bdfid")
        bdf = None
        if bdfid:
            bdf = f"{(bdfid >> 8) & 0xFF:02x}:{(bdfid >> 3) & 0x1F:02x}.{bdfid & 0x7}"
        gfx = agent.get("name") if re.fullmatch(r"gfx[0-9a-f]+", agent.get("name") or "") else None
        if gfx is None:
            for isa in agent.get("isa", []):
                match = re.search(r"--(gfx[0-9a-f]+)", isa)
                if match:
                    gfx = match.group(1)
                    break
        marketing = agent.get("marketing_name")
        gpus.append(
            {
                "name": marketing if marketing and marketing != gfx else None,
                "memory_bytes": vram,
                "gfx_target": gfx,
                # rocminfo has no PCI domain; the domain-less form is only used for matching.
                "bdf": bdf,
                "uuid": agent.get("uuid"),
                "node_id": agent.get("node_id"),
                "integrated": (agent.get("memory_properties") or "").upper() == "APU",
            }
        )
    return gpus


# --------------------------------------------------------------------------- other parsers


def _clinfo_vendor(vendor: str | None, name: str | None = None) -> str:
    text = f"{vendor or ''} {name or ''}".lower()
    if "nvidia" in text:
        return "nvidia"
    if "advanced micro devices" in text or re.search(r"\bamd\b", text) or "radeon" in text:
        return "amd"
    return "other"


def _clinfo_device(**values: Any) -> dict:
    device = dict.fromkeys(
        ("name", "vendor", "type", "memory_bytes", "driver", "platform", "board", "pci_bus_id")
    )
    device.update(values)
    return device


def _clinfo_json_devices(data: Any) -> list[dict]:
    found: list[dict] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "CL_DEVICE_NAME" in node:
                found.append(node)
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(data)
    devices = []
    for node in found:
        dtype = node.get("CL_DEVICE_TYPE")
        if isinstance(dtype, dict):
            dtype = dtype.get("type", dtype.get("raw"))
        if isinstance(dtype, list):
            dtype = " ".join(str(t) for t in dtype)
        if isinstance(dtype, int):
            dtype = "GPU" if dtype & 4 else "CPU" if dtype & 2 else "Accelerator"
        memory = node.get("CL_DEVICE_GLOBAL_MEM_SIZE")
        devices.append(
            _clinfo_device(
                name=_clean(node.get("CL_DEVICE_NAME")),
                vendor=_clean(node.get("CL_DEVICE_VENDOR")),
                type=(_clean(dtype) or "").upper().replace("CL_DEVICE_TYPE_", "") or None,
                memory_bytes=to_bytes(memory) if not isinstance(memory, dict) else None,
                driver=_clean(node.get("CL_DRIVER_VERSION")),
                board=_clean(node.get("CL_DEVICE_BOARD_NAME_AMD")),
            )
        )
    return devices


def parse_clinfo(text: str) -> list[dict]:
    """OpenCL devices from ``clinfo --json``, plain ``clinfo`` or ``clinfo -l``.

    Plain clinfo prints 'Key<spaces>Value' lines; a device's properties start at its
    'Device Name' line and the 'NULL platform behavior' section (which repeats names) ends
    the device list. ``-l`` only names devices, so their type stays None.
    """
    clean = _strip_ansi(text)
    if clean.lstrip()[:1] in ("{", "["):
        return _clinfo_json_devices(_json_from_text(clean))
    if re.search(r"^Platform #\d+:", clean, re.MULTILINE):
        devices = []
        platform_name = None
        for line in clean.splitlines():
            plat = re.match(r"^Platform #\d+:\s*(.*)$", line)
            if plat:
                platform_name = plat.group(1).strip()
                continue
            dev = re.match(r"^\s*[`|+\\-]*\s*Device #\d+:\s*(.*)$", line)
            if dev:
                devices.append(_clinfo_device(name=dev.group(1).strip(), platform=platform_name))
        return devices
    if not re.search(r"^Number of platforms", clean, re.MULTILINE):
        raise ValueError("not clinfo output")
    devices = []
    current: dict | None = None
    platform_name = None
    for line in clean.splitlines():
        stripped = line.strip()
        if stripped.startswith("NULL platform behavior") or stripped.startswith(
            "ICD loader properties"
        ):
            break
        key, value = _split_columns(stripped)
        if value is None:
            continue
        if key == "Platform Name":
            platform_name = value
            current = None
        elif key == "Device Name":
            current = _clinfo_device(name=value, platform=platform_name)
            devices.append(current)
        elif current is not None:
            if key == "Device Vendor":
                current["vendor"] = value
            elif key == "Device Type":
                current["type"] = value.upper()
            elif key == "Global memory size":
                current["memory_bytes"] = to_bytes(value.split("(")[0])
            elif key == "Driver Version":
                current["driver"] = value
            elif key.startswith("Device Board Name"):
                # AMD's 'Device Name' is the gfx target; the board name is the product.
                current["board"] = value
            elif key.startswith("Device Topology") or key.startswith("Device PCI bus info"):
                pci = re.search(r"([0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]", value)
                current["pci_bus_id"] = normalize_pci(pci.group(0)) if pci else None
    return devices


def _split_columns(line: str) -> tuple[str, str | None]:
    # Key and value are separated by a run of two or more spaces (or a tab); keys themselves
    # only ever contain single spaces ('Device Topology (NV)').
    match = re.match(r"^(.*?\S)(?:\s{2,}|\t+)(\S.*?)\s*$", line)
    if not match:
        return line, None
    return match.group(1), match.group(2)


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


# --------------------------------------------------------------------------- runner


@dataclass
class ToolResult:
    argv: list[str]
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    missing: bool = False
    timed_out: bool = False
    error: str | None = None
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.timed_out and not self.error and self.returncode == 0

    @property
    def output(self) -> str:
        return "\n".join(part for part in (self.stdout, self.stderr) if part)


def _search_path(env: Mapping[str, str] | None) -> str:
    env = os.environ if env is None else env
    dirs = [d for d in (env.get("PATH") or os.defpath).split(os.pathsep) if d]
    rocm = env.get("ROCM_PATH")
    extra = ([os.path.join(rocm, "bin")] if rocm else []) + list(EXTRA_TOOL_DIRS)
    return os.pathsep.join(dirs + [d for d in extra if d not in dirs])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        try:
            proc.kill()
        except OSError:
            pass


def run_tool(
    argv: list[str], timeout: float = DEFAULT_TIMEOUT, env: Mapping[str, str] | None = None
) -> ToolResult:
    """Run one command; never raises, never waits longer than about timeout + 2 s.

    The child gets its own session so that a timeout kills everything it started: SMI
    tools are often wrappers whose grandchildren would otherwise keep the pipes open.
    """
    argv = [str(a) for a in argv]
    start = time.monotonic()
    executable = argv[0]
    if os.sep not in executable:
        found = shutil.which(executable, path=_search_path(env))
        if found is None:
            return ToolResult(argv, missing=True)
        executable = found
    try:
        proc = subprocess.Popen(
            [executable, *argv[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except FileNotFoundError:
        return ToolResult(argv, missing=True)
    except OSError as exc:
        return ToolResult(argv, error=f"cannot run: {exc.strerror or exc}")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            # Something outside the process group still holds the pipes; stop reading.
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            out, err = b"", b""
        return ToolResult(
            argv,
            returncode=proc.returncode,
            stdout=(out or b"").decode("utf-8", "replace"),
            stderr=(err or b"").decode("utf-8", "replace"),
            timed_out=True,
            error=f"timed out after {timeout:g} s",
            duration=time.monotonic() - start,
        )
    return ToolResult(
        argv,
        returncode=proc.returncode,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        duration=time.monotonic() - start,
    )


Runner = Callable[..., ToolResult]


# --------------------------------------------------------------------------- collection


@dataclass
class _Ctx:
    runner: Runner
    timeout: float
    env: Mapping[str, str]
    errors: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # A tool that hung once will hang again; asking it twice only doubles the wait.
    hung: set[str] = field(default_factory=set)

    def error(self, tool: str, message: str) -> None:
        entry = {"tool": tool, "error": _one_line(message)}
        if entry not in self.errors:
            self.errors.append(entry)

    def run(self, argv: list[str], env: Mapping[str, str] | None = None) -> ToolResult | None:
        """Run a tool; None (and an error entry unless it is simply missing) on failure."""
        if argv[0] in self.hung:
            return None
        try:
            result = self.runner(argv, self.timeout, env=dict(env if env is not None else self.env))
        except Exception as exc:  # an injected runner must not take the report down
            self.error(argv[0], f"runner raised {type(exc).__name__}: {exc}")
            return None
        if result.missing:
            return None
        if result.timed_out or result.error:
            if result.timed_out:
                self.hung.add(argv[0])
            self.error(argv[0], result.error or "failed")
            return None
        return result

    def fail(self, result: ToolResult) -> None:
        self.error(result.argv[0], summarize_error(result.output, result.returncode))

    def parse(self, tool: str, parser: Callable[..., Any], *args: Any) -> Any:
        try:
            return parser(*args)
        except Exception as exc:
            self.error(tool, f"unparseable output: {exc}")
            return None


def _timeout_from_env(env: Mapping[str, str], name: str, default: float, ctx_errors: list) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
        if not math.isfinite(value) or value <= 0:
            raise ValueError
        return value
    except ValueError:
        ctx_errors.append({"tool": name, "error": f"ignored invalid value {raw!r}"})
        return default


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


def _match(primary: list[dict], secondary: list[dict], keys: Iterable[str]) -> dict[int, dict]:
    """Pair entries of two tools' GPU lists by the first key unique on both sides."""
    for key in keys:
        left = [p.get(key) for p in primary]
        right = [s.get(key) for s in secondary]
        if None in left or len(set(left)) != len(left):
            continue
        right_known = [r for r in right if r is not None]
        if len(set(right_known)) != len(right_known):
            continue
        by_key = {s.get(key): s for s in secondary if s.get(key) is not None}
        pairs = {i: by_key[k] for i, k in enumerate(left) if k in by_key}
        if pairs:
            return pairs
    if len(primary) == len(secondary):
        return dict(enumerate(secondary))
    return {}


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


def _rocm_version(ctx: _Ctx, read_text: Callable[[str], str | None]) -> str | None:
    roots = [ctx.env.get("ROCM_PATH"), "/opt/rocm"]
    for root in (r for r in roots if r):
        text = read_text(os.path.join(root, ".info", "version"))
        if text and text.strip():
            return text.strip().split("-")[0]
    result = ctx.run(["amd-smi", "version"])
    if result is not None and result.returncode == 0:
        fields = ctx.parse("amd-smi", parse_amd_smi_version, result.stdout) or {}
        return _clean(fields.get("rocm version"))
    return None


def _collect_amd(ctx: _Ctx, read_text: Callable[[str], str | None]) -> list[dict]:
    sources: dict[str, list[dict]] = {}
    driver = None

    # rocminfo shows what the ROCr runtime (and so HIP) enumerates, in HIP's order. Our own
    # ROCR_VISIBLE_DEVICES would hide GPUs from it, so it runs without; filtering is ours.
    rocminfo_env = {k: v for k, v in ctx.env.items() if k != "ROCR_VISIBLE_DEVICES"}
    result = ctx.run(["rocminfo"], env=rocminfo_env)
    if result is not None:
        try:
            sources["rocminfo"] = rocminfo_gpus(parse_rocminfo(result.stdout))
        except ValueError:
            # Without agents the output is only the failure ('Unable to open /dev/kfd ...').
            ctx.fail(result)

    result = ctx.run(["amd-smi", "static", "--json"])
    if result is not None:
        gpus = None
        try:
            gpus = parse_amd_smi_static_json(result.stdout)
        except ValueError:
            try:
                gpus = parse_amd_smi_static_text(result.stdout)
            except ValueError:
                gpus = None
        if gpus:
            sources["amd-smi"] = gpus
            driver = next((g["driver"] for g in gpus if g.get("driver")), None)
        else:
            ctx.fail(result)

    result = ctx.run(
        ["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--showbus", "--showuniqueid"]
        + ["--json"]
    )
    if result is not None:
        parsed = None
        try:
            parsed = parse_rocm_smi_json(result.stdout)
        except ValueError:
            # Releases without --json (or that print usage instead) still speak text.
            text_result = ctx.run(result.argv[:-1])
            if text_result is not None:
                try:
                    parsed = parse_rocm_smi_text(text_result.stdout)
                except ValueError:
                    parsed = None
        if parsed and parsed["gpus"]:
            sources["rocm-smi"] = parsed["gpus"]
            driver = driver or parsed["driver"]
        else:
            ctx.fail(result)

    if not any(sources.values()):
        return []
    order = [name for name in ("rocminfo", "amd-smi", "rocm-smi") if sources.get(name)]
    primary_name = order[0]
    primary = [dict(g) for g in sources[primary_name]]
    for gpu in primary:
        gpu.setdefault("bdf", _bdf(gpu.get("pci_bus_id")))
    matched: dict[str, dict[int, dict]] = {primary_name: dict(enumerate(primary))}
    for name in order[1:]:
        others = [dict(g, bdf=_bdf(g.get("pci_bus_id"))) for g in sources[name]]
        pairs = _match(primary, others, ("uuid", "node_id", "bdf"))
        if not pairs:
            ctx.notes.append(
                f"{name} lists {len(others)} GPU(s) and {primary_name} {len(primary)}; "
                f"{name}'s details were not merged"
            )
        matched[name] = pairs

    def best(i: int, key: str, prefer: tuple[str, ...]) -> Any:
        for name in prefer:
            value = matched.get(name, {}).get(i, {}).get(key)
            if value is not None:
                return value
        return None

    runtime = _rocm_version(ctx, read_text)
    override = gfx_from_override(ctx.env.get("HSA_OVERRIDE_GFX_VERSION"))
    # rocminfo's BDFID has no PCI domain. Assuming domain 0 is right on ordinary machines,
    # but MI300A-class systems put every APU at 01:00.0 on its own domain.
    bdfs = [g.get("bdf") for g in primary] if primary_name == "rocminfo" else []
    bdf_unique = len(set(bdfs)) == len(bdfs)
    integrated = [i for i, g in enumerate(primary) if g.get("integrated")]
    if integrated and len(integrated) < len(primary):
        # HIP enumerates an APU's iGPU beside the discrete cards, so it would get a rank.
        ctx.notes.append(
            f"AMD GPU(s) {', '.join(map(str, integrated))} are integrated (APU) and HIP counts "
            "them; hide them with HIP_VISIBLE_DEVICES if only discrete GPUs should train"
        )
    gpus = []
    for i, _ in enumerate(primary):
        hw_gfx = best(i, "gfx_target", ("rocm-smi", "amd-smi"))
        runtime_gfx = best(i, "gfx_target", ("rocminfo",))
        gfx = runtime_gfx or override or hw_gfx
        if override and hw_gfx and hw_gfx != gfx:
            ctx.notes.append(
                f"HSA_OVERRIDE_GFX_VERSION makes ROCm treat AMD GPU {i} ({hw_gfx}) as {gfx}"
            )
        pci = best(i, "pci_bus_id", ("amd-smi", "rocm-smi"))
        if pci is None and bdf_unique and best(i, "bdf", ("rocminfo",)):
            pci = "0000:" + best(i, "bdf", ("rocminfo",))
        gpus.append(
            {
                "index": i,
                "vendor": "amd",
                "name": best(i, "name", ("rocminfo", "amd-smi", "rocm-smi")),
                "memory_bytes": best(i, "memory_bytes", ("rocm-smi", "amd-smi", "rocminfo")),
                "driver": best(i, "driver", ("amd-smi",)) or driver,
                "runtime": runtime,
                "compute_capability": None,
                "gfx_target": gfx,
                "pci_bus_id": pci,
                "uuid": best(i, "uuid", ("rocminfo", "rocm-smi", "amd-smi")),
                "mig": False,
                "mig_devices": [],
                "source": primary_name,
            }
        )
    return gpus


def _collect_clinfo(ctx: _Ctx) -> list[dict]:
    devices = None
    result = ctx.run(["clinfo", "--json"])
    if result is not None and result.returncode == 0:
        try:
            devices = parse_clinfo(result.stdout)
        except ValueError:
            devices = None
    if devices is None:
        # clinfo before 3.0.23 has no --json; its human output is stable enough to read.
        result = ctx.run(["clinfo"])
        if result is None:
            return []
        if result.returncode != 0:
            ctx.fail(result)
            return []
        devices = ctx.parse("clinfo", parse_clinfo, result.stdout) or []
    gpus = []
    for device in devices:
        if device.get("type") is None or "GPU" not in device["type"]:
            continue
        vendor = _clinfo_vendor(device.get("vendor") or device.get("platform"), device.get("name"))
        name = device.get("name") or ""
        gfx = name if vendor == "amd" and re.fullmatch(r"gfx[0-9a-f]+", name) else None
        gpus.append(
            {
                "index": len(gpus),
                "vendor": vendor,
                "name": device.get("board") or name or None,
                "memory_bytes": device.get("memory_bytes"),
                "driver": device.get("driver"),
                "runtime": None,
                "compute_capability": None,
                "gfx_target": gfx,
                "pci_bus_id": device.get("pci_bus_id"),
                "uuid": None,
                "mig": False,
                "mig_devices": [],
                "source": "clinfo",
            }
        )
    return gpus


# ---- visible devices


def _parse_visible(value: str | None) -> list[str] | None:
    if value is None:
        return None
    value = value.strip()
    return [] if not value else [token.strip() for token in value.split(",")]


def _select(
    gpus: list[dict], tokens: list[str], var: str, ctx: _Ctx, allow_mig: bool = False
) -> list[dict]:
    """Apply one *_VISIBLE_DEVICES list the way CUDA/ROCr do: in the listed order, and an
    entry that names no GPU hides it and everything after it."""
    chosen: list[dict] = []
    for token in tokens:
        match = None
        if re.fullmatch(r"-?\d+", token):
            position = int(token)
            match = gpus[position] if 0 <= position < len(gpus) else None
        elif allow_mig and token.upper().startswith("MIG-"):
            match = _find_mig(gpus, token)
        else:
            lowered = token.lower()
            candidates = [
                g for g in gpus if g.get("uuid") and g["uuid"].lower().startswith(lowered)
            ]
            match = candidates[0] if len(candidates) == 1 else None
        if match is None:
            ctx.notes.append(
                f"{var}: entry {token!r} matches no GPU; it and later entries are ignored"
            )
            break
        if any(c is match for c in chosen):
            continue
        chosen.append(match)
    return chosen


def _find_mig(gpus: list[dict], token: str) -> dict | None:
    lowered = token.lower()
    # R450 named MIG devices MIG-<GPU uuid>/<GPU instance>/<compute instance>.
    legacy = re.fullmatch(r"mig-(gpu-[0-9a-f-]+)/(\d+)/(\d+)", lowered)
    hits = []
    for gpu in gpus:
        for mig in gpu.get("mig_devices") or []:
            uuid = (mig.get("uuid") or "").lower()
            hit = bool(uuid) and uuid.startswith(lowered)
            if not hit and legacy and (gpu.get("uuid") or "").lower() == legacy.group(1):
                hit = mig.get("gpu_instance_id") == int(legacy.group(2)) and mig.get(
                    "compute_instance_id"
                ) == int(legacy.group(3))
            if hit:
                hits.append((gpu, mig))
    if len(hits) != 1:
        return None  # like a GPU UUID prefix, a MIG prefix must name exactly one device
    gpu, mig = hits[0]
    entry = dict(gpu)
    profile = mig.get("profile")
    entry.update(
        name=f"{gpu.get('name')} MIG {profile}" if profile else gpu.get("name"),
        uuid=mig.get("uuid") or token,
        memory_bytes=mig.get("memory_bytes"),
        mig=True,
        mig_devices=[dict(mig)],
    )
    return entry


def _apply_visibility(gpus: list[dict], vendor: str, ctx: _Ctx) -> list[dict]:
    env = ctx.env
    for gpu in gpus:
        gpu["physical_index"] = gpu["index"]
    visible = list(gpus)
    if vendor == "nvidia":
        tokens = _parse_visible(env.get("CUDA_VISIBLE_DEVICES"))
        if tokens is not None:
            visible = _select(visible, tokens, "CUDA_VISIBLE_DEVICES", ctx, allow_mig=True)
    elif vendor == "amd":
        rocr = _parse_visible(env.get("ROCR_VISIBLE_DEVICES"))
        if rocr is not None:
            visible = _select(visible, rocr, "ROCR_VISIBLE_DEVICES", ctx)
        # HIP reads CUDA_VISIBLE_DEVICES too when HIP_VISIBLE_DEVICES is unset, and indexes
        # into what ROCR_VISIBLE_DEVICES left.
        var = "HIP_VISIBLE_DEVICES" if "HIP_VISIBLE_DEVICES" in env else "CUDA_VISIBLE_DEVICES"
        hip = _parse_visible(env.get(var))
        if hip is not None:
            visible = _select(visible, hip, var, ctx)
    result = []
    for new_index, gpu in enumerate(visible):
        entry = dict(gpu)
        entry["index"] = new_index
        result.append(entry)
    return result


# ---- torch

_TORCH_PROBE = r"""
import json, sys
out = {"torch": None, "cuda": None, "hip": None, "devices": [], "error": None}
try:
    import torch
except BaseException as exc:
    out["error"] = "import torch failed: %s: %s" % (type(exc).__name__, exc)
    print(json.dumps(out)); sys.exit(0)
out["torch"] = str(torch.__version__)
out["cuda"] = getattr(torch.version, "cuda", None)
out["hip"] = getattr(torch.version, "hip", None)
try:
    # The GPU architectures the wheel carries kernels for; known without a device.
    out["arch_list"] = (torch._C._cuda_getArchFlags() or "").split()
except BaseException:
    out["arch_list"] = []
try:
    out["xpu"] = bool(hasattr(torch, "xpu") and torch.xpu.is_available())
except BaseException:
    out["xpu"] = False
try:
    count = torch.cuda.device_count() if (out["cuda"] or out["hip"]) else 0
    for i in range(count):
        p = torch.cuda.get_device_properties(i)
        dev = {"name": p.name, "total_memory": int(p.total_memory),
               "major": int(p.major), "minor": int(p.minor),
               "gcn_arch": getattr(p, "gcnArchName", None) or None,
               "uuid": str(getattr(p, "uuid", "") or "") or None}
        if hasattr(p, "pci_bus_id"):
            dev["pci"] = "%04x:%02x:%02x.0" % (getattr(p, "pci_domain_id", 0),
                                               p.pci_bus_id, getattr(p, "pci_device_id", 0))
        out["devices"].append(dev)
except BaseException as exc:
    out["error"] = "torch.cuda failed: %s: %s" % (type(exc).__name__, exc)
print(json.dumps(out))
"""


def _probe_torch(ctx: _Ctx, timeout: float) -> dict | None:
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        result = ctx.runner([sys.executable, "-c", _TORCH_PROBE], timeout, env=dict(ctx.env))
    except Exception as exc:
        ctx.error("torch", f"probe raised {type(exc).__name__}: {exc}")
        return None
    if result.missing:
        return None
    if result.timed_out or result.error:
        ctx.error("torch", result.error or "probe failed")
        return None
    try:
        info = _json_from_text(result.stdout)
    except ValueError:
        ctx.error("torch", summarize_error(result.output, result.returncode))
        return None
    return info if isinstance(info, dict) else None


def _torch_gpus(info: Mapping[str, Any], env: Mapping[str, str]) -> list[dict]:
    vendor = "amd" if info.get("hip") else "nvidia"
    if vendor == "amd":
        hip_var = "HIP_VISIBLE_DEVICES" if "HIP_VISIBLE_DEVICES" in env else "CUDA_VISIBLE_DEVICES"
        layers = ["ROCR_VISIBLE_DEVICES", hip_var]
    else:
        layers = ["CUDA_VISIBLE_DEVICES"]
    # Torch numbers devices after the runtime filtered them; the physical index is only
    # knowable when every variable in play is unset or a plain index list.
    physical: list[int | None] | None = None
    for var in layers:
        tokens = _parse_visible(env.get(var))
        if tokens is None:
            continue
        if not all(re.fullmatch(r"\d+", t) for t in tokens):
            physical = []
            break
        picked = [int(t) for t in tokens]
        if physical is not None:
            picked = [physical[p] if p < len(physical) else None for p in picked]
        physical = picked
    gpus = []
    for i, dev in enumerate(info.get("devices") or []):
        uuid = dev.get("uuid")
        if uuid and vendor == "nvidia" and not uuid.upper().startswith(("GPU-", "MIG-")):
            uuid = "GPU-" + uuid
        gcn = dev.get("gcn_arch")
        gpus.append(
            {
                "index": i,
                "physical_index": i
                if physical is None
                else (physical[i] if i < len(physical) else None),
                "vendor": vendor,
                "name": dev.get("name"),
                "memory_bytes": dev.get("total_memory"),
                "driver": None,
                "runtime": info.get("hip") or info.get("cuda"),
                "compute_capability": f"{dev.get('major')}.{dev.get('minor')}"
                if vendor == "nvidia" and dev.get("major") is not None
                else None,
                "gfx_target": gcn.split(":")[0] if gcn else None,
                "pci_bus_id": dev.get("pci"),
                "uuid": uuid,
                "mig": "MIG" in (dev.get("name") or "").split(),
                "mig_devices": [],
                "source": "torch",
            }
        )
    return gpus


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    except Exception:
        return None


def _dist_requires(name: str) -> list[str]:
    try:
        return list(importlib.metadata.requires(name) or [])
    except Exception:
        return []


def _accelerator(
    torch_info: Mapping[str, Any] | None,
    torch_version: str | None,
    torch_requires: list[str] | None = None,
) -> str:
    if torch_info and torch_info.get("torch"):
        if torch_info.get("hip"):
            return "rocm"
        if torch_info.get("cuda"):
            return "cuda"
        return "other" if torch_info.get("xpu") else "cpu"
    if not torch_version:
        return "cpu"
    # No probe answer (it timed out or crashed): read the wheel's own metadata instead.
    # The local version names the flavour on download.pytorch.org wheels ('+cu121',
    # '+rocm6.0', '+cpu'); PyPI's default Linux wheel has none but depends on nvidia-* libs.
    if "+rocm" in torch_version:
        return "rocm"
    if "+cu" in torch_version:
        return "cuda"
    if "+cpu" in torch_version:
        return "cpu"
    requires = " ".join(torch_requires or []).lower()
    if "rocm" in requires:
        return "rocm"
    if "nvidia-" in requires:
        return "cuda"
    return "other"


# ---- host


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


def _pick_vendor(gpus: list[dict], accelerator: str) -> str:
    counts: dict[str, int] = {}
    for gpu in gpus:
        counts[gpu["vendor"]] = counts.get(gpu["vendor"], 0) + 1
    if not counts:
        return "none"
    if len(counts) == 1:
        return next(iter(counts))
    preferred = {"cuda": "nvidia", "rocm": "amd"}.get(accelerator)
    if preferred in counts:
        return preferred
    rank = {"nvidia": 0, "amd": 1, "other": 2}
    return sorted(counts, key=lambda v: (-counts[v], rank.get(v, 9)))[0]


def _cross_check(
    ctx: _Ctx, gpus: list[dict], torch_info: Mapping[str, Any], accelerator: str
) -> None:
    if torch_info.get("error"):
        ctx.error("torch", torch_info["error"])
    vendor = {"cuda": "nvidia", "rocm": "amd"}.get(accelerator)
    if vendor is None:
        return
    mine = [g for g in gpus if g["vendor"] == vendor and g["source"] != "torch"]
    others = sorted({g["vendor"] for g in gpus} - {vendor})
    if not mine and others:
        ctx.error(
            "torch",
            f"torch is a {accelerator} build but this machine's GPUs are {', '.join(others)}",
        )
    # With MIG, CUDA enumerates MIG instances rather than GPUs, so counts cannot be compared.
    if any(g["source"] == "torch" or g.get("mig") for g in gpus):
        return
    theirs = torch_info.get("devices") or []
    if len(theirs) != len(mine):
        ctx.error(
            "torch",
            f"torch sees {len(theirs)} {accelerator} device(s), "
            f"the vendor tools {len(mine)} visible",
        )
        return
    for gpu, dev in zip(mine, theirs, strict=True):
        name, other = (gpu.get("name") or "").lower(), (dev.get("name") or "").lower()
        if name and other and name not in other and other not in name:
            ctx.notes.append(
                f"torch device {gpu['index']} is {dev.get('name')!r}, "
                f"the tools list {gpu.get('name')!r}: device order differs (CUDA_DEVICE_ORDER?)"
            )
            break


_UNSET: Any = object()


def collect(
    env: Mapping[str, str] = os.environ,
    runner: Runner = run_tool,
    *,
    torch_info: Any = _UNSET,
    read_text: Callable[[str], str | None] = _read_text,
    timeout: float | None = None,
) -> dict:
    """Build the report. ``runner`` and ``torch_info`` are injectable for tests: pass
    ``torch_info=None`` to skip the torch probe, or a dict shaped like the probe's output."""
    env = dict(env)
    early_errors: list[dict] = []
    if timeout is None:
        timeout = _timeout_from_env(env, TIMEOUT_ENV, DEFAULT_TIMEOUT, early_errors)
    torch_timeout = _timeout_from_env(
        env, TORCH_TIMEOUT_ENV, max(DEFAULT_TORCH_TIMEOUT, timeout), early_errors
    )
    ctx = _Ctx(runner=runner, timeout=timeout, env=env, errors=early_errors)

    hostname = socket.gethostname()
    ips = _guarded(ctx, "ip", lambda: _host_ips(ctx, hostname), [])
    memory = parse_meminfo(read_text("/proc/meminfo") or "")
    if memory is None:
        ctx.error("meminfo", "MemTotal not found in /proc/meminfo")
    limits = _guarded(
        ctx,
        "cgroup",
        lambda: cgroup_limits(read_text),
        {"memory_limit_bytes": None, "cpu_quota": None},
    )

    versions = {
        "python": platform.python_version(),
        "torch": _dist_version("torch"),
        "deepspeed": _dist_version("deepspeed"),
        "transformers": _dist_version("transformers"),
    }
    if torch_info is _UNSET:
        torch_info = _guarded(ctx, "torch", lambda: _probe_torch(ctx, torch_timeout), None)
    if torch_info and torch_info.get("torch") and not versions["torch"]:
        versions["torch"] = torch_info["torch"]
    # The toolkit the image's torch was built with: the orchestrator checks each node's
    # driver and GPU architecture against it.
    versions["cuda"] = (torch_info or {}).get("cuda")
    versions["hip"] = (torch_info or {}).get("hip")
    arch_list = [str(a) for a in (torch_info or {}).get("arch_list") or []]
    accelerator = _accelerator(torch_info, versions["torch"], _dist_requires("torch"))

    nvidia = _guarded(ctx, "nvidia-smi", lambda: _collect_nvidia(ctx), [])
    amd = _guarded(ctx, "rocm", lambda: _collect_amd(ctx, read_text), [])
    gpus: list[dict] = []
    if nvidia:
        gpus += _apply_visibility(nvidia, "nvidia", ctx)
    if amd:
        gpus += _apply_visibility(amd, "amd", ctx)
    if not nvidia and not amd and torch_info and torch_info.get("devices"):
        gpus = _torch_gpus(torch_info, env)
    if not nvidia and not amd and not gpus:
        # OpenCL applies the vendors' own visibility variables, so its list is taken as is.
        gpus = _guarded(ctx, "clinfo", lambda: _collect_clinfo(ctx), [])
        for gpu in gpus:
            gpu["physical_index"] = gpu["index"]

    if torch_info:
        _guarded(ctx, "torch", lambda: _cross_check(ctx, gpus, torch_info, accelerator), None)

    vendor = _pick_vendor(gpus, accelerator)
    if len({g["vendor"] for g in gpus}) > 1:
        ctx.notes.append(
            "GPUs from several vendors: "
            + ", ".join(
                f"{v} x{sum(g['vendor'] == v for g in gpus)}"
                for v in sorted({g["vendor"] for g in gpus})
            )
        )
    nvidia_names = {g.get("name") for g in nvidia}
    if len(nvidia_names) > 1 and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        ctx.notes.append(
            "GPU models differ and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA enumerates the "
            "fastest GPU first, so its indices may not follow nvidia-smi's"
        )

    return {
        "schema": SCHEMA_VERSION,
        "hostname": hostname,
        "ips": ips,
        "cpu_count": _guarded(
            ctx, "cpu", lambda: _cpu_count(limits["cpu_quota"]), os.cpu_count() or 1
        ),
        "memory_bytes": memory or 0,
        "memory_limit_bytes": limits["memory_limit_bytes"],
        "cpu_quota": limits["cpu_quota"],
        "accelerator": accelerator,
        "gpu_vendor": vendor,
        "gpus": [_report_gpu(gpu) for gpu in gpus],
        "visible_devices": {k: env[k] for k in VISIBLE_ENV_VARS if k in env},
        "versions": versions,
        "torch_arch_list": arch_list,
        "errors": ctx.errors,
        "notes": list(dict.fromkeys(ctx.notes)),
    }


def _report_gpu(gpu: Mapping[str, Any]) -> dict:
    entry = {key: gpu.get(key) for key in GPU_KEYS}
    entry["mig"] = bool(entry["mig"])
    entry["mig_devices"] = list(entry["mig_devices"] or [])
    if not entry["name"]:
        # Consumers may print or compare names; a placeholder beats null.
        vendor = {"nvidia": "NVIDIA", "amd": "AMD"}.get(entry["vendor"], "")
        entry["name"] = " ".join(p for p in (vendor, entry["gfx_target"], "GPU") if p)
    return entry


def _guarded(ctx: _Ctx, tool: str, fn: Callable[[], Any], default: Any) -> Any:
    try:
        return fn()
    except Exception as exc:  # a bug in one section must not cost the whole report
        ctx.error(tool, f"detect failed: {type(exc).__name__}: {exc}")
        return default


def minimal_report(error: str) -> dict:
    """The report when collect itself failed: still valid, still schema 1."""
    return {
        "schema": SCHEMA_VERSION,
        "hostname": socket.gethostname(),
        "ips": [],
        "cpu_count": os.cpu_count() or 1,
        "memory_bytes": 0,
        "memory_limit_bytes": None,
        "cpu_quota": None,
        "accelerator": "cpu",
        "gpu_vendor": "none",
        "gpus": [],
        "visible_devices": {k: os.environ[k] for k in VISIBLE_ENV_VARS if k in os.environ},
        "versions": {
            "python": platform.python_version(),
            "torch": None,
            "deepspeed": None,
            "transformers": None,
            "cuda": None,
            "hip": None,
        },
        "torch_arch_list": [],
        "errors": [{"tool": "detect", "error": _one_line(error)}],
        "notes": [],
    }


_ENUMS = {
    "accelerator": {"cuda", "rocm", "cpu", "other"},
    "gpu_vendor": {"nvidia", "amd", "other", "none"},
}
_GPU_SOURCES = {"nvidia-smi", "rocm-smi", "amd-smi", "rocminfo", "torch", "clinfo"}


def validate_report(report: Any) -> list[str]:
    """Problems with a report against schema 1; empty when it is valid.

    Lets the orchestrator check what a node sent without sharing code beyond this file.
    """
    problems: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    def typed(value: Any, kinds: tuple, allow_none: bool = False) -> bool:
        if value is None:
            return allow_none
        return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)

    if not isinstance(report, dict):
        return ["report is not an object"]
    check(report.get("schema") == SCHEMA_VERSION, "schema is not 1")
    check(typed(report.get("hostname"), (str,)), "hostname is not a string")
    ips = report.get("ips")
    check(isinstance(ips, list) and all(isinstance(i, str) for i in ips), "ips")
    check(typed(report.get("cpu_count"), (int,)) and report["cpu_count"] > 0, "cpu_count")
    check(typed(report.get("memory_bytes"), (int,)), "memory_bytes")
    # optional: reports from before the cgroup limits were added
    limit = report.get("memory_limit_bytes")
    check(limit is None or (typed(limit, (int,)) and limit > 0), "memory_limit_bytes")
    quota = report.get("cpu_quota")
    check(quota is None or (typed(quota, (int, float)) and quota > 0), "cpu_quota")
    for key, allowed in _ENUMS.items():
        check(report.get(key) in allowed, f"{key} {report.get(key)!r} not in {sorted(allowed)}")
    gpus = report.get("gpus")
    if not isinstance(gpus, list):
        problems.append("gpus is not a list")
        gpus = []
    per_vendor: dict[str, list[int]] = {}
    for n, gpu in enumerate(gpus):
        where = f"gpus[{n}]"
        if not isinstance(gpu, dict):
            problems.append(f"{where} is not an object")
            continue
        missing = [k for k in GPU_KEYS if k not in gpu]
        check(not missing, f"{where} lacks {missing}")
        check(typed(gpu.get("index"), (int,)), f"{where}.index")
        check(typed(gpu.get("physical_index"), (int,), True), f"{where}.physical_index")
        check(gpu.get("vendor") in {"nvidia", "amd", "other"}, f"{where}.vendor")
        check(typed(gpu.get("name"), (str,)), f"{where}.name")
        check(typed(gpu.get("memory_bytes"), (int,), True), f"{where}.memory_bytes")
        for key in ("driver", "runtime", "compute_capability", "gfx_target", "pci_bus_id", "uuid"):
            check(typed(gpu.get(key), (str,), True), f"{where}.{key}")
        check(isinstance(gpu.get("mig"), bool), f"{where}.mig")
        check(isinstance(gpu.get("mig_devices"), list), f"{where}.mig_devices")
        check(gpu.get("source") in _GPU_SOURCES, f"{where}.source {gpu.get('source')!r}")
        if isinstance(gpu.get("index"), int):
            per_vendor.setdefault(str(gpu.get("vendor")), []).append(gpu["index"])
    for vendor, indices in per_vendor.items():
        check(indices == list(range(len(indices))), f"{vendor} indices {indices} are not 0..n-1")
    vendors = {g.get("vendor") for g in gpus if isinstance(g, dict)}
    if gpus:
        check(report.get("gpu_vendor") in vendors, "gpu_vendor names no listed GPU")
    else:
        check(report.get("gpu_vendor") == "none", "gpu_vendor must be 'none' without GPUs")
    visible = report.get("visible_devices")
    check(
        isinstance(visible, dict)
        and set(visible) <= set(VISIBLE_ENV_VARS)
        and all(isinstance(v, str) for v in visible.values()),
        "visible_devices",
    )
    versions = report.get("versions")
    if isinstance(versions, dict):
        check(typed(versions.get("python"), (str,)), "versions.python")
        for key in ("torch", "deepspeed", "transformers"):
            check(key in versions and typed(versions[key], (str,), True), f"versions.{key}")
        for key in ("cuda", "hip"):  # optional: reports from before these were added
            check(typed(versions.get(key), (str,), True), f"versions.{key}")
    else:
        problems.append("versions is not an object")
    archs = report.get("torch_arch_list", [])
    check(isinstance(archs, list) and all(isinstance(a, str) for a in archs), "torch_arch_list")
    errors = report.get("errors")
    check(
        isinstance(errors, list)
        and all(
            isinstance(e, dict)
            and set(e) == {"tool", "error"}
            and isinstance(e["tool"], str)
            and isinstance(e["error"], str)
            and "\n" not in e["error"]
            for e in errors
        ),
        "errors must be [{tool, error}] with one-line errors",
    )
    notes = report.get("notes")
    check(isinstance(notes, list) and all(isinstance(n, str) for n in notes), "notes")
    return problems


def _gib(value: int | None) -> str:
    return "?" if not value else f"{value / 1024**3:.1f} GiB"


def format_summary(report: Mapping[str, Any]) -> str:
    versions = report.get("versions", {})
    quota = report.get("cpu_quota")
    quota = f" (quota {quota:.2f} cores)" if quota else ""
    limit = report.get("memory_limit_bytes")
    limit = f" (limit {_gib(limit)})" if limit else ""
    lines = [
        f"host     {report.get('hostname')}  {' '.join(report.get('ips') or []) or '(no address)'}",
        f"cpu      {report.get('cpu_count')} cores{quota}, "
        f"{_gib(report.get('memory_bytes'))} memory{limit}",
        f"python   {versions.get('python')}  torch {versions.get('torch') or '-'} "
        f"({report.get('accelerator')})  deepspeed {versions.get('deepspeed') or '-'}  "
        f"transformers {versions.get('transformers') or '-'}",
    ]
    gpus = report.get("gpus") or []
    lines.append(f"gpus     {len(gpus)} ({report.get('gpu_vendor')})")
    for gpu in gpus:
        detail = gpu.get("compute_capability") or gpu.get("gfx_target") or ""
        extra = " MIG" if gpu.get("mig") else ""
        lines.append(
            f"  [{gpu.get('index')}] {gpu.get('name') or '?'}  {_gib(gpu.get('memory_bytes'))}"
            f"  {detail}{extra}  {gpu.get('pci_bus_id') or ''}  via {gpu.get('source')}".rstrip()
        )
    for key, value in (report.get("visible_devices") or {}).items():
        lines.append(f"visible  {key}={value}")
    for error in report.get("errors") or []:
        lines.append(f"error    {error.get('tool')}: {error.get('error')}")
    for note in report.get("notes") or []:
        lines.append(f"note     {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="detect", description="Report this node's CPUs, memory, GPUs and ML stack."
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds per external tool (default ${TIMEOUT_ENV} or {DEFAULT_TIMEOUT:g})",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.print_usage(sys.stderr)
        print("detect: --timeout must be a positive number", file=sys.stderr)
        return 2
    try:
        report = collect(timeout=args.timeout)
    except Exception as exc:
        report = minimal_report(f"collect failed: {type(exc).__name__}: {exc}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
