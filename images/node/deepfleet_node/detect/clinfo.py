"""OpenCL's clinfo (--json, plain and -l): the last resort for GPUs no vendor tool lists."""

from __future__ import annotations

import re
from typing import Any

from .parsing import _clean, _json_from_text, _strip_ansi, normalize_pci, to_bytes
from .runner import _Ctx


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
