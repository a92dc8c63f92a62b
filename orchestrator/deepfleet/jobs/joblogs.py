"""Job logs: every rank's whole output, kept on its own machine, read back from here.

Each rank tees what it prints into /workspace/logs/<job>/rank<R>.log on its machine
(deepfleet_node/joblog.py); the master's /workspace/logs/CURRENT names the latest job.
`deepfleet logs` reads the files of every machine at once, or follows them while the job
runs, and labels each line with its machine, from any terminal and after the job ended.
"""

from __future__ import annotations

import re
import shlex
import sys
import threading
from dataclasses import dataclass

from deepfleet.errors import DeepfleetError
from deepfleet.layout import LOGS
from deepfleet.machines.connect import first_line
from deepfleet.machines.execstream import ExecStream
from deepfleet_node.joblog import DIR_ENV, JOB_ENV, log_path

LOGS_DIR = LOGS
CURRENT = f"{LOGS_DIR}/CURRENT"
_JOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TAIL_HEADER = re.compile(r"^==> (?:.*/)?rank(\d+)\.log <==$")
# read_argv's first line: how many rank files the machine holds, so that lines are
# labelled with their rank from the first one on when there are several
_COUNT = 'echo "#files $(ls rank*.log | wc -l)"'
_COUNT_LINE = re.compile(r"^#files (\d+)$")


class LogError(DeepfleetError):
    pass


def job_name(run: str, kind: str = "train") -> str:
    """The job a launch logs under: the run name for training, <run>-infer for inference."""
    name = run if kind == "train" else f"{run}-{kind}"
    if not _JOB_RE.match(name):
        raise LogError(f"job name {name!r}: letters, digits, '.', '_' and '-' only")
    return name


def job_dir(job: str) -> str:
    return f"{LOGS_DIR}/{job}"


def log_file(job: str, rank: int) -> str:
    return str(log_path(job_dir(job), rank))


def launch_env(job: str) -> dict[str, str]:
    """What every rank of the job reads to find its log (exported through .deepspeed_env)."""
    return {DIR_ENV: job_dir(job), JOB_ENV: job}


def mark_current_argv(job: str) -> list[str]:
    """Run in the master's container at launch: CURRENT names this job from now on."""
    return ["sh", "-c", f"mkdir -p {LOGS_DIR} && printf '%s\\n' {shlex.quote(job)} > {CURRENT}"]


def read_argv(job: str, follow: bool, lines: int | None) -> list[str]:
    """The shell command that prints one machine's log files of `job` (tail's headers
    name each file) and, following, waits for them to appear and keeps reading."""
    start = f"-n {lines}" if lines is not None else "-n +1"
    where = shlex.quote(job_dir(job))
    if follow:
        script = (
            f"cd {where} 2>/dev/null || {{ mkdir -p {where} && cd {where}; }}; "
            "while ! ls rank*.log >/dev/null 2>&1; do sleep 1; done; "
            f"{_COUNT}; exec tail -v -F {start} rank*.log"
        )
    else:
        script = (
            f"cd {where} 2>/dev/null && ls rank*.log >/dev/null 2>&1 || exit 3; "
            f"{_COUNT}; exec tail -v {start} rank*.log"
        )
    return ["sh", "-c", script]


NO_LOG = 3  # read_argv's exit code when that machine holds no log of the job


@dataclass(frozen=True)
class Source:
    machine: str
    client: object  # docker-py client of that machine
    container_id: str


class Labeller:
    """tail's output of one machine as lines labelled `[machine]`, or `[machine/rankR]`
    where the machine holds more than one rank's file."""

    def __init__(self, machine: str, write):
        self.machine = machine
        self.write = write
        self.rank: str | None = None
        self.files = 1
        self.buffer = ""
        self.blank = False

    def feed(self, data: bytes) -> None:
        self.buffer += data.decode(errors="replace")
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self._line(line)

    def close(self) -> None:
        if self.buffer:
            self._line(self.buffer)
            self.buffer = ""
        self._flush_blank()

    def _line(self, line: str) -> None:
        header = _TAIL_HEADER.match(line)
        if header:
            self.blank = False  # the empty line tail puts before a file's header
            self.rank = header.group(1)
            return
        count = _COUNT_LINE.match(line)
        if count and self.rank is None:
            self.files = int(count.group(1))
            return
        self._flush_blank()
        if not line:
            self.blank = True  # shown unless a header follows
            return
        self._emit(line)

    def _flush_blank(self) -> None:
        if self.blank:
            self.blank = False
            self._emit("")

    def _emit(self, line: str) -> None:
        label = self.machine if self.files <= 1 else f"{self.machine}/rank{self.rank}"
        self.write(f"[{label}] {line}\n")


def current_job(client, container_id: str) -> str | None:
    api = client.api
    out = api.exec_start(api.exec_create(container_id, ["cat", CURRENT])["Id"])
    job = out.decode(errors="replace").strip()
    return job if _JOB_RE.match(job) else None


def stream(
    sources: list[Source], job: str, follow: bool, lines: int | None, out=sys.stdout
) -> list[str]:
    """Print every source's log of `job`, labelled; the machines that hold none of it."""
    lock = threading.Lock()
    missing: list[str] = []

    def write(text: str) -> None:
        with lock:
            out.write(text)
            out.flush()

    failed: dict[str, str] = {}

    def read(source: Source) -> None:
        try:
            _read(source)
        except Exception as exc:  # a thread's traceback would reach the terminal raw
            failed[source.machine] = first_line(exc)

    def _read(source: Source) -> None:
        labeller = Labeller(source.machine, write)
        exec_ = ExecStream(source.client, source.container_id, read_argv(job, follow, lines))
        try:
            for frame in exec_.frames(poll=1.0):
                if frame is not None:
                    labeller.feed(frame.data)
            labeller.close()
            if not follow and exec_.exit_code() == NO_LOG:
                missing.append(source.machine)
        finally:
            exec_.close()

    threads = [threading.Thread(target=read, args=(s,), daemon=True) for s in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # join in slices so Ctrl-C ends a follow at once
            thread.join(0.5)
    if failed:
        name, why = next(iter(sorted(failed.items())))
        raise LogError(f"could not read the logs of job {job}: {why}", name)
    return sorted(missing)
