"""AMD: rocminfo, amd-smi and rocm-smi parsers on the project's own fixtures and on outputs
recorded on real machines (../shared/gpu-tool-outputs/amd, read in place; each such test
skips where its recording is absent), and the collector that merges the three."""

import pytest
from detectdata import AMD_2, ROCM_SMI, MiB, collect, detect, errors_of, fixture, run
from unitdata import recorded

from deepfleet_node.detect.host import _read_text


def rocm_version_file(path):
    if path == "/opt/rocm/.info/version":
        return "6.2.0-55\n"
    return _read_text(path) if path.startswith("/proc") else None


def no_rocm_version_file(path):
    return _read_text(path) if path.startswith("/proc") else None


# ---------------------------------------------------------------- parsers, own fixtures


@pytest.mark.parametrize(
    ("override", "expected"),
    [("10.3.0", "gfx1030"), ("9.0.10", "gfx90a"), ("11.0.0", "gfx1100"), ("bogus", None)],
)
def test_gfx_from_override(override, expected):
    assert detect.gfx_from_override(override) == expected


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


# ---------------------------------------------------------------- recorded: rocm-smi


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


# ---------------------------------------------------------------- recorded: amd-smi


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


# ---------------------------------------------------------------- recorded: rocminfo


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


# ------------------------------------------------ collection and ROCR/HIP_VISIBLE_DEVICES


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
