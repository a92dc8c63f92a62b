"""The report: collect() runs every collector through an injectable runner and composes
them; minimal_report() is what is printed when that fails. Its shape is
deepfleet_node/schemas/report.schema.json (see schema.py)."""

from __future__ import annotations

import math
import os
import platform
import socket
from collections.abc import Callable, Mapping
from typing import Any

from .amd import _collect_amd
from .clinfo import _collect_clinfo
from .host import _cpu_count, _host_ips, _read_text, cgroup_limits, parse_meminfo
from .nvidia import _collect_nvidia
from .parsing import _one_line
from .runner import DEFAULT_TIMEOUT, Runner, _Ctx, run_tool
from .torchinfo import _accelerator, _dist_requires, _dist_version, _probe_torch, _torch_gpus
from .visibility import VISIBLE_ENV_VARS, _apply_visibility

SCHEMA_VERSION = 1
TIMEOUT_ENV = "DEEPFLEET_DETECT_TIMEOUT"

# Importing torch and counting devices takes far longer than any SMI call (cold page cache,
# CUDA/HIP init), so it gets its own, larger budget.
TORCH_TIMEOUT_ENV = "DEEPFLEET_DETECT_TORCH_TIMEOUT"

DEFAULT_TORCH_TIMEOUT = 60.0

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
