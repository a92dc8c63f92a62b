"""compat: each node's driver and GPUs against what its image's torch was built for.

The host side comes from real nvidia-smi / rocm-smi recordings (../shared) through detect;
the torch side is the probe's answer from the built cuda image (its arch list was read
there with torch._C._cuda_getArchFlags()), since no GPU exists here to run it with.
"""

import json

import pytest
from unitdata import Runner, detect, detect_report, inv, recorded, rep

from deepfleet.errors import PlanError
from deepfleet.planning import reports
from deepfleet.planning.compat import (
    cuda_arch_supported,
    driver_cuda_major,
    effective_accelerator,
    node_problems,
)
from deepfleet.planning.plan import plan_cluster

# What torch 2.13.0 (PyPI, CUDA 13.0) in deepfleet/cuda reports, read from the built image.
CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
# A ROCm torch's list in the same form; no ROCm image could be built here to read one from.
ROCM_ARCHS = ["gfx900", "gfx906", "gfx908", "gfx90a", "gfx942", "gfx1030", "gfx1100"]


def torch_probe(cuda="13.0", hip=None, archs=CU130_ARCHS, devices=()):
    return {
        "torch": "2.13.0",
        "cuda": cuda,
        "hip": hip,
        "devices": list(devices),
        "arch_list": list(archs),
        "error": None,
    }


def report_from(table, probe):
    raw = detect.collect(env={}, runner=Runner(table), torch_info=probe)
    assert detect.validate_report(raw) == []
    return reports.parse(json.dumps(raw), "gpu1")


def nvidia_gpu(index=0, cc="9.0", driver="580.65.06", runtime="13.0", name="NVIDIA H100"):
    return {
        "index": index,
        "vendor": "nvidia",
        "name": name,
        "memory_bytes": 80 << 30,
        "driver": driver,
        "runtime": runtime,
        "compute_capability": cc,
    }


def cuda_node(*gpus, cuda="13.0", archs=CU130_ARCHS):
    versions = dict(detect_report()["versions"], torch="2.13.0", cuda=cuda)
    return rep(
        accelerator="cuda",
        gpu_vendor="nvidia" if gpus else "none",
        gpus=list(gpus),
        versions=versions,
        torch_arch_list=list(archs),
    )


# ---- real recordings through detect


def test_driver_510_p100_is_refused_for_a_cuda_13_image():
    # two recordings of one machine: the CSV query and -q -x (which carries the CUDA version)
    csv = recorded(
        "nvidia/query-csv-nounits-name-uuid-fan-pstate-memory-util-temp-power-clocks-teslap100.txt"
    )
    xml = recorded("nvidia/xml-q-x-tesla-p100-driver510.xml")
    table = {"nvidia-smi --query-gpu": (0, csv), "nvidia-smi -q -x": (0, xml)}
    report = report_from(table, torch_probe())
    assert [g.name for g in report.gpus] == ["Tesla P100-PCIE-16GB"]
    (problem,) = node_problems(report)
    assert "driver 510.47.03 runs CUDA up to 11.6" in problem
    assert "built for CUDA 13.0 (driver 580+)" in problem
    assert "build the cuda image for CUDA 11.x" in problem


def test_titan_v_is_refused_beside_an_ada_card_on_a_570_driver():
    csv = recorded("nvidia/query-csv-compute_cap-compute_mode-driver_version-name-index-mixed.txt")
    report = report_from({"nvidia-smi --query-gpu": (0, csv)}, torch_probe())
    problems = node_problems(report)
    # driver 570 is a CUDA 12 branch (no -q -x here, so its version tells)
    assert any("driver 570.86.15 runs CUDA 12.x" in p for p in problems)
    arch = [p for p in problems if "architectures" in p]
    assert len(arch) == 1 and "GPU 0 (NVIDIA TITAN V, compute 7.0)" in arch[0]
    assert "sm_75..sm_120" in arch[0]


def test_the_same_titan_v_machine_passes_with_a_cuda_12_6_image():
    csv = recorded("nvidia/query-csv-compute_cap-compute_mode-driver_version-name-index-mixed.txt")
    cu126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"]
    report = report_from({"nvidia-smi --query-gpu": (0, csv)}, torch_probe("12.6", archs=cu126))
    assert node_problems(report) == []


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("rocminfo-mi300x-4gpu-gfx942.txt", None),
        ("rocminfo-strix-halo-apu-gfx1151-with-npu.txt", "gfx1151"),
    ],
)
def test_rocminfo_gfx_targets_against_a_rocm_torch(name, refused):
    probe = torch_probe(cuda=None, hip="7.2.0", archs=ROCM_ARCHS)
    report = report_from({"rocminfo": (0, recorded(f"amd/{name}"))}, probe)
    assert report.accelerator == "rocm" and report.gpus
    problems = node_problems(report)
    if refused is None:
        assert problems == []
    else:
        (problem,) = problems
        assert f", {refused})" in problem and "HSA_OVERRIDE_GFX_VERSION" in problem


# ---- the rules


@pytest.mark.parametrize(
    ("capability", "ok"),
    [
        ("7.0", False),  # Volta: no sm_7x below 7.5 and no older PTX
        ("7.5", True),
        ("8.6", True),
        ("8.9", True),  # sm_86 cubins run on 8.9 (same major, newer minor)
        ("9.0", True),
        ("10.0", True),
        ("10.3", True),
        ("11.0", False),  # Thor: no sm_11x cubins
        ("12.1", True),
        ("13.0", False),  # no PTX in the wheel to JIT forward from
        ("6.1", False),
    ],
)
def test_cuda_arch_rules(capability, ok):
    assert cuda_arch_supported(capability, tuple(CU130_ARCHS)) is ok


def test_ptx_jits_forward_to_newer_gpus():
    assert cuda_arch_supported("13.0", ("sm_90", "compute_120"))
    assert not cuda_arch_supported("11.0", ("sm_90", "compute_120"))


def test_arch_specific_cubins_do_not_run_on_later_minors():
    assert cuda_arch_supported("9.0", ("sm_90a",))
    assert not cuda_arch_supported("9.1", ("sm_90a",))
    assert cuda_arch_supported("9.1", ("sm_90",))


@pytest.mark.parametrize(
    ("driver", "runtime", "major"),
    [
        ("580.65.06", None, 13),
        ("575.51.03", "12.9", 12),
        ("535.104.05", None, 12),
        ("470.82.01", None, 11),
        ("418.67", None, None),
        (None, None, None),
        ("610.01", "13.2", 13),
    ],
)
def test_driver_cuda_major(driver, runtime, major):
    gpu = reports.GPU(0, "nvidia", "x", driver=driver, runtime=runtime)
    assert driver_cuda_major(gpu) == major


def test_newer_minor_on_an_older_minor_driver_is_fine():
    # minor-version compatibility: a 12.6 build runs on a 12.2 (535) driver
    node = cuda_node(nvidia_gpu(driver="535.104.05", runtime="12.2"), cuda="12.6")
    assert node_problems(node) == []


def test_a_report_without_build_info_is_not_refused():
    node = cuda_node(nvidia_gpu(cc="6.0", driver="450.80.02", runtime="11.0"), cuda=None, archs=())
    assert node_problems(node) == []


def test_rocm_gfx_target_must_be_built_for():
    def amd(target):
        gpu = {"index": 0, "vendor": "amd", "name": "Radeon", "gfx_target": target}
        versions = dict(detect_report()["versions"], hip="7.2.0")
        return rep(
            accelerator="rocm",
            gpu_vendor="amd",
            gpus=[gpu],
            versions=versions,
            torch_arch_list=ROCM_ARCHS,
        )

    assert node_problems(amd("gfx90a:sramecc+:xnack-")) == []
    (problem,) = node_problems(amd("gfx1031"))
    assert "gfx1031" in problem and "HSA_OVERRIDE_GFX_VERSION" in problem


# ---- through the planner


def test_a_cuda_image_on_a_machine_without_gpus_runs_on_cpu():
    node = cuda_node()
    assert effective_accelerator(node) == "cpu"
    plan = plan_cluster(inv("a", "b"), {"a": node, "b": rep()})
    assert plan.backend == "gloo"
    assert {n.accelerator for n in plan.nodes} == {"cpu"}


def test_plan_names_the_node_that_cannot_run_the_image():
    good = cuda_node(nvidia_gpu())
    old = cuda_node(nvidia_gpu(driver="535.104.05", runtime="12.2"))
    # the rest runs the job; the machine sits out with its reason
    plan = plan_cluster(inv("a", "b"), {"a": good, "b": old})
    assert plan.backend == "nccl" and [n.name for n in plan.nodes] == ["a"]
    (out,) = plan.left_out
    assert out.name == "b" and out.reason.startswith("driver 535.104.05 runs CUDA up to 12.2")
    # slots given to it explicitly: refused, naming it and the fix
    with pytest.raises(PlanError) as err:
        plan_cluster(inv("a", "b"), {"a": good, "b": old}, slots={"b": 1})
    assert err.value.one_line().startswith("b: driver 535.104.05 runs CUDA up to 12.2")


def test_plan_lists_every_refused_node():
    old = cuda_node(nvidia_gpu(driver="535.104.05", runtime="12.2"))
    volta = cuda_node(nvidia_gpu(cc="7.0", name="Tesla V100"))
    with pytest.raises(PlanError) as err:
        plan_cluster(inv("a", "b"), {"a": old, "b": volta})
    message = err.value.one_line()
    assert message.startswith("a: driver 535") and "; b: GPU 0 (Tesla V100, compute 7.0)" in message
    assert "\n" not in message
