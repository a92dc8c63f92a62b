"""`detect` and `python -m deepfleet_node.detect` on the command line, and main()."""

import json
import os
import subprocess
import sys
from pathlib import Path

from detectdata import NODE_DIR, detect

from deepfleet_node.detect import cli


def _cli(*args, env_extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(NODE_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "deepfleet_node.detect", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=str(Path(__file__).resolve().parent),
    )


def test_cli_json_on_this_machine():
    proc = _cli("--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert detect.validate_report(report) == []
    assert report["schema"] == 1


def test_cli_human_summary():
    proc = _cli(env_extra={"CUDA_VISIBLE_DEVICES": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "gpus" in proc.stdout and "CUDA_VISIBLE_DEVICES=0" in proc.stdout


def test_cli_bad_arguments_exit_non_zero():
    assert _cli("--bogus").returncode == 2
    assert _cli("--timeout", "-1").returncode == 2
    assert detect.main(["--bogus"]) == 2


def test_main_prints_json(capsys, monkeypatch):
    monkeypatch.setattr(cli, "collect", lambda timeout=None: detect.minimal_report("stub"))
    assert detect.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == [{"tool": "detect", "error": "stub"}]


def test_main_survives_collect_crashing(capsys, monkeypatch):
    def crash(timeout=None):
        raise KeyError("bug")

    monkeypatch.setattr(cli, "collect", crash)
    assert detect.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert detect.validate_report(report) == []
    assert "KeyError" in report["errors"][0]["error"]
