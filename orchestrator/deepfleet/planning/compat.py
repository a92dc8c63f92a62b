"""Compat: can a node's GPUs and driver run the torch inside its image? (pure)

detect reports what the image's torch was built with (CUDA/HIP release, the GPU
architectures it carries kernels for) beside what the host has (driver, its newest CUDA,
each GPU's compute capability or gfx target). A node that falls short would fail at the
first kernel with "no kernel image is available" or "driver version is insufficient" on
some rank; here it is refused at `up` with the fix named instead.
"""

from __future__ import annotations

import re

from deepfleet.planning.reports import GPU, NodeReport

ACCELERATOR_VENDOR = {"cuda": "nvidia", "rocm": "amd"}
# The oldest Linux driver of each CUDA major release; minor-version compatibility lets a
# build for 12.6 run on any 12.x driver from there on.
MIN_DRIVER = {11: "450", 12: "525", 13: "580"}
_SM = re.compile(r"^(sm|compute)_(\d+)([a-z]?)$")


def usable_gpus(report: NodeReport) -> list[GPU]:
    """GPUs the image's torch can drive: an iGPU of another vendor does not count."""
    vendor = ACCELERATOR_VENDOR.get(report.accelerator)
    return [gpu for gpu in report.gpus if gpu.vendor == vendor]


def effective_accelerator(report: NodeReport) -> str:
    """What a node's ranks run on: a GPU image on a machine without its GPUs runs on CPU."""
    if report.accelerator in ACCELERATOR_VENDOR and not usable_gpus(report):
        return "cpu"
    return report.accelerator


def _major_minor(version: str | None) -> tuple[int, int] | None:
    match = re.match(r"^\s*(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_major_of_driver(driver: str | None) -> int | None:
    """The newest CUDA major a Linux driver branch runs (535.104.05 -> 12)."""
    match = re.match(r"^\s*(\d+)\.", driver or "")
    if not match:
        return None
    branch = int(match.group(1))
    fits = [major for major, floor in MIN_DRIVER.items() if branch >= int(floor)]
    return max(fits) if fits else None


def driver_cuda_major(gpu: GPU) -> int | None:
    """The newest CUDA major the driver runs: nvidia-smi says so, or its version implies it."""
    runtime = _major_minor(gpu.runtime)
    return runtime[0] if runtime else cuda_major_of_driver(gpu.driver)


def driver_shortfall(
    driver: str | None, has: int | None, needed: str | None, what: str, runs: str = ""
) -> str | None:
    """The one line for a driver whose newest CUDA major (has) is older than the CUDA an
    image is built for (needed), with both fixes; None when the driver is new enough or
    either side is unknown."""
    want = _major_minor(needed)
    if not want or has is None or has >= want[0]:
        return None
    floor = MIN_DRIVER.get(want[0])
    return (
        f"driver {driver or '?'} runs {runs or f'CUDA {has}.x'}, {what} is built for CUDA {needed}"
        + (f" (driver {floor}+)" if floor else "")
        + f": update the driver, or build the cuda image for CUDA {has}.x"
    )


def host_driver_problem(driver: str | None, image_cuda: str | None, image: str) -> str | None:
    """Before anything is shipped: the host's driver against the image's CUDA label."""
    return driver_shortfall(driver, cuda_major_of_driver(driver), image_cuda, image)


def driver_problem(report: NodeReport, gpu: GPU) -> str | None:
    """A CUDA build runs on drivers of its own major release or newer, never older."""
    if report.accelerator != "cuda":
        return None
    runs = f"CUDA up to {gpu.runtime}" if gpu.runtime else ""
    return driver_shortfall(
        gpu.driver, driver_cuda_major(gpu), report.versions.get("cuda"), "the image's torch", runs
    )


def _sm(arch: str) -> tuple[str, int, int, bool] | None:
    """sm_86 -> ('sm', 8, 6, generic); the last digit is the minor release."""
    match = _SM.match(arch)
    if not match or len(match.group(2)) < 2:
        return None
    digits = match.group(2)
    return match.group(1), int(digits[:-1]), int(digits[-1]), not match.group(3)


def cuda_arch_supported(capability: str, arch_list: tuple[str, ...]) -> bool:
    """Kernels for sm_XY run on X.Y and later minors of X; PTX (compute_XY) JITs forward."""
    have = _major_minor(capability)
    if not have:
        return True
    for arch in arch_list:
        parsed = _sm(arch)
        if not parsed:
            continue
        kind, major, minor, generic = parsed
        if kind == "sm" and (major, minor) == have:
            return True
        if kind == "sm" and generic and major == have[0] and minor <= have[1]:
            return True
        if kind == "compute" and (major, minor) <= have:
            return True
    return False


def _gfx(target: str) -> str:
    return target.split(":")[0].strip().lower()  # gfx90a:sramecc+:xnack- -> gfx90a


def _arch_span(arch_list: tuple[str, ...]) -> str:
    shown = [a for a in arch_list if _sm(a) or a.startswith("gfx")]
    return f"{shown[0]}..{shown[-1]}" if len(shown) > 2 else " ".join(shown) or "none"


def arch_problem(report: NodeReport, gpu: GPU) -> str | None:
    archs = report.torch_arch_list
    if not archs:  # an older report or a failed probe: nothing to check against
        return None
    if report.accelerator == "cuda" and gpu.compute_capability:
        if cuda_arch_supported(gpu.compute_capability, archs):
            return None
        return (
            f"GPU {gpu.index} ({gpu.name}, compute {gpu.compute_capability}) is not among the "
            f"architectures the image's torch is built for ({_arch_span(archs)}): build the "
            "cuda image for an older CUDA (versions.env says how) or hide it "
            "with CUDA_VISIBLE_DEVICES"
        )
    if report.accelerator == "rocm" and gpu.gfx_target:
        if _gfx(gpu.gfx_target) in {_gfx(a) for a in archs}:
            return None
        return (
            f"GPU {gpu.index} ({gpu.name}, {_gfx(gpu.gfx_target)}) is not among the "
            f"architectures the image's torch is built for ({_arch_span(archs)}): set "
            "HSA_OVERRIDE_GFX_VERSION to a listed one or hide it with HIP_VISIBLE_DEVICES"
        )
    return None


def gpu_problems(report: NodeReport) -> dict[int, str]:
    """Each GPU the image's torch cannot drive (by index), and why."""
    problems: dict[int, str] = {}
    for gpu in usable_gpus(report):
        for check in (driver_problem, arch_problem):
            problem = check(report, gpu)
            if problem:
                problems.setdefault(gpu.index, problem)
    return problems


def drivable_gpus(report: NodeReport) -> list[GPU]:
    """The GPUs a job can use: the vendor's, minus those the image's torch cannot drive."""
    bad = gpu_problems(report)
    return [gpu for gpu in usable_gpus(report) if gpu.index not in bad]


def node_problems(report: NodeReport) -> list[str]:
    """Why this node's GPUs cannot run its image's torch; empty when they can."""
    problems: list[str] = []
    for gpu in usable_gpus(report):
        for check in (driver_problem, arch_problem):
            problem = check(report, gpu)
            if problem and problem not in problems:
                problems.append(problem)
    return problems
