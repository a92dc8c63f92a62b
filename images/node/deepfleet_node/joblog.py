"""Each rank's whole output, kept in a log file on its own machine.

The operator shows only deepfleet's own lines; DeepSpeed's and the libraries' chatter
must still be there to read afterwards (`deepfleet logs`). Everything a rank prints
reaches the launcher through file descriptors 1 and 2, C++ code (gloo, NCCL, c10)
included, so those two descriptors are handed to a `tee` that appends to
$DEEPFLEET_LOG_DIR/rank<R>.log and passes every byte on to the launcher as before.

A separate process rather than a thread: a rank killed by a signal or the OOM killer
leaves nothing unwritten (tee sees the end of its pipe and stops), and a rank's own
exit (`exit_after_success`) waits for tee to pass the last lines on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

DIR_ENV = "DEEPFLEET_LOG_DIR"  # set by the operator for each job (deepfleet/joblogs.py)
JOB_ENV = "DEEPFLEET_JOB"
FINISH_WAIT_S = 5.0

_tee: subprocess.Popen | None = None


def active() -> bool:
    """Whether this process's output goes to a job log (started under the operator)."""
    return _tee is not None


def log_path(directory: str, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.log"


def header(job: str, rank: int) -> str:
    """The line each launch starts its part of the file with (a resumed run appends)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"=== {job or 'job'} rank {rank} on {socket.gethostname()} started {when} ===\n"


def start(rank: int | None = None) -> Path | None:
    """Tee this process's stdout and stderr into its log when the operator asked for one."""
    global _tee
    directory = os.environ.get(DIR_ENV)
    if not directory or _tee is not None:
        return None
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    path = log_path(directory, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(header(os.environ.get(JOB_ENV, ""), rank))
    except OSError as exc:  # a full or read-only disk must not stop the job
        print(f"warning: no log file {path}: {exc}", file=sys.stderr, flush=True)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    # -i: Ctrl-C at the launcher must not kill the tee before the rank's last words.
    _tee = subprocess.Popen(["tee", "-a", "-i", str(path)], stdin=subprocess.PIPE, stdout=1)
    os.dup2(_tee.stdin.fileno(), 1)
    os.dup2(_tee.stdin.fileno(), 2)
    _tee.stdin.close()  # fds 1 and 2 hold the pipe now; tee ends when they close
    return path


def finish() -> None:
    """Close this process's end of the pipe and let tee write what is left."""
    global _tee
    if _tee is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        _tee.wait(FINISH_WAIT_S)
    except subprocess.TimeoutExpired:  # a child process still holds the pipe
        pass
    _tee = None
