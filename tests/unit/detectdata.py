"""Shared by the detect tests: the project's own small fixtures, a runner that answers from
a table, the tool tables several families' tests use, and the recorded-output helper."""

import json
from pathlib import Path

from unitdata import Runner, detect

NODE_DIR = Path(__file__).resolve().parents[2] / "images" / "node"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "detect"
MiB = 1024**2
NVIDIA_QUERY = "nvidia-smi --query-gpu="
ROCM_SMI = "rocm-smi --showproductname"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


class FakeRunner:
    """Answers commands from a table keyed by command-line prefix; anything else is a
    missing tool. Values: stdout text, (returncode, stdout[, stderr]), a ToolResult, or a
    callable taking argv."""

    def __init__(self, table=None):
        self.table = table or {}
        self.calls = []
        self.envs = []

    def __call__(self, argv, timeout, env=None):
        self.calls.append(" ".join(argv))
        self.envs.append(env)
        line = " ".join(argv)
        for prefix in sorted(self.table, key=len, reverse=True):
            if line.startswith(prefix):
                answer = self.table[prefix]
                if callable(answer):
                    answer = answer(argv)
                if isinstance(answer, detect.ToolResult):
                    return answer
                if isinstance(answer, str):
                    return detect.ToolResult(list(argv), 0, answer, "")
                rc, out, *err = answer
                return detect.ToolResult(list(argv), rc, out, err[0] if err else "")
        return detect.ToolResult(list(argv), missing=True)

    def ran(self, prefix):
        return [c for c in self.calls if c.startswith(prefix)]


def run(table=None, env=None, read_text=None, torch_info=None):
    runner = FakeRunner(table)
    kwargs = {"torch_info": torch_info}
    if read_text is not None:
        kwargs["read_text"] = read_text
    report = detect.collect(env=env or {}, runner=runner, **kwargs)
    assert detect.validate_report(report) == []
    json.dumps(report)  # must serialise
    return report, runner


def errors_of(report, tool):
    return [e["error"] for e in report["errors"] if e["tool"] == tool]


NVIDIA_4 = {
    NVIDIA_QUERY: fixture("nvidia-smi-query-4gpu-mixed.csv"),
    "nvidia-smi -q -x": fixture("nvidia-smi-q-x-4gpu-mixed.xml"),
}


NVIDIA_MIG = {
    NVIDIA_QUERY: fixture("nvidia-smi-query-2gpu-mig.csv"),
    "nvidia-smi -q -x": fixture("nvidia-smi-q-x-2gpu-mig.xml"),
    "nvidia-smi -L": fixture("nvidia-smi-L-2gpu-mig.txt"),
}


AMD_2 = {
    "rocminfo": fixture("rocminfo-2gpu-mi210.txt"),
    ROCM_SMI: fixture("rocm-smi-2gpu-rocm6.json"),
    "amd-smi static": fixture("amd-smi-static-2gpu.json"),
}


def collect(table, env=None):
    """The report from recorded outputs (tool prefix -> (returncode, text)), valid."""
    report = detect.collect(env=env or {}, runner=Runner(table), torch_info=None)
    assert detect.validate_report(report) == []
    return report
