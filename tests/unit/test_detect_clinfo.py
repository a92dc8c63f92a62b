"""OpenCL's clinfo: its parser on the project's own fixtures and on outputs recorded on real
machines (../shared/gpu-tool-outputs/other, read in place; each such test skips where its
recording is absent), and clinfo as the collector of last resort."""

import pytest
from detectdata import NVIDIA_4, collect, detect, fixture, run
from unitdata import recorded

# ---------------------------------------------------------------- parser, own fixtures


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


# ---------------------------------------------------------------- recorded


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


# ---------------------------------------------------------------- collection


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
