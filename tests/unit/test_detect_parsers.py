"""detect's pure parsers on the project's own small fixtures (always run)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "images" / "node"))

from deepfleet_node import detect  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "detect"
MiB = 1024**2


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("81559 MiB", "b", 81559 * MiB),
        ("81559", "MiB", 81559 * MiB),
        ({"value": 8176, "unit": "MB"}, "b", 8176 * MiB),
        ("4278190080", "b", 4278190080),
        ("64289 MB", "b", 64289 * MiB),
        ("[N/A]", "MiB", None),
        ("N/A", "MiB", None),
        ("12 parsecs", "b", None),
        (None, "b", None),
    ],
)
def test_to_bytes(value, unit, expected):
    assert detect.to_bytes(value, unit) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("00000000:8D:00.0", "0000:8d:00.0"),
        ("0000:1E:00.0", "0000:1e:00.0"),
        ("0001:01:00.0", "0001:01:00.0"),
        ("65:00.0", "0000:65:00.0"),
        ("[N/A]", None),
        ("weird", "weird"),
    ],
)
def test_normalize_pci(raw, expected):
    assert detect.normalize_pci(raw) == expected


@pytest.mark.parametrize(
    ("override", "expected"),
    [("10.3.0", "gfx1030"), ("9.0.10", "gfx90a"), ("11.0.0", "gfx1100"), ("bogus", None)],
)
def test_gfx_from_override(override, expected):
    assert detect.gfx_from_override(override) == expected


def test_summarize_error_prefers_the_cause_line():
    text = (
        "cat: /sys/module/amdgpu/initstate: No such file or directory\n"
        "ERROR:root:Driver not initialized (amdgpu not found in modules)\n"
    )
    assert detect.summarize_error(text) == (
        "ERROR:root:Driver not initialized (amdgpu not found in modules)"
    )
    assert detect.summarize_error("", 3) == "exited with status 3 and printed nothing"
    assert "\n" not in detect.summarize_error("a\nb\nc")


# ---------------------------------------------------------------- NVIDIA


def test_nvidia_csv_multi_gpu_mixed_models():
    gpus = detect.parse_nvidia_smi_csv(fixture("nvidia-smi-query-4gpu-mixed.csv"))
    assert [g["index"] for g in gpus] == [0, 1, 2, 3]
    assert [g["name"] for g in gpus] == ["NVIDIA A100 80GB PCIe"] * 2 + ["NVIDIA RTX A6000"] * 2
    assert gpus[0]["memory_bytes"] == 81920 * MiB
    assert gpus[2]["compute_capability"] == "8.6"
    assert gpus[2]["pci_bus_id"] == "0000:b1:00.0"
    assert gpus[3]["uuid"] == "GPU-bbbb0000-1111-2222-3333-444444444443"
    assert gpus[0]["driver"] == "550.54.15"
    # '[N/A]' MIG mode (GeForce/RTX parts) reads as MIG off, not as an error.
    assert not any(g["mig"] for g in gpus)


def test_nvidia_csv_without_header_uses_the_field_list():
    text = "0, NVIDIA L4, 23034\n1, NVIDIA L4, 23034\n"
    gpus = detect.parse_nvidia_smi_csv(text, ["index", "name", "memory.total"])
    assert [(g["index"], g["name"], g["memory_bytes"]) for g in gpus] == [
        (0, "NVIDIA L4", 23034 * MiB),
        (1, "NVIDIA L4", 23034 * MiB),
    ]


def test_nvidia_csv_rejects_ragged_rows_and_headerless_text():
    with pytest.raises(ValueError):
        detect.parse_nvidia_smi_csv("index, name\n0, A, extra\n")
    with pytest.raises(ValueError):
        detect.parse_nvidia_smi_csv("0, NVIDIA L4\n")


def test_nvidia_xml_mig_and_cuda_version():
    parsed = detect.parse_nvidia_smi_xml(fixture("nvidia-smi-q-x-2gpu-mig.xml"))
    assert parsed["driver_version"] == "535.129.03"
    assert parsed["cuda_version"] == "12.2"
    first, second = parsed["gpus"]
    assert first["mig"] is True and second["mig"] is False
    assert [m["gpu_instance_id"] for m in first["mig_devices"]] == [1, 2]
    assert first["mig_devices"][0]["memory_bytes"] == 19968 * MiB
    # The GPU's own memory, not its first MIG device's.
    assert first["memory_bytes"] == 40960 * MiB
    assert second["pci_bus_id"] == "0000:0f:00.0"
    assert second["mig_devices"] == []


def test_nvidia_xml_rejects_non_xml():
    with pytest.raises(ValueError):
        detect.parse_nvidia_smi_xml("Failed to initialize NVML: Unknown Error")


def test_nvidia_list_with_mig():
    gpus = detect.parse_nvidia_smi_list(fixture("nvidia-smi-L-2gpu-mig.txt"))
    assert [g["uuid"][-2:] for g in gpus] == ["40", "41"]
    assert [m["profile"] for m in gpus[0]["mig_devices"]] == ["3g.20gb", "3g.20gb"]
    assert gpus[0]["mig_devices"][1]["uuid"] == "MIG-eeee0000-1111-2222-3333-444444444441"
    with pytest.raises(ValueError):
        detect.parse_nvidia_smi_list("No devices were found\n")


# ---------------------------------------------------------------- AMD


def test_rocm_smi_json_rocm6_keys():
    parsed = detect.parse_rocm_smi_json(fixture("rocm-smi-2gpu-rocm6.json"))
    assert parsed["driver"] == "6.7.0"
    first = parsed["gpus"][0]
    assert first["name"] == "AMD Instinct MI210"
    assert first["memory_bytes"] == 68702699520
    assert first["pci_bus_id"] == "0000:c1:00.0"
    assert first["uuid"] == "GPU-1111222233334444"
    assert first["gfx_target"] == "gfx90a"
    assert first["node_id"] == 2


def test_rocm_smi_json_after_a_warning_line():
    parsed = detect.parse_rocm_smi_json(
        'WARNING: No AMD GPUs specified\n{"system": {"Driver version": "6.3.6"}}\n'
    )
    assert parsed == {"driver": "6.3.6", "gpus": []}


def test_rocm_smi_unresolved_name_keeps_the_device_id():
    parsed = detect.parse_rocm_smi_json('{"card0": {"Card series": "0x744c"}}')
    assert parsed["gpus"][0]["name"] == "AMD GPU 0x744c"


def test_amd_smi_static_json_envelope():
    gpus = detect.parse_amd_smi_static_json(fixture("amd-smi-static-2gpu.json"))
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[0]["name"] == "AMD Instinct MI210"
    assert gpus[0]["memory_bytes"] == 65520 * MiB
    assert gpus[1]["pci_bus_id"] == "0000:c2:00.0"
    assert gpus[0]["gfx_target"] == "gfx90a"
    assert gpus[0]["driver"] == "6.8.5"


def test_amd_smi_static_json_skips_cpu_entries():
    text = '[{"cpu": 0, "smu": {}}, {"gpu": 0, "asic": {"market_name": "MI300A"}}]'
    assert [g["name"] for g in detect.parse_amd_smi_static_json(text)] == ["MI300A"]


def test_rocminfo_multi_gpu():
    parsed = detect.parse_rocminfo(fixture("rocminfo-2gpu-mi210.txt"))
    assert parsed["runtime_version"] == "1.14"
    gpus = detect.rocminfo_gpus(parsed)
    assert [g["gfx_target"] for g in gpus] == ["gfx90a", "gfx90a"]
    assert [g["bdf"] for g in gpus] == ["c1:00.0", "c2:00.0"]
    assert gpus[0]["uuid"] == "GPU-1111222233334444"
    assert gpus[0]["memory_bytes"] == 67092480 * 1024
    assert gpus[1]["node_id"] == 3


def test_rocminfo_apu_with_npu_counts_one_gpu():
    parsed = detect.parse_rocminfo(fixture("rocminfo-apu-npu.txt"))
    assert [a["device_type"] for a in parsed["agents"]] == ["CPU", "GPU", "DSP"]
    gpus = detect.rocminfo_gpus(parsed)
    assert len(gpus) == 1
    apu = gpus[0]
    assert apu["name"] == "AMD Radeon 890M Graphics"
    assert apu["gfx_target"] == "gfx1150"
    assert apu["uuid"] is None  # 'GPU-XX': no unique id on APUs
    assert apu["integrated"] is True


def test_rocminfo_failure_text_is_not_agents():
    with pytest.raises(ValueError, match="ROCk module is NOT loaded"):
        detect.parse_rocminfo("ROCk module is NOT loaded, possibly no GPU devices\n")


# ---------------------------------------------------------------- other


def test_clinfo_human_output():
    devices = detect.parse_clinfo(fixture("clinfo-intel-arc.txt"))
    assert devices == [
        {
            "name": "Intel(R) Arc(TM) A770 Graphics",
            "vendor": "Intel(R) Corporation",
            "type": "GPU",
            "memory_bytes": 16225243136,
            "driver": "24.13.29138.7",
            "platform": "Intel(R) OpenCL Graphics",
            "board": None,
            "pci_bus_id": "0000:03:00.0",
        }
    ]


def test_clinfo_json_output():
    devices = detect.parse_clinfo(fixture("clinfo-json-2dev.json"))
    assert [(d["name"], d["type"]) for d in devices] == [
        ("NVIDIA GeForce RTX 3060", "GPU"),
        ("cpu-haswell-AMD Ryzen 9 5950X", "CPU"),
    ]
    assert devices[0]["memory_bytes"] == 12622168064


def test_clinfo_rejects_other_text():
    with pytest.raises(ValueError):
        detect.parse_clinfo("clinfo: error while loading shared libraries: libOpenCL.so.1\n")


def test_ip_addr_json_drops_loopback_and_link_local():
    assert detect.parse_ip_addr_json(fixture("ip-addr.json")) == [
        "192.168.1.20",
        "fd12:3456::20",
        "172.17.0.1",
    ]


def test_meminfo():
    assert detect.parse_meminfo("MemTotal:       16384 kB\nMemFree: 1 kB\n") == 16384 * 1024
    assert detect.parse_meminfo("nothing here") is None
