"""detect against real tool outputs recorded on real machines (../shared/gpu-tool-outputs).

The recordings are third-party text and are read in place, never copied into the repo.
Each test skips, with the reason, where that folder is absent.
"""

from pathlib import Path

import pytest
from unitdata import RECORDED, Runner, detect, recorded

MiB = 1024**2

pytestmark = pytest.mark.skipif(
    not RECORDED.is_dir(), reason=f"recorded GPU tool outputs not found at {RECORDED}"
)


def all_recorded() -> list[Path]:
    if not RECORDED.is_dir():
        return []
    return sorted(p for p in RECORDED.rglob("*") if p.is_file() and p.name != "SOURCES.md")


def collect(table, env=None):
    report = detect.collect(env=env or {}, runner=Runner(table), torch_info=None)
    assert detect.validate_report(report) == []
    return report


# ---------------------------------------------------------------- nvidia-smi --query-gpu


def test_csv_mixed_models_with_compute_cap():
    gpus = detect.parse_nvidia_smi_csv(
        recorded("nvidia/query-csv-compute_cap-compute_mode-driver_version-name-index-mixed.txt")
    )
    assert [(g["index"], g["name"], g["compute_capability"]) for g in gpus] == [
        (0, "NVIDIA TITAN V", "7.0"),
        (1, "NVIDIA RTX 5880 Ada Generation", "8.9"),
    ]
    assert {g["driver"] for g in gpus} == {"570.86.15"}


def test_csv_single_column_with_and_without_header():
    (gpu,) = detect.parse_nvidia_smi_csv(recorded("nvidia/query-csv-compute_cap-header.txt"))
    assert gpu["compute_capability"] == "8.9"
    text = recorded("nvidia/query-csv-compute_cap-noheader-4gpu.txt")
    gpus = detect.parse_nvidia_smi_csv(text, ["compute_cap"])
    assert [g["compute_capability"] for g in gpus] == ["8.6"] * 4
    assert [g["index"] for g in gpus] == [0, 1, 2, 3]


def test_csv_full_fieldset_with_units_in_values_and_mig():
    # 212 columns; this driver keeps the unit in the value even though the header has it too.
    (gpu,) = detect.parse_nvidia_smi_csv(
        recorded("nvidia/query-csv-full-fieldset-h100-mig-driver590-masked.txt")
    )
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"
    assert gpu["memory_bytes"] == 81559 * MiB
    assert gpu["compute_capability"] == "9.0"
    assert gpu["mig"] is True
    assert gpu["pci_bus_id"] == "0000:00:09.0"
    assert gpu["driver"] == "590.48.01"


def test_csv_nounits_header_keeps_units_and_na_values():
    (gpu,) = detect.parse_nvidia_smi_csv(
        recorded(
            "nvidia/query-csv-nounits-name-uuid-fan-pstate-memory-util-temp-power-clocks-teslap100.txt"
        )
    )
    assert gpu["name"] == "Tesla P100-PCIE-16GB"
    assert gpu["uuid"] == "GPU-ef1b2c9b-38d8-2090-2bd1-f567a3eb42a6"


def test_old_driver_field_error_triggers_a_retry():
    refusal = recorded("nvidia/error-query-field-compute_cap-not-valid.txt")
    answers = iter([(2, refusal), (0, "index, name, memory.total [MiB]\n0, Tesla T4, 15360\n")])
    calls = []

    def runner(argv, timeout, env=None):
        line = " ".join(argv)
        calls.append(line)
        if line.startswith("nvidia-smi --query-gpu="):
            rc, out = next(answers)
            return detect.ToolResult(list(argv), rc, out, "")
        return detect.ToolResult(list(argv), missing=True)

    report = detect.collect(env={}, runner=runner, torch_info=None)
    assert detect.validate_report(report) == []
    (gpu,) = report["gpus"]
    assert gpu["name"] == "Tesla T4" and gpu["compute_capability"] is None
    queries = [c for c in calls if c.startswith("nvidia-smi --query-gpu=")]
    assert "compute_cap" in queries[0] and "compute_cap" not in queries[1]
    assert report["errors"] == []


# ---------------------------------------------------------------- nvidia-smi -q -x and -L


def test_xml_a100_with_mig_devices():
    parsed = detect.parse_nvidia_smi_xml(
        recorded("nvidia/xml-q-x-a100-sxm4-40gb-mig-driver510.xml")
    )
    assert (parsed["driver_version"], parsed["cuda_version"]) == ("510.47.03", "11.6")
    (gpu,) = parsed["gpus"]
    assert gpu["name"] == "NVIDIA A100-SXM4-40GB"
    assert gpu["memory_bytes"] == 40960 * MiB
    assert gpu["mig"] is True
    assert [(m["index"], m["gpu_instance_id"]) for m in gpu["mig_devices"]] == [(0, 1), (1, 2)]
    assert {m["memory_bytes"] for m in gpu["mig_devices"]} == {19968 * MiB}
    assert gpu["uuid"] == "GPU-27b94a00-ed54-5c24-b1fd-1054085de32a"


def test_xml_p100_without_mig():
    parsed = detect.parse_nvidia_smi_xml(recorded("nvidia/xml-q-x-tesla-p100-driver510.xml"))
    (gpu,) = parsed["gpus"]
    assert gpu["mig"] is False and gpu["mig_devices"] == []
    assert gpu["memory_bytes"] == 16384 * MiB
    assert gpu["pci_bus_id"] == "0000:00:04.0"
    assert gpu["runtime"] == "11.6"


def test_list_dgx_a100_with_mixed_mig_layouts():
    gpus = detect.parse_nvidia_smi_list(
        recorded("nvidia/L-8x-a100-sxm4-40gb-mixed-mig-k8s-pod.txt")
    )
    assert len(gpus) == 8
    assert [len(g["mig_devices"]) for g in gpus] == [0, 0, 0, 0, 7, 3, 2, 4]
    assert [m["profile"] for m in gpus[7]["mig_devices"]] == [
        "3g.20gb",
        "2g.10gb",
        "1g.5gb",
        "1g.5gb",
    ]


def test_mig_device_selected_by_uuid_from_a_recorded_list():
    listing = recorded("nvidia/L-a100-sxm4-80gb-7x-mig-1g10gb-container.txt")
    csv = (
        "index, name, memory.total [MiB], uuid, mig.mode.current\n"
        "0, NVIDIA A100-SXM4-80GB, 81920, GPU-7fdaf0a5-179b-f636-d15d-daf243e3ff16, Enabled\n"
    )
    report = collect(
        {"nvidia-smi --query-gpu=": (0, csv), "nvidia-smi -L": (0, listing)},
        env={"CUDA_VISIBLE_DEVICES": "MIG-50f1c4c9-1508-5e8d-bb06-d08145b22e01"},
    )
    (gpu,) = report["gpus"]
    assert gpu["uuid"] == "MIG-50f1c4c9-1508-5e8d-bb06-d08145b22e01"
    assert gpu["name"] == "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
    assert (gpu["index"], gpu["physical_index"], gpu["mig"]) == (0, 0, True)


@pytest.mark.parametrize(
    "name",
    [
        "L-mixed-titanv-rtx5880ada.txt",
        "L-rtx4070-laptop-single.txt",
    ],
)
def test_list_plain(name):
    gpus = detect.parse_nvidia_smi_list(recorded(f"nvidia/{name}"))
    assert gpus and all(g["uuid"].startswith("GPU-") and not g["mig_devices"] for g in gpus)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "error-driver-library-mismatch.txt",
            "Failed to initialize NVML: Driver/library version mismatch",
        ),
        ("error-nvml-unknown-error-container.txt", "Failed to initialize NVML: Unknown Error"),
        ("error-no-devices-were-found.txt", "No devices were found"),
        ("error-couldnt-communicate-with-driver.txt", "NVIDIA-SMI has failed because it couldn't"),
    ],
)
def test_nvidia_error_outputs(name, expected):
    report = collect({"nvidia-smi": (9, recorded(f"nvidia/{name}"))})
    (entry,) = [e for e in report["errors"] if e["tool"] == "nvidia-smi"]
    assert entry["error"].startswith(expected)
    assert report["gpus"] == []


# ---------------------------------------------------------------- rocm-smi


def test_rocm_smi_json_mi100_6gpu():
    parsed = detect.parse_rocm_smi_json(
        recorded("amd/rocm-smi-json-telegraf-flagset-mi100-6gpu-rocm5.7.1.txt")
    )
    assert parsed["driver"] == "6.2.4"
    gpus = parsed["gpus"]
    assert len(gpus) == 6
    assert {g["name"] for g in gpus} == {"Arcturus GL-XL [Instinct MI100]"}
    assert {g["memory_bytes"] for g in gpus} == {34342961152}
    assert gpus[0]["pci_bus_id"] == "0000:1e:00.0"
    assert len({g["pci_bus_id"] for g in gpus}) == 6
    assert all(g["uuid"] is None for g in gpus)  # 'Unique ID': 'N/A'


def test_rocm_smi_json_mi100_through_collect():
    text = recorded("amd/rocm-smi-json-telegraf-flagset-mi100-6gpu-rocm5.7.1.txt")
    report = collect({"rocm-smi": (0, text)}, env={"HIP_VISIBLE_DEVICES": "4,5"})
    assert [(g["index"], g["physical_index"]) for g in report["gpus"]] == [(0, 4), (1, 5)]
    assert {g["driver"] for g in report["gpus"]} == {"6.2.4"}


def test_rocm_smi_json_no_amd_gpus_specified():
    text = recorded("amd/error-rocm-smi-json-no-amd-gpus-specified.txt")
    assert detect.parse_rocm_smi_json(text) == {"driver": "6.3.6", "gpus": []}
    report = collect({"rocm-smi": (0, text)})
    assert {"tool": "rocm-smi", "error": "WARNING: No AMD GPUs specified"} in report["errors"]


def test_rocm_smi_csv_outputs():
    parsed = detect.parse_rocm_smi_csv(
        recorded("amd/rocm-smi-csv-productname-use-meminfo-rx7900xt.txt")
    )
    (gpu,) = parsed["gpus"]
    assert (gpu["name"], gpu["memory_bytes"], gpu["gfx_target"]) == (
        "Radeon RX 7900 XT",
        21458059264,
        "gfx1100",
    )
    parsed = detect.parse_rocm_smi_csv(recorded("amd/rocm-smi-csv-showproductname-mi100-2gpu.txt"))
    assert [g["name"] for g in parsed["gpus"]] == ["Arcturus GL-XL [AMD Instinct MI100]"] * 2


def test_rocm_smi_text_outputs():
    parsed = detect.parse_rocm_smi_text(
        recorded("amd/rocm-smi-showallinfo-mi300x-4gpu-rocm6.1.txt")
    )
    assert parsed["driver"] == "6.7.0"
    assert [g["pci_bus_id"] for g in parsed["gpus"]] == [
        "0000:26:00.0",
        "0000:46:00.0",
        "0000:65:00.0",
        "0000:85:00.0",
    ]
    assert parsed["gpus"][0]["name"] == "AMD Instinct MI300X OAM"
    assert parsed["gpus"][0]["uuid"] == "GPU-8d1457e2c20f59d2"

    parsed = detect.parse_rocm_smi_text(
        recorded("amd/rocm-smi-showproductname-2x-rx7900xtx-plus-raphael.txt")
    )
    assert [g["gfx_target"] for g in parsed["gpus"]] == ["gfx1100", "gfx1100", "gfx1036"]
    assert [g["node_id"] for g in parsed["gpus"]] == [1, 2, 3]

    parsed = detect.parse_rocm_smi_text(
        recorded("amd/rocm-smi-showproductname-rx7900xtx-unresolved-names.txt")
    )
    assert parsed["gpus"][0]["name"] == "AMD GPU 0x744c"

    parsed = detect.parse_rocm_smi_text(recorded("amd/rocm-smi-showmeminfo-vram-4gb-gpu.txt"))
    assert parsed["gpus"][0]["memory_bytes"] == 4278190080


@pytest.mark.parametrize(
    ("name", "tool", "expected"),
    [
        (
            "error-rocm-smi-driver-not-initialized-docker.txt",
            "rocm-smi",
            "ERROR:root:Driver not initialized",
        ),
        (
            "error-rocm-smi-no-amd-gpus-specified-vm.txt",
            "rocm-smi",
            "WARNING: No AMD GPUs specified",
        ),
        (
            "error-rocminfo-kfd-no-such-file-docker.txt",
            "rocminfo",
            "Unable to open /dev/kfd read-write: No such file",
        ),
        (
            "error-rocminfo-kfd-permission-denied-docker.txt",
            "rocminfo",
            "Unable to open /dev/kfd read-write: Permission denied",
        ),
        (
            "error-rocminfo-out-of-resources.txt",
            "rocminfo",
            "Unable to open /dev/kfd read-write: Cannot allocate memory",
        ),
        ("error-rocminfo-rock-not-loaded-docker.txt", "rocminfo", "ROCk module is NOT loaded"),
    ],
)
def test_amd_container_errors(name, tool, expected):
    text = recorded(f"amd/{name}")
    for rc in (0, 1):  # rocm-smi in particular exits 0 after printing these
        report = collect({tool: (rc, text)})
        (entry,) = [e for e in report["errors"] if e["tool"] == tool]
        assert entry["error"].startswith(expected)
        assert report["gpus"] == [] and report["gpu_vendor"] == "none"


# ---------------------------------------------------------------- amd-smi


def test_amd_smi_static_json_rx6600():
    (gpu,) = detect.parse_amd_smi_static_json(recorded("amd/amd-smi-static-json-rx6600.txt"))
    # amd-smi itself cut the market name short; it is reported as printed.
    assert gpu["name"] == "Navi 23 [Radeon RX 6600/6600 XT"
    assert gpu["memory_bytes"] == 8176 * MiB
    assert gpu["pci_bus_id"] == "0000:0b:00.0"
    assert gpu["driver"] == "7.0.0-3-pve"


def test_amd_smi_static_text_mi300a_apus_on_separate_pci_domains():
    gpus = detect.parse_amd_smi_static_text(recorded("amd/amd-smi-static-mi300a-4apu.txt"))
    assert [g["index"] for g in gpus] == [0, 1, 2, 3]  # the CPU: sections are not GPUs
    assert [g["pci_bus_id"] for g in gpus] == [
        "0000:01:00.0",
        "0001:01:00.0",
        "0002:01:00.0",
        "0003:01:00.0",
    ]
    assert {g["name"] for g in gpus} == {"MI300A"}
    assert {g["memory_bytes"] for g in gpus} == {64289 * MiB}


def test_amd_smi_text_through_collect():
    report = collect({"amd-smi static": (0, recorded("amd/amd-smi-static-mi300a-4apu.txt"))})
    assert [g["source"] for g in report["gpus"]] == ["amd-smi"] * 4
    assert report["gpus"][0]["driver"] == "6.9.0-rc5+"


@pytest.mark.parametrize(
    "name", ["amd-smi-version-rocm6.4.1.txt", "amd-smi-version-rocm6.4.0-inbox-kernel-driver.txt"]
)
def test_amd_smi_version(name):
    fields = detect.parse_amd_smi_version(recorded(f"amd/{name}"))
    assert fields["rocm version"].startswith("6.4.")


# ---------------------------------------------------------------- rocminfo


@pytest.mark.parametrize(
    ("name", "count", "gfx", "marketing"),
    [
        ("rocminfo-gfx906-vega20-8gpu-old-rocm2.x.txt", 8, "gfx906", "Vega 20"),
        ("rocminfo-mi300x-4gpu-gfx942.txt", 4, "gfx942", "AMD Instinct MI300X"),
        ("rocminfo-rx6700xt-gfx1030-override.txt", 1, "gfx1030", "AMD Radeon RX 6700 XT"),
        ("rocminfo-strix-halo-apu-gfx1151-with-npu.txt", 1, "gfx1151", "Radeon 8060S Graphics"),
        ("rocminfo-wsl-rx7800xt-gfx1101.txt", 1, "gfx1101", "AMD Radeon RX 7800 XT"),
    ],
)
def test_rocminfo_gpu_agents(name, count, gfx, marketing):
    parsed = detect.parse_rocminfo(recorded(f"amd/{name}"))
    gpus = detect.rocminfo_gpus(parsed)
    assert len(gpus) == count
    assert {g["gfx_target"] for g in gpus} == {gfx}
    assert {g["name"] for g in gpus} == {marketing}
    assert all(g["memory_bytes"] for g in gpus)


def test_rocminfo_strix_halo_npu_is_not_a_gpu():
    parsed = detect.parse_rocminfo(recorded("amd/rocminfo-strix-halo-apu-gfx1151-with-npu.txt"))
    assert [(a["name"], a["device_type"]) for a in parsed["agents"]] == [
        ("AMD RYZEN AI MAX+ 395 w/ Radeon 8060S", "CPU"),
        ("gfx1151", "GPU"),
        ("aie2", "DSP"),
    ]
    (apu,) = detect.rocminfo_gpus(parsed)
    assert apu["integrated"] is True
    assert apu["uuid"] is None
    assert apu["bdf"] == "c5:00.0"


def test_rocminfo_old_format_with_ansi_colours():
    parsed = detect.parse_rocminfo(recorded("amd/rocminfo-gfx906-vega20-8gpu-old-rocm2.x.txt"))
    assert [a["device_type"] for a in parsed["agents"]] == ["CPU"] * 4 + ["GPU"] * 8
    gpus = detect.rocminfo_gpus(parsed)
    assert gpus[0]["bdf"] == "07:00.0"
    assert len({g["bdf"] for g in gpus}) == 8


def test_rocminfo_override_keeps_the_runtime_view():
    # The RX 6700 XT is a gfx1031 part (chip 0x73df); under HSA_OVERRIDE_GFX_VERSION=10.3.0
    # ROCr reports gfx1030, and that is the target HIP code must be built for.
    text = recorded("amd/rocminfo-rx6700xt-gfx1030-override.txt")
    parsed = detect.parse_rocminfo(text)
    (agent,) = [a for a in parsed["agents"] if a["device_type"] == "GPU"]
    assert agent["chip_id"] == 0x73DF
    report = collect(
        {
            "rocminfo": (0, text),
            "rocm-smi": (0, '{"card0": {"Card Series": "Navi 22", "GFX Version": "gfx1031"}}'),
        },
        env={"HSA_OVERRIDE_GFX_VERSION": "10.3.0"},
    )
    (gpu,) = report["gpus"]
    assert gpu["gfx_target"] == "gfx1030"
    assert gpu["name"] == "AMD Radeon RX 6700 XT"
    assert any("gfx1031" in n for n in report["notes"])


def test_mi300x_rocminfo_and_rocm_smi_merge_by_unique_id():
    report = collect(
        {
            "rocminfo": (0, recorded("amd/rocminfo-mi300x-4gpu-gfx942.txt")),
            # Text fallback: the --json call gets this non-JSON text, so detect asks again.
            "rocm-smi": (0, recorded("amd/rocm-smi-showallinfo-mi300x-4gpu-rocm6.1.txt")),
        },
        env={"ROCR_VISIBLE_DEVICES": "GPU-e8986800e182538a"},
    )
    (gpu,) = report["gpus"]
    assert (gpu["physical_index"], gpu["pci_bus_id"], gpu["gfx_target"]) == (
        2,
        "0000:65:00.0",
        "gfx942",
    )
    assert gpu["driver"] == "6.7.0"


# ---------------------------------------------------------------- clinfo


def test_clinfo_nvidia():
    (device,) = detect.parse_clinfo(recorded("other/clinfo-nvidia-rtx3090.txt"))
    assert (device["name"], device["type"], device["memory_bytes"]) == (
        "NVIDIA GeForce RTX 3090",
        "GPU",
        25422266368,
    )
    assert device["pci_bus_id"] == "0000:0b:00.0"
    assert device["driver"] == "550.67"


def test_clinfo_amd_and_intel_through_collect():
    report = collect({"clinfo": (0, recorded("other/clinfo-amd-rx480-rocm.txt"))})
    (gpu,) = report["gpus"]
    assert (gpu["vendor"], gpu["gfx_target"], gpu["source"]) == ("amd", "gfx803", "clinfo")
    assert gpu["memory_bytes"] == 8 * 1024**3
    report = collect({"clinfo": (0, recorded("other/clinfo-intel-gen9-neo.txt"))})
    (gpu,) = report["gpus"]
    assert (gpu["vendor"], gpu["name"]) == ("other", "Intel(R) Gen9 HD Graphics NEO")
    assert report["gpu_vendor"] == "other"


def test_clinfo_no_platforms():
    assert detect.parse_clinfo(recorded("other/clinfo-no-platforms.txt")) == []
    report = collect({"clinfo": (0, recorded("other/clinfo-no-platforms.txt"))})
    assert report["gpu_vendor"] == "none" and report["errors"] == []


def test_clinfo_list_form():
    devices = detect.parse_clinfo(recorded("other/clinfo-l-nvidia-intel-cpu-windows.txt"))
    assert [(d["platform"], d["name"]) for d in devices] == [
        ("NVIDIA CUDA", "Quadro K620"),
        (
            "Intel(R) CPU Runtime for OpenCL(TM) Applications",
            "Intel(R) Xeon(R) CPU E5-2630 v3 @ 2.40GHz",
        ),
    ]
    devices = detect.parse_clinfo(recorded("other/clinfo-l-clover-amdapp-rx580.txt"))
    assert [d["name"] for d in devices][1] == "Ellesmere"


# ---------------------------------------------------------------- every recording, every parser

PARSERS = [
    detect.parse_nvidia_smi_csv,
    detect.parse_nvidia_smi_xml,
    detect.parse_nvidia_smi_list,
    detect.parse_rocm_smi_json,
    detect.parse_rocm_smi_csv,
    detect.parse_rocm_smi_text,
    detect.parse_amd_smi_static_json,
    detect.parse_amd_smi_static_text,
    detect.parse_amd_smi_version,
    detect.parse_rocminfo,
    detect.parse_clinfo,
    detect.parse_ip_addr_json,
]


@pytest.mark.parametrize("path", all_recorded(), ids=lambda p: str(p.relative_to(RECORDED)))
def test_every_parser_accepts_or_rejects_cleanly(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    for parser in PARSERS:
        try:
            parser(text)
        except ValueError:
            pass  # the documented way to say "not my format"


@pytest.mark.parametrize("path", all_recorded(), ids=lambda p: str(p.relative_to(RECORDED)))
def test_any_recording_as_any_tools_output_gives_a_valid_report(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    for rc in (0, 1):
        table = {
            tool: (rc, text)
            for tool in (
                "nvidia-smi",
                "rocminfo",
                "rocm-smi",
                "amd-smi",
                "clinfo",
                "ip",
                "hostname",
            )
        }
        collect(table)
