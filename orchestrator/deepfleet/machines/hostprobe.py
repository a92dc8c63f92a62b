"""Host probe: what a node machine has (GPU devices, container toolkits), before any
container exists, so the image flavor and GPU passthrough can be chosen per node.

The facts come from the Docker engine's info and one small shell probe over the node's
SSH connection; `choose_flavor` and `problems` are pure and tested on recorded facts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deepfleet.errors import ContainerError
from deepfleet.planning import flavors

# POSIX sh, read-only, no sudo: device nodes and tools on the host.
PROBE = r"""
for d in /dev/kfd /dev/nvidiactl; do [ -e "$d" ] && echo "dev=$d"; done
for d in /dev/nvidia[0-9]* /dev/dri/renderD*; do [ -e "$d" ] && echo "dev=$d"; done
for t in nvidia-smi nvidia-ctk nvidia-container-cli nvidia-container-runtime-hook \
    rocm-smi amd-smi; do
  command -v "$t" >/dev/null 2>&1 && echo "tool=$t"
done
echo "arch=$(uname -m)"
# the loaded NVIDIA kernel module, world-readable: no nvidia-smi needed on the host
[ -r /proc/driver/nvidia/version ] && echo "nvidia_version=$(head -n 1 /proc/driver/nvidia/version)"
true
"""
# "NVRM version: NVIDIA UNIX [Open Kernel Module for ]x86_64 Kernel Module  580.65.06  ..."
_NVRM = re.compile(r"Kernel Module.*?\s(\d{3,}\.\d+(?:\.\d+)?)\b")


@dataclass(frozen=True)
class HostFacts:
    devices: frozenset[str] = field(default_factory=frozenset)
    tools: frozenset[str] = field(default_factory=frozenset)
    arch: str = ""
    runtimes: frozenset[str] = field(default_factory=frozenset)
    default_runtime: str = ""
    cdi_spec_dirs: tuple[str, ...] = ()
    docker_version: str = ""
    nvidia_driver: str = ""  # the loaded kernel module's version, when there is one

    @property
    def nvidia_gpus(self) -> int:
        return sum(1 for d in self.devices if d.startswith("/dev/nvidia") and d[11:].isdigit())

    @property
    def has_amd(self) -> bool:
        return "/dev/kfd" in self.devices

    @property
    def nvidia_toolkit(self) -> bool:
        """Docker can honour `--gpus` here: a registered runtime or the toolkit's hook."""
        return "nvidia" in self.runtimes or bool(
            self.tools & {"nvidia-container-runtime-hook", "nvidia-container-cli", "nvidia-ctk"}
        )


def parse_probe(text: str, info: dict) -> HostFacts:
    devices, tools, arch, driver = set(), set(), "", ""
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key == "dev":
            devices.add(value)
        elif key == "tool":
            tools.add(value)
        elif key == "arch":
            arch = value
        elif key == "nvidia_version":
            match = _NVRM.search(value)
            driver = match.group(1) if match else ""
    return HostFacts(
        devices=frozenset(devices),
        tools=frozenset(tools),
        arch=arch,
        runtimes=frozenset((info.get("Runtimes") or {}).keys()),
        default_runtime=str(info.get("DefaultRuntime") or ""),
        cdi_spec_dirs=tuple(info.get("CDISpecDirs") or ()),
        docker_version=str(info.get("ServerVersion") or ""),
        nvidia_driver=driver,
    )


def choose_flavor(facts: HostFacts, override: str | None = None) -> str:
    """The image flavor for a machine: the user's choice, else what its devices say."""
    return override or flavors.for_machine(facts).name


def problems(
    facts: HostFacts, flavor: str, image: str = "", image_cuda: str | None = None
) -> list[str]:
    """What stops a container of this flavor (and image) from using the machine's GPUs."""
    return flavors.get(flavor).problems(facts, image, image_cuda)


def probe(client, node: str, run_host) -> HostFacts:
    try:
        info = client.info()
        code, out, err = run_host(client, PROBE)
    except Exception as exc:
        raise ContainerError(f"cannot inspect the machine: {exc}", node) from exc
    if code != 0:
        raise ContainerError(f"host probe failed: {err.strip()[:200]}", node)
    return parse_probe(out, info)


# Docker's own words when --gpus has no toolkit behind it, old and new.
_NO_TOOLKIT = (
    'could not select device driver "" with capabilities: [[gpu]]',
    "unknown runtime specified nvidia",
)


def explain_start_error(message: str) -> str:
    """Turn Docker's GPU passthrough errors into what to do about them."""
    lowered = message.lower()
    if any(marker.lower() in lowered for marker in _NO_TOOLKIT):
        return (
            "Docker cannot pass NVIDIA GPUs through: the NVIDIA container toolkit is missing "
            f"or not registered with Docker ({message.strip().splitlines()[-1][:160]})"
        )
    if "unsatisfied condition: cuda>=" in lowered:
        # the toolkit compares the image's NVIDIA_REQUIRE_CUDA with the driver (vendor bases)
        wanted = lowered.split("unsatisfied condition:", 1)[1].split(",")[0].strip()
        return (
            f"the NVIDIA driver is too old for this image ({wanted}): update the driver, or "
            "build the cuda image for the CUDA release the driver runs (see images/versions.env)"
        )
    if "/dev/kfd" in message and ("no such file" in lowered or "error gathering device" in lowered):
        return (
            f"the machine has no /dev/kfd: is the amdgpu driver loaded? ({message.strip()[:160]})"
        )
    return message
