"""Precision: the one rule for which floating-point format a job computes in.

Pure and torch-free at import (the operator imports it to plan a job; the node applies the
same rule to its own device when run without the operator's decision):

  bf16  only on hardware that computes it natively: NVIDIA compute capability 8.0 and
        newer (Ampere on), AMD CDNA2+ (gfx90a, gfx94*, gfx95*) and RDNA3+ (gfx11*, gfx12*)
  fp16  on any other GPU (bf16 there is emulated, or missing)
  fp32  without a GPU

Every rank of a job must agree (ZeRO's buffers, the all-reduced gradients), so a job
computes in bf16 only when every GPU in it is native: job_precision. torch's own
is_bf16_supported() is not asked: it answers yes on T4/V100 (emulation) and on every ROCm
device.
"""

from __future__ import annotations

from collections.abc import Iterable

PRECISIONS = ("fp32", "bf16", "fp16")
# Bytes per element of each precision: the one dtype-size map.
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# AMD targets with native bf16: CDNA2 and newer, RDNA3 and newer.
NATIVE_BF16_GFX = ("gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")
NATIVE_BF16_CC = 8.0  # NVIDIA: Ampere and newer


def native_bf16(compute_capability: str | None, gfx_target: str | None) -> bool:
    """Whether a GPU computes bf16 natively, from its NVIDIA compute capability ("8.6") or,
    when that is unset, its AMD gfx target ("gfx90a", "gfx90a:sramecc+:xnack-")."""
    if compute_capability:
        try:
            return float(compute_capability) >= NATIVE_BF16_CC
        except ValueError:
            return False
    target = (gfx_target or "").lower()
    return target.startswith(NATIVE_BF16_GFX)


def job_precision(gpus: Iterable[tuple[str | None, str | None]]) -> str:
    """One precision for every rank: fp32 with no GPU, bf16 when every GPU (given as
    (compute capability, gfx target)) has it natively, else fp16."""
    facts = list(gpus)
    if not facts:
        return "fp32"
    return "bf16" if all(native_bf16(cc, gfx) for cc, gfx in facts) else "fp16"


def check(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is none of {', '.join(PRECISIONS)}")
    return name


def torch_dtype(name: str):
    """The torch dtype of a precision name (imports torch)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[check(name)]


def gpu_facts(index: int) -> tuple[str | None, str | None]:
    """(compute capability, gfx target) of torch's GPU `index`: the first on CUDA builds,
    the second on ROCm builds (which answer through torch.cuda too)."""
    import torch

    if getattr(torch.version, "hip", None):
        arch = getattr(torch.cuda.get_device_properties(index), "gcnArchName", "") or ""
        return None, arch.split(":")[0] or None
    major, minor = torch.cuda.get_device_capability(index)
    return f"{major}.{minor}", None


def local_precision(device=None) -> str:
    """The rule applied to this process's own device, for a run without the operator's
    decision (--precision/--dtype auto): fp32 on the CPU, bf16 on a GPU that has it
    natively, else fp16. device: a torch.device or its name ("cpu", "cuda", "cuda:1");
    None: the current CUDA device if torch sees one, else the CPU. Another accelerator type
    counts as a GPU without native bf16."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cpu":
        return "fp32"
    if device.type != "cuda":
        return "fp16"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return job_precision([gpu_facts(index)])
