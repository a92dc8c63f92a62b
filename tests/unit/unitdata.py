"""Shared unit-test data; its own module because conftest names clash across folders."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "images" / "node"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: sharedata

import sharedata  # noqa: E402

from deepfleet_node import detect  # noqa: E402

# Real GPU tools' outputs recorded on real machines, read in place (../shared). Absent, a
# test that reads them skips locally and fails under CI: see tests/sharedata.py.
RECORDED_DIR = sharedata.GPU_TOOL_OUTPUTS
RECORDED = sharedata.shared_dir() / RECORDED_DIR


def recorded(relative: str) -> str:
    """The text of one recording (``nvidia/...``, ``amd/...``, ``other/...``)."""
    return sharedata.read(f"{RECORDED_DIR}/{relative}")


class Runner:
    """Gives one canned answer per command prefix; anything else is a missing tool."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, argv, timeout, env=None):
        line = " ".join(argv)
        self.calls.append(line)
        for prefix in sorted(self.table, key=len, reverse=True):
            if line.startswith(prefix):
                rc, out = self.table[prefix]
                return detect.ToolResult(list(argv), rc, out, "")
        return detect.ToolResult(list(argv), missing=True)


def detect_report(**over) -> dict:
    """A detect --json report as a CPU node in the image prints it."""
    report = {
        "schema": 1,
        "hostname": "lab1",
        "ips": ["172.19.0.2"],
        "cpu_count": 8,
        "memory_bytes": 16 << 30,
        "accelerator": "cpu",
        "gpu_vendor": "none",
        "gpus": [],
        "versions": {
            "python": "3.11.2",
            "torch": "2.13.0+cpu",
            "deepspeed": "0.19.8",
            "transformers": "5.23.0",
        },
        "errors": [],
    }
    report.update(over)
    return report


def inv(*names):
    """An inventory of nodes at 10.0.0.1, 10.0.0.2, ... in the order named."""
    from deepfleet.inventory.nodes import Inventory, NodeSpec

    nodes = tuple(
        NodeSpec(n, f"10.0.0.{i + 1}", "root", 22, None, "/dev/null") for i, n in enumerate(names)
    )
    return Inventory(nodes, None)


def rep(**over):
    """detect_report(**over) parsed as the orchestrator sees it."""
    import json

    from deepfleet.planning import reports

    return reports.parse(json.dumps(detect_report(**over)))


def two_node_plan():
    """lab1 (10.0.0.2, the master, 1 slot) and lab2 (10.0.0.3, 2 slots), on CPU."""
    from deepfleet.planning.plan import ClusterPlan, PlannedNode

    nodes = (
        PlannedNode("lab1", "10.0.0.2", 1, "cpu", 0),
        PlannedNode("lab2", "10.0.0.3", 2, "cpu", 0),
    )
    return ClusterPlan(nodes=nodes, master_addr="10.0.0.2", master_port=29500, backend="gloo")
