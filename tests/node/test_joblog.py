"""A rank's output goes to its machine's log file and on to the launcher, all of it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from deepfleet_node import joblog

RANK = textwrap.dedent(
    """
    import os, signal, sys
    from deepfleet_node import joblog
    from deepfleet_node._log import exit_after_success
    joblog.start()
    print("python stdout line", flush=True)
    print("python stderr line", file=sys.stderr, flush=True)
    os.write(1, b"fd 1 line, as C code writes\\n")
    os.write(2, b"fd 2 line\\n")
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif sys.argv[1] == "raise":
        raise RuntimeError("rank failed here")
    exit_after_success()
    """
)
LINES = ("python stdout line", "python stderr line", "fd 1 line, as C code writes", "fd 2 line")


def run_rank(tmp_path, how: str, rank: int = 3) -> subprocess.CompletedProcess:
    env = {**os.environ, joblog.DIR_ENV: str(tmp_path / "logs"), joblog.JOB_ENV: "demo",
           "RANK": str(rank)}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", RANK, how], env=env, capture_output=True, text=True, timeout=60
    )


def test_every_line_reaches_both_the_file_and_the_launcher(tmp_path):
    proc = run_rank(tmp_path, "exit")
    assert proc.returncode == 0
    log = (tmp_path / "logs" / "rank3.log").read_text()
    assert log.startswith("=== demo rank 3 on ")
    for line in LINES:
        assert line in log and line in proc.stdout  # stderr joins stdout, as the launcher reads it


def test_a_killed_rank_loses_nothing_it_printed(tmp_path):
    proc = run_rank(tmp_path, "kill")
    assert proc.returncode == -9
    log = (tmp_path / "logs" / "rank3.log").read_text()
    assert all(line in log for line in LINES)


def test_a_traceback_is_kept_and_a_second_launch_appends(tmp_path):
    run_rank(tmp_path, "exit")
    proc = run_rank(tmp_path, "raise")
    assert proc.returncode == 1
    log = (tmp_path / "logs" / "rank3.log").read_text()
    assert log.count("=== demo rank 3") == 2
    assert "RuntimeError: rank failed here" in log and "RuntimeError" in proc.stdout


def test_no_log_dir_changes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != joblog.DIR_ENV}
    code = "from deepfleet_node import joblog; print(joblog.start())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "None"
