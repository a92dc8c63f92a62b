import pytest
from unitdata import recorded

from deepfleet.health.doctor import _ports_in_use
from deepfleet.machines import hostprobe

NVIDIA_HOST = """dev=/dev/nvidiactl
dev=/dev/nvidia0
dev=/dev/nvidia1
tool=nvidia-smi
tool=nvidia-ctk
arch=x86_64
"""
AMD_HOST = (
    "dev=/dev/kfd\ndev=/dev/dri/renderD128\ndev=/dev/dri/renderD129\ntool=rocm-smi\narch=x86_64\n"
)
INFO_NVIDIA = {
    "Runtimes": {"runc": {}, "nvidia": {}},
    "DefaultRuntime": "runc",
    "ServerVersion": "28.0",
}
INFO_PLAIN = {"Runtimes": {"runc": {}, "io.containerd.runc.v2": {}}, "DefaultRuntime": "runc"}


def test_nvidia_machine_gets_cuda():
    facts = hostprobe.parse_probe(NVIDIA_HOST, INFO_NVIDIA)
    assert facts.nvidia_gpus == 2 and facts.nvidia_toolkit
    assert hostprobe.choose_flavor(facts) == "cuda"
    assert hostprobe.problems(facts, "cuda") == []


def test_nvidia_without_toolkit_is_a_problem_with_the_fix():
    facts = hostprobe.parse_probe("dev=/dev/nvidia0\ntool=nvidia-smi\narch=x86_64\n", INFO_PLAIN)
    assert hostprobe.choose_flavor(facts) == "cuda"
    (problem,) = hostprobe.problems(facts, "cuda")
    assert "NVIDIA container toolkit" in problem and "nvidia-ctk runtime configure" in problem


# /proc/driver/nvidia/version's first line, proprietary and open kernel modules
NVRM_535 = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023"
)
NVRM_OPEN_580 = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 06:54:38 UTC 2025"
)


@pytest.mark.parametrize(
    ("line", "driver"), [(NVRM_535, "535.104.05"), (NVRM_OPEN_580, "580.65.06")]
)
def test_driver_version_from_the_kernel_module(line, driver):
    facts = hostprobe.parse_probe(NVIDIA_HOST + f"nvidia_version={line}\n", INFO_NVIDIA)
    assert facts.nvidia_driver == driver


def test_a_driver_older_than_the_images_cuda_is_refused_before_shipping():
    old = hostprobe.parse_probe(NVIDIA_HOST + f"nvidia_version={NVRM_535}\n", INFO_NVIDIA)
    (problem,) = hostprobe.problems(old, "cuda", "deepfleet/cuda:latest", "13.0.1")
    assert problem == (
        "driver 535.104.05 runs CUDA 12.x, deepfleet/cuda:latest is built for CUDA 13.0.1 "
        "(driver 580+): update the driver, or build the cuda image for CUDA 12.x"
    )
    assert hostprobe.problems(old, "cuda", "deepfleet/cuda:latest", "12.6.3") == []
    assert hostprobe.problems(old, "cuda", "deepfleet/cuda:latest", None) == []  # no label
    new = hostprobe.parse_probe(NVIDIA_HOST + f"nvidia_version={NVRM_OPEN_580}\n", INFO_NVIDIA)
    assert hostprobe.problems(new, "cuda", "deepfleet/cuda:latest", "13.0.1") == []


def test_amd_machine_gets_rocm_and_needs_render_nodes():
    facts = hostprobe.parse_probe(AMD_HOST, INFO_PLAIN)
    assert hostprobe.choose_flavor(facts) == "rocm"
    assert hostprobe.problems(facts, "rocm") == []
    no_render = hostprobe.parse_probe("dev=/dev/kfd\narch=x86_64\n", INFO_PLAIN)
    assert "renderD" in hostprobe.problems(no_render, "rocm")[0]


def test_cpu_machine_and_overrides():
    facts = hostprobe.parse_probe("arch=x86_64\n", INFO_PLAIN)
    assert hostprobe.choose_flavor(facts) == "cpu"
    assert hostprobe.problems(facts, "cpu") == []
    assert hostprobe.choose_flavor(facts, "cuda") == "cuda"
    assert "no /dev/nvidia" in hostprobe.problems(facts, "cuda")[0]
    assert "no /dev/kfd" in hostprobe.problems(facts, "rocm")[0]
    arm = hostprobe.parse_probe("dev=/dev/nvidia0\narch=aarch64\n", INFO_NVIDIA)
    assert any("aarch64" in p for p in hostprobe.problems(arm, "cuda"))


def test_the_probe_script_runs_here():
    import subprocess

    out = subprocess.run(["sh", "-c", hostprobe.PROBE], capture_output=True, text=True, check=True)
    facts = hostprobe.parse_probe(out.stdout, {})
    assert facts.arch  # uname -m answered
    assert hostprobe.choose_flavor(facts) in ("cpu", "cuda", "rocm")


def test_docker_gpu_errors_become_advice():
    own = 'Error response from daemon: could not select device driver "" with capabilities: [[gpu]]'
    assert "NVIDIA container toolkit" in hostprobe.explain_start_error(own)
    assert hostprobe.explain_start_error("port is already allocated") == "port is already allocated"


@pytest.mark.parametrize(
    "name",
    [
        "docker-error-could-not-select-device-driver.txt",
        "docker-error-unknown-runtime-specified-nvidia-legacy.txt",
    ],
)
def test_recorded_docker_gpu_errors(name):
    text = recorded(f"other/{name}")
    assert "NVIDIA container toolkit" in hostprobe.explain_start_error(text)


def test_ports_in_use_from_ss():
    ss = (
        "LISTEN 0      128          0.0.0.0:2222       0.0.0.0:*\n"
        "LISTEN 0      4096            [::]:29500         [::]:*\n"
        "LISTEN 0      128        127.0.0.1:631        0.0.0.0:*\n"
    )
    assert _ports_in_use(ss) == {2222, 29500, 631}


def test_a_driver_the_vendor_base_refuses_becomes_advice():
    # what nvidia-container-cli says when NVIDIA_REQUIRE_CUDA outruns the driver
    message = (
        "failed to create task for container: failed to create shim task: OCI runtime create "
        "failed: runc create failed: unable to start container process: error during container "
        "init: error running hook #0: error running hook: exit status 1, stdout: , stderr: "
        "Auto-detected mode as 'legacy'\nnvidia-container-cli: requirement error: unsatisfied "
        "condition: cuda>=13.0, please update your driver to a newer version, or use an earlier "
        "cuda container: unknown"
    )
    advice = hostprobe.explain_start_error(message)
    assert advice.startswith("the NVIDIA driver is too old for this image (cuda>=13.0)")
    assert "\n" not in advice
