"""What the image's torch was built for and the devices it sees, probed in a child process:
importing torch or initialising a broken driver can hang or crash, and the report must
come out regardless."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Mapping
from typing import Any

from .parsing import _json_from_text, summarize_error
from .runner import _Ctx
from .visibility import _parse_visible

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
