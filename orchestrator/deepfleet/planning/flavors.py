"""The image flavors (cpu, cuda, rocm): one small class each, everything that differs.

As DeepSpeed's launcher keeps one class per runner, each flavor here says which compose
overlay gives its container the devices, which torch.distributed backend its ranks use, how
its image is built and tagged, which machines it is for and what on a machine stops it from
reaching its GPUs. The rest of deepfleet asks the flavor instead of testing its name.
"""

from __future__ import annotations

from deepfleet.planning.compat import host_driver_problem

X86 = ("x86_64", "amd64")


class Flavor:
    name = ""
    overlays: tuple[str, ...] = ()  # compose files over compose/node.yml
    backend = "gloo"  # torch.distributed's, for a job of this flavor's ranks
    local_base = True  # `build-image --base-image local` (debootstrap Debian) can build it
    torch_label = ""  # the local version label of its torch wheels (2.13.0+cpu, +cu130, +rocm)
    version_key = ""  # the manifest key of its toolkit, in its tag and labels ("": none)

    @property
    def image(self) -> str:
        """The image `build-image` tags and `up` runs unless told otherwise."""
        return f"deepfleet/{self.name}:latest"

    def wants(self, facts) -> bool:
        """A machine with these devices runs this flavor when none is chosen."""
        return False

    def device_problems(self, facts, image: str, image_cuda: str | None) -> list[str]:
        return []

    def problems(self, facts, image: str = "", image_cuda: str | None = None) -> list[str]:
        """What stops a container of this flavor (and image) from using the machine."""
        found = self.device_problems(facts, image, image_cuda)
        if facts.arch and facts.arch not in X86 and self.name != "cpu":
            found.append(f"{self.name} images are built for x86_64, this machine is {facts.arch}")
        return found


class Cpu(Flavor):
    name = "cpu"
    torch_label = "cpu"


class Cuda(Flavor):
    name = "cuda"
    overlays = ("node.nvidia.yml",)
    backend = "nccl"
    torch_label = "cu"
    version_key = "CUDA_VERSION"

    def wants(self, facts) -> bool:
        return bool(facts.nvidia_gpus)

    def device_problems(self, facts, image, image_cuda) -> list[str]:
        found = []
        if not facts.nvidia_gpus:
            found.append("flavor cuda asked for, but the machine shows no /dev/nvidia* GPU")
        short = host_driver_problem(facts.nvidia_driver, image_cuda, image or "the image")
        if short:
            found.append(short)
        if not facts.nvidia_toolkit:
            found.append(
                "NVIDIA GPUs need the NVIDIA container toolkit on the host "
                "(install nvidia-container-toolkit, then `nvidia-ctk runtime configure "
                "--runtime=docker` and restart docker)"
            )
        return found


class Rocm(Flavor):
    name = "rocm"
    overlays = ("node.amd.yml",)
    backend = "nccl"  # RCCL answers to "nccl" in torch
    local_base = False  # ROCm's compiler ships in no wheel: its Dockerfile's public base
    torch_label = "rocm"
    version_key = "ROCM_VERSION"

    def wants(self, facts) -> bool:
        return bool(facts.has_amd)

    def device_problems(self, facts, image, image_cuda) -> list[str]:
        found = []
        if not facts.has_amd:
            found.append("flavor rocm asked for, but the machine has no /dev/kfd (amdgpu driver)")
        if not any(d.startswith("/dev/dri/renderD") for d in facts.devices):
            found.append("no /dev/dri/renderD* render node: ROCm cannot reach the GPU")
        return found


FLAVORS: dict[str, Flavor] = {f.name: f for f in (Cpu(), Cuda(), Rocm())}
NAMES = tuple(FLAVORS)  # cpu first: what a machine with nothing else runs
BY_DEVICES = (FLAVORS["cuda"], FLAVORS["rocm"])  # the order a machine's devices are asked


def get(name: str) -> Flavor:
    try:
        return FLAVORS[name]
    except KeyError:
        raise ValueError(f"unknown flavor {name!r}; one of {', '.join(NAMES)}") from None


def for_machine(facts) -> Flavor:
    return next((f for f in BY_DEVICES if f.wants(facts)), FLAVORS["cpu"])
