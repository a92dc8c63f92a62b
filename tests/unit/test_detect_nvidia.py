"""NVIDIA: nvidia-smi's parsers on the project's own fixtures and on outputs recorded on
real machines (../shared/gpu-tool-outputs/nvidia, read in place; each such test skips
where its recording is absent), and the collector through an injected runner."""

import pytest
from detectdata import (
    NVIDIA_4,
    NVIDIA_MIG,
    NVIDIA_QUERY,
    MiB,
    collect,
    detect,
    errors_of,
    fixture,
    run,
)
from unitdata import recorded

# ---------------------------------------------------------------- parsers, own fixtures


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


# ---------------------------------------------------------------- recorded: --query-gpu


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


# ---------------------------------------------------------------- recorded: -q -x and -L


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


# ---------------------------------------------------- collection and CUDA_VISIBLE_DEVICES


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
