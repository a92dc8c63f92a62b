"""GPU samples for `deepfleet status`: recorded outputs of real tools, and our own fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deepfleet_node import gpusample

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: sharedata
import sharedata  # noqa: E402

NVIDIA_CSV = (
    "index, name, memory.used [MiB], memory.total [MiB], utilization.gpu [%]\n"
    "0, NVIDIA H100 80GB HBM3, 40960, 81559, 97\n"
    "1, NVIDIA H100 80GB HBM3, 3, 81559, [N/A]\n"
)


def test_nvidia_query_by_header():
    gpus = gpusample.parse_nvidia(NVIDIA_CSV)
    assert gpus[0] == {
        "index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_used_bytes": 40960 * 2**20,
        "memory_total_bytes": 81559 * 2**20, "utilization_pct": 97.0,
    }  # fmt: skip
    assert gpus[1]["utilization_pct"] is None


def test_a_row_that_does_not_match_its_header_is_an_error():
    with pytest.raises(ValueError, match="row 1"):
        gpusample.parse_nvidia("index, memory.used [MiB]\n0, 1, 2\n")


def _shared(path: str) -> str:
    """A recorded tool output: skipped where ../shared is absent, a failure under CI."""
    return sharedata.read(f"{sharedata.GPU_TOOL_OUTPUTS}/{path}")


def test_recorded_tesla_p100_total_from_used_free_and_reserved():
    text = _shared(
        "nvidia/query-csv-nounits-name-uuid-fan-pstate-memory-util-temp-power-clocks-teslap100.txt"
    )
    (gpu,) = gpusample.parse_nvidia(text)
    assert gpu["name"] == "Tesla P100-PCIE-16GB"
    assert gpu["memory_total_bytes"] == (103 + 0 + 16280) * 2**20  # reserved + used + free
    assert gpu["utilization_pct"] == 0.0


def test_recorded_rocm_smi_json_of_six_mi100():
    gpus = gpusample.parse_rocm(
        _shared("amd/rocm-smi-json-telegraf-flagset-mi100-6gpu-rocm5.7.1.txt")
    )
    assert [g["index"] for g in gpus] == list(range(6))
    assert all(g["memory_total_bytes"] == 34342961152 for g in gpus)
    assert gpus[0]["name"] == "Arcturus GL-XL [Instinct MI100]"


def test_a_machine_without_gpu_tools_samples_nothing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("ROCM_PATH", raising=False)
    monkeypatch.setattr("deepfleet_node.detect.runner.EXTRA_TOOL_DIRS", ())
    assert gpusample.sample() == {"gpus": [], "tool": None, "error": None}


def test_a_failing_tool_is_one_line(tmp_path, monkeypatch):
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'Failed to initialize NVML: Unknown Error' >&2\nexit 255\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    result = gpusample.sample()
    assert result["tool"] == "nvidia-smi" and result["gpus"] == []
    assert "Failed to initialize NVML" in result["error"]
