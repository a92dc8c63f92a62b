"""reports.parse: the cgroup limits a node's detect report carries, and memory_room."""

import json

import pytest
from unitdata import detect, detect_report, rep

from deepfleet import reports
from deepfleet.errors import ReportError

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
