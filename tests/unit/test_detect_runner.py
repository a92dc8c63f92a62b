"""run_tool with real processes, and collect through tools that hang, crash or raise."""

import shutil
import sys
import time

import pytest
from detectdata import FIXTURES, detect, errors_of, run

from deepfleet_node.detect import runner as detect_runner


def test_run_tool_returns_output():
    result = detect.run_tool([sys.executable, "-c", "print('hi'); import sys; sys.exit(3)"], 10)
    assert (result.returncode, result.stdout.strip(), result.ok) == (3, "hi", False)


def test_run_tool_missing_tool():
    result = detect.run_tool(["deepfleet-no-such-tool-xyz"], 5, env={"PATH": "/nonexistent"})
    assert result.missing and not result.error


def test_run_tool_kills_a_hanging_tool():
    start = time.monotonic()
    result = detect.run_tool(["sleep", "30"], 1)
    elapsed = time.monotonic() - start
    assert result.timed_out and result.error == "timed out after 1 s"
    assert elapsed < 5


def test_run_tool_kills_grandchildren_holding_the_pipes():
    # A wrapper that backgrounds a child keeps stdout open after the wrapper is killed.
    start = time.monotonic()
    result = detect.run_tool(["sh", "-c", "sleep 30 & sleep 30"], 1)
    assert result.timed_out
    assert time.monotonic() - start < 6


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    """Shell scripts standing in for the vendor tools, alone on PATH: a CI machine's real
    tools (or its /opt/rocm/bin) must not answer instead."""
    monkeypatch.setattr(detect_runner, "EXTRA_TOOL_DIRS", ())
    tools = {name: shutil.which(name) for name in ("sleep", "cat")}

    def make(scripts):
        for name, body in scripts.items():
            path = tmp_path / name
            path.write_text("#!/bin/sh\n" + body.format(**tools) + "\n")
            path.chmod(0o755)
        return {"PATH": str(tmp_path)}

    return make


def test_collect_with_a_hanging_and_a_crashing_tool(fake_tools):
    env = fake_tools(
        {
            "nvidia-smi": "{sleep} 30",
            "rocminfo": "kill -SEGV $$",
            "rocm-smi": "echo 'this is not json'; exit 0",
        },
    )
    start = time.monotonic()
    report = detect.collect(env=env, torch_info=None, timeout=1)
    assert time.monotonic() - start < 15
    assert detect.validate_report(report) == []
    tools = {e["tool"]: e["error"] for e in report["errors"]}
    assert tools["nvidia-smi"] == "timed out after 1 s"
    assert len([e for e in report["errors"] if e["tool"] == "nvidia-smi"]) == 1
    assert "rocminfo" in tools and "rocm-smi" in tools
    assert report["gpus"] == []


def test_collect_through_real_processes_reads_fixture_output(fake_tools):
    csv_path = FIXTURES / "nvidia-smi-query-4gpu-mixed.csv"
    xml_path = FIXTURES / "nvidia-smi-q-x-4gpu-mixed.xml"
    env = fake_tools(
        {
            "nvidia-smi": (
                'case "$1" in\n'
                f'  --query-gpu=*) {{cat}} "{csv_path}" ;;\n'
                f'  -q) {{cat}} "{xml_path}" ;;\n'
                "  *) exit 1 ;;\n"
                "esac"
            )
        },
    )
    env["CUDA_VISIBLE_DEVICES"] = "1"
    report = detect.collect(env=env, torch_info=None, timeout=10)
    assert detect.validate_report(report) == []
    assert [(g["index"], g["physical_index"], g["runtime"]) for g in report["gpus"]] == [
        (0, 1, "12.4")
    ]


# ---------------------------------------------------------------- a runner that fails


def test_runner_that_raises_does_not_break_the_report():
    def boom(argv, timeout, env=None):
        raise RuntimeError("runner exploded")

    report = detect.collect(env={}, runner=boom, torch_info=None)
    assert detect.validate_report(report) == []
    assert any("runner exploded" in e["error"] for e in report["errors"])


def test_timed_out_tool_is_an_error():
    timed_out = detect.ToolResult(["nvidia-smi"], timed_out=True, error="timed out after 1 s")
    report, _ = run({"nvidia-smi": timed_out})
    assert errors_of(report, "nvidia-smi") == ["timed out after 1 s"]


def test_invalid_timeout_env_is_reported_and_ignored():
    report, _ = run(env={detect.TIMEOUT_ENV: "soon"})
    assert errors_of(report, detect.TIMEOUT_ENV) == ["ignored invalid value 'soon'"]
