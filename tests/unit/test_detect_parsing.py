"""The helpers every detect parser shares: units, PCI ids, the line that names a failure."""

import pytest
from detectdata import MiB, detect


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
