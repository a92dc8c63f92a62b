"""AMD: rocminfo (what ROCr and so HIP enumerate), amd-smi and rocm-smi in each of their
output formats, and the collector that merges them.

Over 400 lines on purpose: one tool family whose three tools each have several output
formats across ROCm releases (JSON, CSV, the legacy tables), all read into one GPU record
by the collector at the end; split up, each parser would sit away from the fields the
collector merges it with, and the recorded outputs' tests (test_detect_amd.py) read it
as one."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from .merge import _match
from .parsing import (
    _clean,
    _csv_rows,
    _json_from_text,
    _norm_key,
    _strip_ansi,
    _to_int,
    normalize_pci,
    summarize_error,
    to_bytes,
)
from .runner import _Ctx


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
