"""detect.collect with an injected runner, run_tool with real processes, and the CLI."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parents[2] / "images" / "node"
sys.path.insert(0, str(NODE_DIR))

from deepfleet_node import detect  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "detect"
MiB = 1024**2
NVIDIA_QUERY = "nvidia-smi --query-gpu="
ROCM_SMI = "rocm-smi --showproductname"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


class FakeRunner:
    """Answers commands from a table keyed by command-line prefix; anything else is a
    missing tool. Values: stdout text, (returncode, stdout[, stderr]), a ToolResult, or a
    callable taking argv."""

    def __init__(self, table=None):
        self.table = table or {}
        self.calls = []
        self.envs = []

    def __call__(self, argv, timeout, env=None):
        self.calls.append(" ".join(argv))
        self.envs.append(env)
        line = " ".join(argv)
        for prefix in sorted(self.table, key=len, reverse=True):
            if line.startswith(prefix):
                answer = self.table[prefix]
                if callable(answer):
                    answer = answer(argv)
                if isinstance(answer, detect.ToolResult):
                    return answer
                if isinstance(answer, str):
                    return detect.ToolResult(list(argv), 0, answer, "")
                rc, out, *err = answer
                return detect.ToolResult(list(argv), rc, out, err[0] if err else "")
        return detect.ToolResult(list(argv), missing=True)

    def ran(self, prefix):
        return [c for c in self.calls if c.startswith(prefix)]


def run(table=None, env=None, read_text=None, torch_info=None):
    runner = FakeRunner(table)
    kwargs = {"torch_info": torch_info}
    if read_text is not None:
        kwargs["read_text"] = read_text
    report = detect.collect(env=env or {}, runner=runner, **kwargs)
    assert detect.validate_report(report) == []
    json.dumps(report)  # must serialise
    return report, runner


def errors_of(report, tool):
    return [e["error"] for e in report["errors"] if e["tool"] == tool]


NVIDIA_4 = {
    NVIDIA_QUERY: fixture("nvidia-smi-query-4gpu-mixed.csv"),
    "nvidia-smi -q -x": fixture("nvidia-smi-q-x-4gpu-mixed.xml"),
}
NVIDIA_MIG = {
    NVIDIA_QUERY: fixture("nvidia-smi-query-2gpu-mig.csv"),
    "nvidia-smi -q -x": fixture("nvidia-smi-q-x-2gpu-mig.xml"),
    "nvidia-smi -L": fixture("nvidia-smi-L-2gpu-mig.txt"),
}
AMD_2 = {
    "rocminfo": fixture("rocminfo-2gpu-mi210.txt"),
    ROCM_SMI: fixture("rocm-smi-2gpu-rocm6.json"),
    "amd-smi static": fixture("amd-smi-static-2gpu.json"),
}


def rocm_version_file(path):
    if path == "/opt/rocm/.info/version":
        return "6.2.0-55\n"
    return detect._read_text(path) if path.startswith("/proc") else None


def no_rocm_version_file(path):
    return detect._read_text(path) if path.startswith("/proc") else None


# ---------------------------------------------------------------- no tools


def test_no_tool_at_all_means_no_gpu_and_no_error():
    report, runner = run()
    assert report["gpu_vendor"] == "none"
    assert report["gpus"] == []
    assert report["errors"] == []
    assert report["accelerator"] == "cpu"
    assert report["visible_devices"] == {}
    assert report["versions"]["python"].startswith(f"{sys.version_info[0]}.")
    # Every vendor tool was tried, clinfo included, and each was silently absent.
    for tool in ("nvidia-smi", "rocminfo", "amd-smi", "rocm-smi", "clinfo"):
        assert runner.ran(tool), tool


def test_top_level_fields():
    report, _ = run(env={"CUDA_VISIBLE_DEVICES": "0", "OTHER": "x"})
    assert report["schema"] == 1
    assert isinstance(report["hostname"], str) and report["hostname"]
    assert report["cpu_count"] >= 1
    assert report["visible_devices"] == {"CUDA_VISIBLE_DEVICES": "0"}


def test_ips_come_from_ip_json():
    report, _ = run({"ip -j addr": fixture("ip-addr.json")})
    assert report["ips"] == ["192.168.1.20", "fd12:3456::20", "172.17.0.1"]


def test_ips_fall_back_to_hostname_I():
    report, _ = run({"ip -j addr": (1, "", "ip: command failed"), "hostname -I": "10.0.0.5 ::1 \n"})
    assert report["ips"] == ["10.0.0.5"]


# ---------------------------------------------------------------- NVIDIA


def test_nvidia_multi_gpu_mixed_models():
    report, runner = run(NVIDIA_4)
    assert report["gpu_vendor"] == "nvidia"
    gpus = report["gpus"]
    assert [g["index"] for g in gpus] == [0, 1, 2, 3]
    assert [g["physical_index"] for g in gpus] == [0, 1, 2, 3]
    assert gpus[0]["name"] == "NVIDIA A100 80GB PCIe"
    assert gpus[3]["name"] == "NVIDIA RTX A6000"
    assert gpus[0]["memory_bytes"] == 81920 * MiB
    assert {g["runtime"] for g in gpus} == {"12.4"}
    assert {g["driver"] for g in gpus} == {"550.54.15"}
    assert [g["compute_capability"] for g in gpus] == ["8.0", "8.0", "8.6", "8.6"]
    assert all(g["source"] == "nvidia-smi" and g["vendor"] == "nvidia" for g in gpus)
    assert all(g["gfx_target"] is None and g["mig"] is False for g in gpus)
    assert report["errors"] == []
    assert any("CUDA_DEVICE_ORDER" in n for n in report["notes"])
    assert not runner.ran("nvidia-smi -L")  # no MIG, so no need


def test_pci_bus_order_silences_the_mixed_model_note():
    report, _ = run(NVIDIA_4, env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert not any("CUDA_DEVICE_ORDER" in n for n in report["notes"])


def test_cuda_visible_devices_indices_and_uuid_prefix():
    report, _ = run(
        NVIDIA_4, env={"CUDA_VISIBLE_DEVICES": "3, GPU-aaaa0000-1111-2222-3333-44444444444"}
    )
    # The prefix matches GPUs 0 and 1: CUDA treats an ambiguous prefix as invalid.
    assert [g["physical_index"] for g in report["gpus"]] == [3]
    report, _ = run(
        NVIDIA_4, env={"CUDA_VISIBLE_DEVICES": "2,GPU-aaaa0000-1111-2222-3333-444444444441"}
    )
    assert [(g["index"], g["physical_index"]) for g in report["gpus"]] == [(0, 2), (1, 1)]
    assert report["visible_devices"] == {
        "CUDA_VISIBLE_DEVICES": "2,GPU-aaaa0000-1111-2222-3333-444444444441"
    }


def test_cuda_visible_devices_stops_at_an_invalid_entry():
    report, _ = run(NVIDIA_4, env={"CUDA_VISIBLE_DEVICES": "0,2,-1,1"})
    assert [g["physical_index"] for g in report["gpus"]] == [0, 2]
    assert any("'-1'" in n for n in report["notes"])


def test_cuda_visible_devices_empty_hides_everything():
    report, _ = run(NVIDIA_4, env={"CUDA_VISIBLE_DEVICES": ""})
    assert report["gpus"] == []
    assert report["gpu_vendor"] == "none"


def test_nvidia_mig_devices_are_listed():
    report, runner = run(NVIDIA_MIG)
    first, second = report["gpus"]
    assert first["mig"] is True and second["mig"] is False
    assert [m["profile"] for m in first["mig_devices"]] == ["3g.20gb", "3g.20gb"]
    assert first["mig_devices"][0]["uuid"] == "MIG-eeee0000-1111-2222-3333-444444444440"
    assert first["mig_devices"][0]["memory_bytes"] == 19968 * MiB
    assert first["runtime"] == "12.2"
    assert runner.ran("nvidia-smi -L")


@pytest.mark.parametrize(
    "selector",
    [
        "MIG-eeee0000-1111-2222-3333-444444444441",
        "MIG-eeee0000-1111-2222-3333-4444444444410",  # full UUID plus junk: no match
        "MIG-eeee0000-1111-2222-3333-44444444444",  # prefix of both: ambiguous
        "MIG-GPU-dddd0000-1111-2222-3333-444444444440/2/0",  # R450 form
    ],
)
def test_cuda_visible_devices_selects_a_mig_device(selector):
    report, _ = run(NVIDIA_MIG, env={"CUDA_VISIBLE_DEVICES": selector})
    if not selector.endswith(("441", "/2/0")):
        assert report["gpus"] == []
        assert any(selector in n for n in report["notes"])
        return
    (gpu,) = report["gpus"]
    assert gpu["index"] == 0 and gpu["physical_index"] == 0
    assert gpu["mig"] is True
    assert gpu["uuid"] == "MIG-eeee0000-1111-2222-3333-444444444441"
    assert gpu["name"] == "NVIDIA A100-SXM4-40GB MIG 3g.20gb"
    assert gpu["memory_bytes"] == 19968 * MiB


def test_old_driver_without_compute_cap_is_retried():
    def query(argv):
        fields = argv[1].split("=", 1)[1].split(",")
        for newer in ("compute_cap", "mig.mode.current"):
            if newer in fields:
                return (2, f'Field "{newer}" is not a valid field to query.\n\n')
        return (0, fixture("nvidia-smi-query-old-driver.csv"))

    report, runner = run({NVIDIA_QUERY: query, "nvidia-smi -q -x": (0, "<nvidia_smi_log/>")})
    (gpu,) = report["gpus"]
    assert gpu["name"] == "Tesla V100-SXM2-16GB"
    assert gpu["compute_capability"] is None
    assert gpu["memory_bytes"] == 16160 * MiB
    assert report["errors"] == []
    assert len(runner.ran(NVIDIA_QUERY)) == 3


@pytest.mark.parametrize(
    ("returncode", "output"),
    [
        (9, "Failed to initialize NVML: Driver/library version mismatch\n"),
        (255, "Failed to initialize NVML: Unknown Error\n"),
        (6, "No devices were found\n"),
        (
            9,
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
            "Make sure that the latest NVIDIA driver is installed and running.\n",
        ),
    ],
)
def test_nvidia_smi_errors_become_error_entries(returncode, output):
    report, runner = run({"nvidia-smi": (returncode, output)})
    assert errors_of(report, "nvidia-smi") == [output.strip()]
    assert report["gpus"] == [] and report["gpu_vendor"] == "none"
    # The driver is broken: asking it again with -q -x would only repeat the failure.
    assert runner.calls.count("nvidia-smi -q -x") == 0


def test_nvidia_garbage_output_is_an_error_not_a_crash():
    report, _ = run({NVIDIA_QUERY: "\x00\x01 garbage, 1\n", "nvidia-smi -q -x": "<not-xml"})
    assert any("unparseable" in e for e in errors_of(report, "nvidia-smi"))
    assert report["gpus"] == []


# ---------------------------------------------------------------- AMD


def test_amd_all_three_tools_merged():
    report, _ = run(AMD_2, read_text=rocm_version_file)
    assert report["gpu_vendor"] == "amd"
    first, second = report["gpus"]
    assert first["source"] == "rocminfo"
    assert first["name"] == "AMD Instinct MI210"
    assert first["memory_bytes"] == 68702699520  # rocm-smi's exact VRAM, not the HSA pool
    assert first["gfx_target"] == "gfx90a"
    assert first["pci_bus_id"] == "0000:c1:00.0"
    assert first["uuid"] == "GPU-1111222233334444"
    assert first["driver"] == "6.8.5"
    assert first["runtime"] == "6.2.0"
    assert second["pci_bus_id"] == "0000:c2:00.0"
    assert first["compute_capability"] is None and first["mig"] is False
    assert report["errors"] == []


def test_amd_rocm_smi_only():
    report, _ = run({ROCM_SMI: fixture("rocm-smi-2gpu-rocm6.json")})
    assert [g["source"] for g in report["gpus"]] == ["rocm-smi", "rocm-smi"]
    assert report["gpus"][0]["driver"] == "6.7.0"
    assert report["gpus"][1]["uuid"] == "GPU-5555666677778888"


def test_amd_runtime_from_amd_smi_version():
    table = dict(AMD_2)
    table["amd-smi version"] = (
        "AMDSMI Tool: 24.6.2 | AMDSMI Library version: 24.6.2 | ROCm version: 6.2.1\n"
    )
    report, _ = run(table, read_text=no_rocm_version_file)
    assert report["gpus"][0]["runtime"] == "6.2.1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ROCR_VISIBLE_DEVICES": "1"}, [1]),
        ({"ROCR_VISIBLE_DEVICES": "GPU-5555666677778888"}, [1]),
        ({"HIP_VISIBLE_DEVICES": "1,0"}, [1, 0]),
        ({"ROCR_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "0"}, [1]),
        ({"ROCR_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "1"}, []),
        ({"CUDA_VISIBLE_DEVICES": "1"}, [1]),  # HIP honours it when HIP_VISIBLE_DEVICES is unset
        ({"CUDA_VISIBLE_DEVICES": "1", "HIP_VISIBLE_DEVICES": "0"}, [0]),
    ],
)
def test_amd_visible_devices(env, expected):
    report, runner = run(AMD_2, env=env)
    assert [g["physical_index"] for g in report["gpus"]] == expected
    assert [g["index"] for g in report["gpus"]] == list(range(len(expected)))
    assert report["visible_devices"] == env
    # rocminfo must see every GPU, or physical indices would be relative to the filter.
    rocminfo_env = runner.envs[runner.calls.index("rocminfo")]
    assert "ROCR_VISIBLE_DEVICES" not in rocminfo_env


def test_amd_container_without_kfd():
    table = {
        "rocminfo": (
            1,
            "ROCk module is loaded\nUnable to open /dev/kfd read-write: No such file or directory\n"
            "Failed to get user name to check for video group membership\n",
        ),
        "rocm-smi": (
            2,
            "cat: /sys/module/amdgpu/initstate: No such file or directory\n"
            "ERROR:root:Driver not initialized (amdgpu not found in modules)\n",
        ),
    }
    report, _ = run(table)
    assert report["gpus"] == [] and report["gpu_vendor"] == "none"
    assert errors_of(report, "rocminfo") == [
        "Unable to open /dev/kfd read-write: No such file or directory"
    ]
    assert errors_of(report, "rocm-smi") == [
        "ERROR:root:Driver not initialized (amdgpu not found in modules)"
    ]


def test_rock_module_not_loaded():
    report, _ = run({"rocminfo": (1, "ROCk module is NOT loaded, possibly no GPU devices\n")})
    assert errors_of(report, "rocminfo") == ["ROCk module is NOT loaded, possibly no GPU devices"]


def test_rocm_smi_reports_no_amd_gpus():
    report, _ = run(
        {ROCM_SMI: 'WARNING: No AMD GPUs specified\n{"system": {"Driver version": "6.3.6"}}\n'}
    )
    assert errors_of(report, "rocm-smi") == ["WARNING: No AMD GPUs specified"]
    assert report["gpus"] == []


def test_rocm_smi_without_json_support_falls_back_to_text():
    text = (
        "GPU[0]\t\t: Card series: \t\tAMD Instinct MI100\n"
        "GPU[0]\t\t: VRAM Total Memory (B): 34342961152\n"
        "GPU[0]\t\t: PCI Bus: 0000:03:00.0\n"
    )

    def rocm_smi(argv):
        return (
            (2, "", "rocm-smi: error: unrecognized arguments: --json")
            if "--json" in argv
            else (0, text)
        )

    report, runner = run({"rocm-smi": rocm_smi})
    (gpu,) = report["gpus"]
    assert gpu["name"] == "AMD Instinct MI100" and gpu["memory_bytes"] == 34342961152
    assert report["errors"] == []
    assert len(runner.ran("rocm-smi")) == 2


def test_apu_with_npu_counts_only_the_gpu():
    report, _ = run({"rocminfo": fixture("rocminfo-apu-npu.txt")})
    (gpu,) = report["gpus"]
    assert gpu["gfx_target"] == "gfx1150"
    assert gpu["name"] == "AMD Radeon 890M Graphics"
    assert gpu["uuid"] is None
    assert gpu["pci_bus_id"] == "0000:c4:00.0"


def test_gfx_override_without_rocminfo():
    smi = '{"card0": {"Card Series": "Navi 22 [Radeon RX 6700 XT]", "GFX Version": "gfx1031"}}'
    report, _ = run({ROCM_SMI: smi}, env={"HSA_OVERRIDE_GFX_VERSION": "10.3.0"})
    (gpu,) = report["gpus"]
    assert gpu["gfx_target"] == "gfx1030"
    assert any("gfx1031" in n and "gfx1030" in n for n in report["notes"])
    report, _ = run({ROCM_SMI: smi})
    assert report["gpus"][0]["gfx_target"] == "gfx1031"
    assert report["notes"] == []


def test_amd_tools_that_disagree_on_count_are_not_merged_by_guess():
    table = dict(AMD_2)
    table[ROCM_SMI] = '{"card0": {"Card Series": "Some GPU", "PCI Bus": "0000:0a:00.0"}}'
    table["amd-smi static"] = (1, "", "amd-smi: error")
    report, _ = run(table)
    assert len(report["gpus"]) == 2
    assert report["gpus"][0]["name"] == "AMD Instinct MI210"
    assert any("not merged" in n for n in report["notes"])


# ---------------------------------------------------------------- mixed vendors, torch, clinfo


def test_mixed_vendor_machine_lists_both_with_separate_indices():
    table = dict(NVIDIA_4)
    table["rocminfo"] = fixture("rocminfo-apu-npu.txt")
    report, _ = run(table)
    assert [(g["vendor"], g["index"]) for g in report["gpus"]] == [
        ("nvidia", 0),
        ("nvidia", 1),
        ("nvidia", 2),
        ("nvidia", 3),
        ("amd", 0),
    ]
    assert report["gpu_vendor"] == "nvidia"
    assert any("several vendors" in n for n in report["notes"])


def torch_cuda(count, visible_names=None):
    names = visible_names or ["NVIDIA A100 80GB PCIe"] * count
    return {
        "torch": "2.3.1+cu121",
        "cuda": "12.1",
        "hip": None,
        "error": None,
        "devices": [
            {
                "name": name,
                "total_memory": 81920 * MiB,
                "major": 8,
                "minor": 0,
                "gcn_arch": None,
                "uuid": f"0000000{i}-1111-2222-3333-444444444444",
            }
            for i, name in enumerate(names)
        ],
    }


def test_torch_is_the_source_when_no_vendor_tool_exists():
    report, _ = run(torch_info=torch_cuda(2), env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert report["accelerator"] == "cuda"
    assert report["gpu_vendor"] == "nvidia"
    assert [g["source"] for g in report["gpus"]] == ["torch", "torch"]
    assert [g["physical_index"] for g in report["gpus"]] == [2, 3]
    assert report["gpus"][0]["compute_capability"] == "8.0"
    assert report["gpus"][0]["uuid"].startswith("GPU-")
    assert report["errors"] == []


def test_torch_rocm_build_reports_gfx_target():
    info = {
        "torch": "2.4.0+rocm6.1",
        "cuda": None,
        "hip": "6.1.40091",
        "devices": [
            {
                "name": "AMD Instinct MI300X",
                "total_memory": 1,
                "major": 9,
                "minor": 4,
                "gcn_arch": "gfx942:sramecc+:xnack-",
            }
        ],
    }
    report, _ = run(torch_info=info)
    assert report["accelerator"] == "rocm"
    (gpu,) = report["gpus"]
    assert (gpu["vendor"], gpu["gfx_target"], gpu["compute_capability"]) == ("amd", "gfx942", None)


def test_torch_count_mismatch_is_reported():
    report, _ = run(NVIDIA_4, torch_info=torch_cuda(2))
    assert any("torch sees 2" in e for e in errors_of(report, "torch"))
    assert report["versions"]["torch"] in ("2.3.1+cu121", report["versions"]["torch"])


def test_torch_agreeing_with_the_tools_is_silent():
    names = ["NVIDIA A100 80GB PCIe"] * 2 + ["NVIDIA RTX A6000"] * 2
    report, _ = run(
        NVIDIA_4, torch_info=torch_cuda(4, names), env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    )
    assert report["errors"] == []
    assert report["notes"] == []


def test_torch_order_differing_from_nvidia_smi_is_noted():
    names = ["NVIDIA RTX A6000"] * 2 + ["NVIDIA A100 80GB PCIe"] * 2
    report, _ = run(NVIDIA_4, torch_info=torch_cuda(4, names))
    assert any("device order differs" in n for n in report["notes"])


def test_cuda_torch_on_an_amd_machine_is_an_error():
    report, _ = run(AMD_2, torch_info=torch_cuda(0))
    assert report["accelerator"] == "cuda"
    assert report["gpu_vendor"] == "amd"
    assert any("CUDA" in e.upper() and "amd" in e for e in errors_of(report, "torch"))


def test_torch_probe_error_is_reported():
    info = {
        "torch": "2.3.1",
        "cuda": "12.1",
        "hip": None,
        "devices": [],
        "error": "torch.cuda failed: RuntimeError: boom",
    }
    report, _ = run(torch_info=info)
    assert errors_of(report, "torch") == ["torch.cuda failed: RuntimeError: boom"]


def test_clinfo_is_the_last_resort_for_other_gpus():
    table = {
        "clinfo --json": (1, "", "clinfo: unknown option --json"),
        "clinfo": fixture("clinfo-intel-arc.txt"),
    }
    report, runner = run(table)
    (gpu,) = report["gpus"]
    assert report["gpu_vendor"] == "other"
    assert (gpu["vendor"], gpu["source"], gpu["name"]) == (
        "other",
        "clinfo",
        "Intel(R) Arc(TM) A770 Graphics",
    )
    assert gpu["pci_bus_id"] == "0000:03:00.0"
    assert report["errors"] == []


def test_clinfo_json_names_the_vendor_and_skips_cpus():
    report, runner = run({"clinfo --json": fixture("clinfo-json-2dev.json")})
    (gpu,) = report["gpus"]
    assert (gpu["vendor"], gpu["name"]) == ("nvidia", "NVIDIA GeForce RTX 3060")
    assert runner.calls.count("clinfo") == 0


def test_clinfo_not_run_when_a_vendor_tool_found_gpus():
    report, runner = run(dict(NVIDIA_4, clinfo=fixture("clinfo-intel-arc.txt")))
    assert not runner.ran("clinfo")


# ---------------------------------------------------------------- robustness


def test_runner_that_raises_does_not_break_the_report():
    def boom(argv, timeout, env=None):
        raise RuntimeError("runner exploded")

    report = detect.collect(env={}, runner=boom, torch_info=None)
    assert detect.validate_report(report) == []
    assert any("runner exploded" in e["error"] for e in report["errors"])


def test_timed_out_tool_is_an_error():
    timed_out = detect.ToolResult(["nvidia-smi"], timed_out=True, error="timed out after 1 s")
    report, _ = run({"nvidia-smi": timed_out})
    assert errors_of(report, "nvidia-smi") == ["timed out after 1 s"]


def test_invalid_timeout_env_is_reported_and_ignored():
    report, _ = run(env={detect.TIMEOUT_ENV: "soon"})
    assert errors_of(report, detect.TIMEOUT_ENV) == ["ignored invalid value 'soon'"]


def test_validate_report_catches_problems():
    report, _ = run(NVIDIA_4)
    report["gpus"][1]["index"] = 5
    report["gpu_vendor"] = "intel"
    del report["versions"]["torch"]
    problems = detect.validate_report(report)
    assert any("indices" in p for p in problems)
    assert any("gpu_vendor" in p for p in problems)
    assert any("versions.torch" in p for p in problems)


# ---------------------------------------------------------------- real processes


def test_run_tool_returns_output():
    result = detect.run_tool([sys.executable, "-c", "print('hi'); import sys; sys.exit(3)"], 10)
    assert (result.returncode, result.stdout.strip(), result.ok) == (3, "hi", False)


def test_run_tool_missing_tool():
    result = detect.run_tool(["deepfleet-no-such-tool-xyz"], 5, env={"PATH": "/nonexistent"})
    assert result.missing and not result.error


def test_run_tool_kills_a_hanging_tool():
    start = time.monotonic()
    result = detect.run_tool(["sleep", "30"], 1)
    elapsed = time.monotonic() - start
    assert result.timed_out and result.error == "timed out after 1 s"
    assert elapsed < 5


def test_run_tool_kills_grandchildren_holding_the_pipes():
    # A wrapper that backgrounds a child keeps stdout open after the wrapper is killed.
    start = time.monotonic()
    result = detect.run_tool(["sh", "-c", "sleep 30 & sleep 30"], 1)
    assert result.timed_out
    assert time.monotonic() - start < 6


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    """Shell scripts standing in for the vendor tools, alone on PATH: a CI machine's real
    tools (or its /opt/rocm/bin) must not answer instead."""
    monkeypatch.setattr(detect, "EXTRA_TOOL_DIRS", ())
    tools = {name: shutil.which(name) for name in ("sleep", "cat")}

    def make(scripts):
        for name, body in scripts.items():
            path = tmp_path / name
            path.write_text("#!/bin/sh\n" + body.format(**tools) + "\n")
            path.chmod(0o755)
        return {"PATH": str(tmp_path)}

    return make


def test_collect_with_a_hanging_and_a_crashing_tool(fake_tools):
    env = fake_tools(
        {
            "nvidia-smi": "{sleep} 30",
            "rocminfo": "kill -SEGV $$",
            "rocm-smi": "echo 'this is not json'; exit 0",
        },
    )
    start = time.monotonic()
    report = detect.collect(env=env, torch_info=None, timeout=1)
    assert time.monotonic() - start < 15
    assert detect.validate_report(report) == []
    tools = {e["tool"]: e["error"] for e in report["errors"]}
    assert tools["nvidia-smi"] == "timed out after 1 s"
    assert len([e for e in report["errors"] if e["tool"] == "nvidia-smi"]) == 1
    assert "rocminfo" in tools and "rocm-smi" in tools
    assert report["gpus"] == []


def test_collect_through_real_processes_reads_fixture_output(fake_tools):
    csv_path = FIXTURES / "nvidia-smi-query-4gpu-mixed.csv"
    xml_path = FIXTURES / "nvidia-smi-q-x-4gpu-mixed.xml"
    env = fake_tools(
        {
            "nvidia-smi": (
                'case "$1" in\n'
                f'  --query-gpu=*) {{cat}} "{csv_path}" ;;\n'
                f'  -q) {{cat}} "{xml_path}" ;;\n'
                "  *) exit 1 ;;\n"
                "esac"
            )
        },
    )
    env["CUDA_VISIBLE_DEVICES"] = "1"
    report = detect.collect(env=env, torch_info=None, timeout=10)
    assert detect.validate_report(report) == []
    assert [(g["index"], g["physical_index"], g["runtime"]) for g in report["gpus"]] == [
        (0, 1, "12.4")
    ]


def _cli(*args, env_extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(NODE_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "deepfleet_node.detect", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=str(Path(__file__).resolve().parent),
    )


def test_cli_json_on_this_machine():
    proc = _cli("--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert detect.validate_report(report) == []
    assert report["schema"] == 1


def test_cli_human_summary():
    proc = _cli(env_extra={"CUDA_VISIBLE_DEVICES": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "gpus" in proc.stdout and "CUDA_VISIBLE_DEVICES=0" in proc.stdout


def test_cli_bad_arguments_exit_non_zero():
    assert _cli("--bogus").returncode == 2
    assert _cli("--timeout", "-1").returncode == 2
    assert detect.main(["--bogus"]) == 2


def test_main_prints_json(capsys, monkeypatch):
    monkeypatch.setattr(detect, "collect", lambda timeout=None: detect.minimal_report("stub"))
    assert detect.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == [{"tool": "detect", "error": "stub"}]


def test_main_survives_collect_crashing(capsys, monkeypatch):
    def crash(timeout=None):
        raise KeyError("bug")

    monkeypatch.setattr(detect, "collect", crash)
    assert detect.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert detect.validate_report(report) == []
    assert "KeyError" in report["errors"][0]["error"]


# ---------------------------------------------------------------- torch probe and accelerator

FAKE_TORCH = """
__version__ = "2.5.1+cu124"
class version:
    cuda = "12.4"
    hip = None
class _Props:
    def __init__(self, i):
        self.name = "NVIDIA L40S"
        self.total_memory = 48 * 1024**3
        self.major, self.minor = 8, 9
        self.uuid = "1234abcd-0000-0000-0000-00000000000%d" % i
        self.pci_bus_id, self.pci_device_id, self.pci_domain_id = 0x41 + i, 0, 0
class cuda:
    @staticmethod
    def device_count():
        return 2
    @staticmethod
    def get_device_properties(i):
        return _Props(i)
"""


def _fake_torch(tmp_path, body):
    package = tmp_path / "torch"
    package.mkdir()
    (package / "__init__.py").write_text(body)
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)}


def test_torch_probe_runs_in_a_child_process(tmp_path, monkeypatch):
    env = _fake_torch(tmp_path, FAKE_TORCH)
    monkeypatch.setattr(detect.importlib.util, "find_spec", lambda name: object())
    ctx = detect._Ctx(runner=detect.run_tool, timeout=30, env=env)
    info = detect._probe_torch(ctx, 30)
    assert ctx.errors == []
    assert (info["torch"], info["cuda"], info["hip"]) == ("2.5.1+cu124", "12.4", None)
    assert [d["pci"] for d in info["devices"]] == ["0000:41:00.0", "0000:42:00.0"]
    gpus = detect._torch_gpus(info, {})
    assert [g["compute_capability"] for g in gpus] == ["8.9", "8.9"]
    assert gpus[1]["uuid"] == "GPU-1234abcd-0000-0000-0000-000000000001"


def test_torch_probe_that_hangs_is_cut_off(tmp_path, monkeypatch):
    env = _fake_torch(tmp_path, "import time\ntime.sleep(60)\n")
    monkeypatch.setattr(detect.importlib.util, "find_spec", lambda name: object())
    ctx = detect._Ctx(runner=detect.run_tool, timeout=1, env=env)
    start = time.monotonic()
    assert detect._probe_torch(ctx, 1) is None
    assert time.monotonic() - start < 6
    assert ctx.errors == [{"tool": "torch", "error": "timed out after 1 s"}]


def test_torch_probe_import_error_is_reported(tmp_path, monkeypatch):
    env = _fake_torch(tmp_path, "raise OSError('libcudart.so.12: cannot open shared object')\n")
    monkeypatch.setattr(detect.importlib.util, "find_spec", lambda name: object())
    ctx = detect._Ctx(runner=detect.run_tool, timeout=30, env=env)
    info = detect._probe_torch(ctx, 30)
    assert info["torch"] is None and "libcudart" in info["error"]
    report, _ = run(torch_info=info)
    assert any("libcudart" in e for e in errors_of(report, "torch"))


@pytest.mark.parametrize(
    ("info", "version", "requires", "expected"),
    [
        ({"torch": "2.3", "cuda": "12.1", "hip": None}, "2.3", [], "cuda"),
        ({"torch": "2.3", "cuda": None, "hip": "6.0.1"}, "2.3", [], "rocm"),
        ({"torch": "2.3", "cuda": None, "hip": None}, "2.3", [], "cpu"),
        ({"torch": "2.3", "cuda": None, "hip": None, "xpu": True}, "2.3", [], "other"),
        (None, None, [], "cpu"),
        (None, "2.3.0+rocm6.0", [], "rocm"),
        (None, "2.3.0+cu121", [], "cuda"),
        (None, "2.3.0+cpu", [], "cpu"),
        (None, "2.3.0", ['nvidia-cuda-runtime-cu12==12.1.105; platform_system == "Linux"'], "cuda"),
        (None, "2.3.0", ["pytorch-triton-rocm==2.3.0"], "rocm"),
        (None, "2.3.0", ["filelock"], "other"),
    ],
)
def test_accelerator(info, version, requires, expected):
    assert detect._accelerator(info, version, requires) == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, [0, 1]),
        ({"ROCR_VISIBLE_DEVICES": "2,3"}, [2, 3]),
        ({"ROCR_VISIBLE_DEVICES": "2,3", "HIP_VISIBLE_DEVICES": "1,0"}, [3, 2]),
        ({"ROCR_VISIBLE_DEVICES": "GPU-abc", "HIP_VISIBLE_DEVICES": "0,1"}, [None, None]),
        ({"CUDA_VISIBLE_DEVICES": "5,6"}, [5, 6]),
    ],
)
def test_torch_rocm_physical_indices(env, expected):
    info = {
        "torch": "2.4",
        "hip": "6.1",
        "cuda": None,
        "devices": [{"name": "gfx"}, {"name": "gfx"}],
    }
    assert [g["physical_index"] for g in detect._torch_gpus(info, env)] == expected


def test_duplicate_rocminfo_bdfs_do_not_invent_pci_ids():
    # MI300A-class machines put each APU at 01:00.0 on its own PCI domain, which rocminfo's
    # BDFID cannot express.
    text = fixture("rocminfo-2gpu-mi210.txt").replace(
        "BDFID:                   49664", "BDFID:                   49408"
    )
    report, _ = run({"rocminfo": text})
    assert [g["pci_bus_id"] for g in report["gpus"]] == [None, None]
    report, _ = run({"rocminfo": fixture("rocminfo-2gpu-mi210.txt")})
    assert [g["pci_bus_id"] for g in report["gpus"]] == ["0000:c1:00.0", "0000:c2:00.0"]


def test_a_tool_that_hung_is_not_asked_again():
    hung = detect.ToolResult(["amd-smi"], timed_out=True, error="timed out after 10 s")
    table = {"rocminfo": fixture("rocminfo-2gpu-mi210.txt"), "amd-smi": hung}
    report, runner = run(table, read_text=no_rocm_version_file)
    assert len(runner.ran("amd-smi")) == 1  # 'amd-smi version' was skipped
    assert errors_of(report, "amd-smi") == ["timed out after 10 s"]
    assert len(report["gpus"]) == 2


def test_integrated_gpu_beside_a_discrete_one_is_noted():
    apu = fixture("rocminfo-apu-npu.txt")
    discrete = fixture("rocminfo-2gpu-mi210.txt")
    # Splice the APU's agent block into the discrete machine's listing.
    start = apu.index("*******\nAgent 2")
    end = apu.index("*******\nAgent 3")
    text = discrete.replace(
        "*** Done ***", apu[start:end].replace("Agent 2", "Agent 4") + "*** Done ***"
    )
    report, _ = run({"rocminfo": text})
    assert [g["gfx_target"] for g in report["gpus"]] == ["gfx90a", "gfx90a", "gfx1150"]
    assert any("integrated" in n and "2" in n for n in report["notes"])
    report, _ = run({"rocminfo": apu})
    assert report["notes"] == []


# ---------------------------------------------------------------- cgroup limits

GiB = 1024**3
V1_NONE = "9223372036854771712"  # what cgroup v1 writes for no limit


def cgroup_fs(files):
    """read_text over a fake filesystem: path -> text; anything else is absent."""
    return lambda path: files.get(path)


def v2(path, levels):
    """A v2 container at `path` whose visible levels carry {dir suffix: (memory.max, cpu.max)}."""
    files = {"/proc/self/cgroup": f"0::{path}\n", "/sys/fs/cgroup/cgroup.controllers": "cpu memory"}
    for suffix, (memory, cpu) in levels.items():
        base = "/sys/fs/cgroup" + suffix
        if memory is not None:
            files[f"{base}/memory.max"] = memory + "\n"
        if cpu is not None:
            files[f"{base}/cpu.max"] = cpu + "\n"
    return cgroup_fs(files)


def test_cgroup_no_limits():
    read = v2("/", {"": ("max", "max 100000")})
    assert detect.cgroup_limits(read) == {"memory_limit_bytes": None, "cpu_quota": None}
    # nothing readable at all (no /proc, no cgroup fs)
    assert detect.cgroup_limits(cgroup_fs({})) == {"memory_limit_bytes": None, "cpu_quota": None}


def test_cgroup_own_level_limit():
    # a private cgroup namespace: /proc/self/cgroup says "/", the mount is the own level
    read = v2("/", {"": (str(2 * GiB), "50000 100000")})
    assert detect.cgroup_limits(read) == {"memory_limit_bytes": 2 * GiB, "cpu_quota": 0.5}


def test_cgroup_ancestor_limit_smaller_than_own_wins():
    # the host's cgroup namespace: the container's level and its machine's parent are visible
    read = v2(
        "/deepfleet-lab-3/abc123",
        {
            "/deepfleet-lab-3/abc123": (str(4 * GiB), "max 100000"),
            "/deepfleet-lab-3": (str(2 * GiB), "max 100000"),
            "": (None, None),  # the root cgroup has no memory.max / cpu.max
        },
    )
    assert detect.cgroup_limits(read)["memory_limit_bytes"] == 2 * GiB


def test_cgroup_cpu_quota_on_an_ancestor():
    read = v2(
        "/deepfleet-lab-3/abc123",
        {
            "/deepfleet-lab-3/abc123": ("max", "max 100000"),
            "/deepfleet-lab-3": ("max", "30000 100000"),
        },
    )
    assert detect.cgroup_limits(read) == {"memory_limit_bytes": None, "cpu_quota": 0.3}
    # and the smaller of two quotas on the way up
    read = v2("/a/b", {"/a/b": ("max", "150000 100000"), "/a": ("max", "250000 100000")})
    assert detect.cgroup_limits(read)["cpu_quota"] == 1.5


def test_cgroup_path_outside_the_namespace_reads_the_own_level_only():
    read = v2("/../../other/x", {"": (str(GiB), "max 100000"), "/other/x": ("1", "1000 100000")})
    assert detect.cgroup_limits(read) == {"memory_limit_bytes": GiB, "cpu_quota": None}


def test_cgroup_v1_own_level():
    # v1, own-level mounts (the container's path does not exist inside them)
    files = {
        "/proc/self/cgroup": (
            "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
        ),
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{3 * GiB}\n",
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "150000\n",
        "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
    }
    assert detect.cgroup_limits(cgroup_fs(files)) == {
        "memory_limit_bytes": 3 * GiB,
        "cpu_quota": 1.5,
    }
    files["/sys/fs/cgroup/memory/memory.limit_in_bytes"] = V1_NONE
    files["/sys/fs/cgroup/cpu/cpu.cfs_quota_us"] = "-1"
    assert detect.cgroup_limits(cgroup_fs(files)) == {"memory_limit_bytes": None, "cpu_quota": None}


def test_cgroup_v1_machine_limit_from_memory_stat_and_the_cpu_hierarchy():
    # v1 lab machine: the parent's memory limit shows in memory.stat's hierarchical limit;
    # its cpu quota where the whole cpu hierarchy is mounted (docker/lab.py does so)
    files = {
        "/proc/self/cgroup": "4:memory:/deepfleet-lab-2/abc\n1:cpu:/deepfleet-lab-2/abc\n",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": V1_NONE,
        "/sys/fs/cgroup/memory/memory.stat": (
            f"cache 0\nhierarchical_memory_limit {3 * GiB}\nhierarchical_memsw_limit {GiB}\n"
        ),
        "/sys/fs/cgroup/cpu/deepfleet-lab-2/abc/cpu.cfs_quota_us": "-1",
        "/sys/fs/cgroup/cpu/deepfleet-lab-2/abc/cpu.cfs_period_us": "100000",
        "/sys/fs/cgroup/cpu/deepfleet-lab-2/cpu.cfs_quota_us": "50000",
        "/sys/fs/cgroup/cpu/deepfleet-lab-2/cpu.cfs_period_us": "100000",
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1",
        "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000",
    }
    assert detect.cgroup_limits(cgroup_fs(files)) == {
        "memory_limit_bytes": 3 * GiB,
        "cpu_quota": 0.5,
    }


def test_cgroup_garbage_values_are_no_limit():
    for memory, cpu in [
        ("lots", "fast 100000"),
        ("-5", "30000 0"),
        ("0", "-1 100000"),
        ("", "30000"),
        ("1.5e9", "30000 100000 7"),
    ]:
        read = v2("/x", {"/x": (memory, cpu), "": ("max", "max 100000")})
        assert detect.cgroup_limits(read) == {"memory_limit_bytes": None, "cpu_quota": None}
    garbage = cgroup_fs({"/proc/self/cgroup": "not a cgroup line\n::\n"})
    assert detect.cgroup_limits(garbage) == {"memory_limit_bytes": None, "cpu_quota": None}


def test_report_carries_the_limits_and_cpu_count_follows_the_quota():
    files = {
        "/proc/self/cgroup": "0::/deepfleet-lab-3/abc\n",
        "/proc/meminfo": "MemTotal:       16384000 kB\n",
        "/sys/fs/cgroup/cgroup.controllers": "cpu memory",
        "/sys/fs/cgroup/deepfleet-lab-3/memory.max": f"{2 * GiB}\n",
        "/sys/fs/cgroup/deepfleet-lab-3/cpu.max": "30000 100000\n",
    }
    report, _ = run(read_text=cgroup_fs(files))
    assert report["memory_limit_bytes"] == 2 * GiB and report["cpu_quota"] == 0.3
    assert report["cpu_count"] == 1  # min(affinity, ceil(0.3))
    summary = detect.format_summary(report)
    assert "1 cores (quota 0.30 cores)" in summary and "memory (limit 2.0 GiB)" in summary
    report, _ = run(read_text=cgroup_fs({}))
    assert report["memory_limit_bytes"] is None and report["cpu_quota"] is None
    assert "quota" not in detect.format_summary(report)
    assert "limit" not in detect.format_summary(report)


def test_validate_report_limits():
    report = detect.minimal_report("x")
    assert detect.validate_report(report) == []
    del report["memory_limit_bytes"], report["cpu_quota"]  # a report from an older image
    assert detect.validate_report(report) == []
    report.update(memory_limit_bytes="2g", cpu_quota=0)
    assert {"memory_limit_bytes", "cpu_quota"} <= set(detect.validate_report(report))
    report.update(memory_limit_bytes=True, cpu_quota=0.3)
    assert detect.validate_report(report) == ["memory_limit_bytes"]
