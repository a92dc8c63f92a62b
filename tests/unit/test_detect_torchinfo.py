"""torch: the probe in a child process, the GPUs it reports when no vendor tool does, the
accelerator its build names, and its cross-check against the vendor tools."""

import os
import time

import pytest
from detectdata import AMD_2, NVIDIA_4, MiB, detect, errors_of, run

from deepfleet_node.detect import torchinfo
from deepfleet_node.detect.runner import _Ctx


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


# ---------------------------------------------------------------- the probe in a child process


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
    monkeypatch.setattr(torchinfo.importlib.util, "find_spec", lambda name: object())
    ctx = _Ctx(runner=detect.run_tool, timeout=30, env=env)
    info = torchinfo._probe_torch(ctx, 30)
    assert ctx.errors == []
    assert (info["torch"], info["cuda"], info["hip"]) == ("2.5.1+cu124", "12.4", None)
    assert [d["pci"] for d in info["devices"]] == ["0000:41:00.0", "0000:42:00.0"]
    gpus = torchinfo._torch_gpus(info, {})
    assert [g["compute_capability"] for g in gpus] == ["8.9", "8.9"]
    assert gpus[1]["uuid"] == "GPU-1234abcd-0000-0000-0000-000000000001"


def test_torch_probe_that_hangs_is_cut_off(tmp_path, monkeypatch):
    env = _fake_torch(tmp_path, "import time\ntime.sleep(60)\n")
    monkeypatch.setattr(torchinfo.importlib.util, "find_spec", lambda name: object())
    ctx = _Ctx(runner=detect.run_tool, timeout=1, env=env)
    start = time.monotonic()
    assert torchinfo._probe_torch(ctx, 1) is None
    assert time.monotonic() - start < 6
    assert ctx.errors == [{"tool": "torch", "error": "timed out after 1 s"}]


def test_torch_probe_import_error_is_reported(tmp_path, monkeypatch):
    env = _fake_torch(tmp_path, "raise OSError('libcudart.so.12: cannot open shared object')\n")
    monkeypatch.setattr(torchinfo.importlib.util, "find_spec", lambda name: object())
    ctx = _Ctx(runner=detect.run_tool, timeout=30, env=env)
    info = torchinfo._probe_torch(ctx, 30)
    assert info["torch"] is None and "libcudart" in info["error"]
    report, _ = run(torch_info=info)
    assert any("libcudart" in e for e in errors_of(report, "torch"))


# ---------------------------------------------------------------- accelerator and physical indices


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
    assert torchinfo._accelerator(info, version, requires) == expected


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
    assert [g["physical_index"] for g in torchinfo._torch_gpus(info, env)] == expected
