"""reports.parse: the cgroup limits a node's detect report carries, memory_room, and a
report that detect itself built surviving the trip through the shared schema."""

import json
from dataclasses import asdict, fields

import pytest
from detectdata import AMD_2, NVIDIA_4, NVIDIA_MIG, FakeRunner
from unitdata import detect, detect_report, recorded, rep

from deepfleet.errors import ReportError
from deepfleet.planning import reports

GiB = 1 << 30


def test_a_report_without_limits_still_parses():
    # reports saved from an image before the limits existed lack both keys
    report = rep()
    assert report.memory_limit_bytes is None and report.cpu_quota is None
    assert report.memory_room == 16 * GiB
    assert rep(memory_limit_bytes=None, cpu_quota=None) == report


def test_limits_are_parsed_and_bound_memory_room():
    report = rep(memory_limit_bytes=2 * GiB, cpu_quota=0.3)
    assert report.memory_limit_bytes == 2 * GiB and report.cpu_quota == 0.3
    assert report.memory_room == 2 * GiB
    assert report.to_dict()["cpu_quota"] == 0.3
    # a limit above the machine's RAM bounds nothing
    assert rep(memory_limit_bytes=64 * GiB).memory_room == 16 * GiB
    # RAM unread (0): the limit is what is known
    assert rep(memory_bytes=0, memory_limit_bytes=3 * GiB).memory_room == 3 * GiB


def test_a_real_detect_report_round_trips():
    raw = detect.minimal_report("x")
    raw.update(memory_bytes=8 * GiB, memory_limit_bytes=4 * GiB, cpu_quota=1.5)
    assert detect.validate_report(raw) == []
    report = reports.parse(json.dumps(raw), "lab2")
    assert (report.memory_room, report.cpu_quota) == (4 * GiB, 1.5)


@pytest.mark.parametrize(
    "over", [{"memory_limit_bytes": "lots"}, {"cpu_quota": -1}, {"memory_limit_bytes": True}]
)
def test_bad_limits_are_a_report_error(over):
    with pytest.raises(ReportError, match=f"bad field: {next(iter(over))} .* not a positive") as e:
        reports.parse(json.dumps(detect_report(**over)), "lab3")
    assert e.value.node == "lab3"


def real_report(table, **collect_args):
    """What detect writes for a machine whose tools answer from table."""
    raw = detect.collect(env={}, runner=FakeRunner(table), **collect_args)
    assert detect.validate_report(raw) == []
    return raw


CU124_PROBE = {
    "torch": "2.5.1+cu124",
    "cuda": "12.4",
    "hip": None,
    "error": None,
    "arch_list": ["sm_80", "sm_86", "sm_90"],
    "devices": [{"name": n, "total_memory": 1, "major": 8, "minor": 0} for n in ["A100"] * 4],
}
LIMITED = {
    "/proc/self/cgroup": "0::/lab/x\n",
    "/proc/meminfo": "MemTotal:       16384000 kB\n",
    "/sys/fs/cgroup/cgroup.controllers": "cpu memory",
    "/sys/fs/cgroup/lab/memory.max": f"{2 * GiB}\n",
    "/sys/fs/cgroup/lab/cpu.max": "150000 100000\n",
}


@pytest.mark.parametrize(
    ("table", "collect_args"),
    [
        (NVIDIA_4, {"torch_info": CU124_PROBE}),
        (NVIDIA_MIG, {"torch_info": None}),
        (AMD_2, {"torch_info": None, "read_text": LIMITED.get}),
        ({"rocm-smi": (2, "ERROR:root:Driver not initialized\n")}, {"torch_info": None}),
    ],
    ids=["nvidia-4-with-torch", "nvidia-mig", "amd-2-limited", "broken-amd"],
)
def test_a_collected_report_round_trips(table, collect_args):
    raw = real_report(table, **collect_args)
    report = reports.parse(json.dumps(raw), "lab1")
    assert (report.hostname, report.ips, report.cpu_count, report.memory_bytes) == (
        raw["hostname"],
        tuple(raw["ips"]),
        raw["cpu_count"],
        raw["memory_bytes"],
    )
    assert (report.accelerator, report.gpu_vendor) == (raw["accelerator"], raw["gpu_vendor"])
    assert (report.memory_limit_bytes, report.cpu_quota) == (
        raw["memory_limit_bytes"],
        raw["cpu_quota"],
    )
    assert report.versions == raw["versions"]
    assert report.torch_arch_list == tuple(raw["torch_arch_list"])
    assert report.errors == tuple(f"{e['tool']}: {e['error']}" for e in raw["errors"])
    kept = [f.name for f in fields(reports.GPU)]
    assert [asdict(g) for g in report.gpus] == [{k: g[k] for k in kept} for g in raw["gpus"]]


def test_a_report_from_recorded_outputs_round_trips():
    raw = real_report(
        {
            "rocminfo": (0, recorded("amd/rocminfo-mi300x-4gpu-gfx942.txt")),
            "rocm-smi": (0, recorded("amd/rocm-smi-showallinfo-mi300x-4gpu-rocm6.1.txt")),
        },
        torch_info=None,
    )
    report = reports.parse(json.dumps(raw), "mi300")
    assert [(g.index, g.vendor, g.gfx_target, g.pci_bus_id, g.driver) for g in report.gpus] == [
        (g["index"], "amd", "gfx942", g["pci_bus_id"], "6.7.0") for g in raw["gpus"]
    ]
    assert len(report.gpus) == 4 and report.gpu_summary == "4x AMD Instinct MI300X"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"hostname": None}, "hostname None is not of type 'string'"),
        ({"gpus": [{"vendor": "nvidia"}]}, "gpus[0].index is missing"),
        ({"gpus": [{"index": 0, "vendor": "intel"}]}, "gpus[0].vendor 'intel' is not one of"),
        ({"visible_devices": {"GPU_DEVICE_ORDINAL": "0"}}, "GPU_DEVICE_ORDINAL is not a known"),
        ({"errors": [{"tool": "x", "error": "a\nb"}]}, "errors[0].error 'a\\nb' is not one line"),
    ],
)
def test_a_bad_field_is_named_in_one_line(over, message):
    with pytest.raises(ReportError, match="bad field") as e:
        reports.parse(json.dumps(detect_report(**over)), "lab2")
    assert message in e.value.one_line() and e.value.one_line().startswith("lab2: detect report")
    assert "\n" not in e.value.one_line()


def test_not_a_number_is_not_json():
    text = json.dumps(detect_report(cpu_quota=float("nan")))
    with pytest.raises(ReportError, match="NaN is not a JSON number"):
        reports.parse(text, "lab3")
