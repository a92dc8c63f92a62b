"""*_VISIBLE_DEVICES: which of the GPUs the tools list this process's CUDA or HIP will see,
renumbered as they will see them."""

from __future__ import annotations

import re

from .runner import _Ctx

VISIBLE_ENV_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


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
