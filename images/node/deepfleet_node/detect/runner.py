"""Running the vendor tools: one command with a hard timeout (run_tool), and the context
each collector runs its tools through (_Ctx), which turns failures into error entries."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .parsing import _one_line, summarize_error

DEFAULT_TIMEOUT = 10.0

# Where vendor tools live when a container's PATH was not set up for them.
EXTRA_TOOL_DIRS = ("/opt/rocm/bin", "/usr/lib/wsl/lib", "/usr/local/nvidia/bin")


@dataclass
class ToolResult:
    argv: list[str]
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    missing: bool = False
    timed_out: bool = False
    error: str | None = None
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.timed_out and not self.error and self.returncode == 0

    @property
    def output(self) -> str:
        return "\n".join(part for part in (self.stdout, self.stderr) if part)


def _search_path(env: Mapping[str, str] | None) -> str:
    env = os.environ if env is None else env
    dirs = [d for d in (env.get("PATH") or os.defpath).split(os.pathsep) if d]
    rocm = env.get("ROCM_PATH")
    extra = ([os.path.join(rocm, "bin")] if rocm else []) + list(EXTRA_TOOL_DIRS)
    return os.pathsep.join(dirs + [d for d in extra if d not in dirs])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        try:
            proc.kill()
        except OSError:
            pass


def run_tool(
    argv: list[str], timeout: float = DEFAULT_TIMEOUT, env: Mapping[str, str] | None = None
) -> ToolResult:
    """Run one command; never raises, never waits longer than about timeout + 2 s.

    The child gets its own session so that a timeout kills everything it started: SMI
    tools are often wrappers whose grandchildren would otherwise keep the pipes open.
    """
    argv = [str(a) for a in argv]
    start = time.monotonic()
    executable = argv[0]
    if os.sep not in executable:
        found = shutil.which(executable, path=_search_path(env))
        if found is None:
            return ToolResult(argv, missing=True)
        executable = found
    try:
        proc = subprocess.Popen(
            [executable, *argv[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except FileNotFoundError:
        return ToolResult(argv, missing=True)
    except OSError as exc:
        return ToolResult(argv, error=f"cannot run: {exc.strerror or exc}")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            # Something outside the process group still holds the pipes; stop reading.
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            out, err = b"", b""
        return ToolResult(
            argv,
            returncode=proc.returncode,
            stdout=(out or b"").decode("utf-8", "replace"),
            stderr=(err or b"").decode("utf-8", "replace"),
            timed_out=True,
            error=f"timed out after {timeout:g} s",
            duration=time.monotonic() - start,
        )
    return ToolResult(
        argv,
        returncode=proc.returncode,
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        duration=time.monotonic() - start,
    )


Runner = Callable[..., ToolResult]


@dataclass
class _Ctx:
    runner: Runner
    timeout: float
    env: Mapping[str, str]
    errors: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # A tool that hung once will hang again; asking it twice only doubles the wait.
    hung: set[str] = field(default_factory=set)

    def error(self, tool: str, message: str) -> None:
        entry = {"tool": tool, "error": _one_line(message)}
        if entry not in self.errors:
            self.errors.append(entry)

    def run(self, argv: list[str], env: Mapping[str, str] | None = None) -> ToolResult | None:
        """Run a tool; None (and an error entry unless it is simply missing) on failure."""
        if argv[0] in self.hung:
            return None
        try:
            result = self.runner(argv, self.timeout, env=dict(env if env is not None else self.env))
        except Exception as exc:  # an injected runner must not take the report down
            self.error(argv[0], f"runner raised {type(exc).__name__}: {exc}")
            return None
        if result.missing:
            return None
        if result.timed_out or result.error:
            if result.timed_out:
                self.hung.add(argv[0])
            self.error(argv[0], result.error or "failed")
            return None
        return result

    def fail(self, result: ToolResult) -> None:
        self.error(result.argv[0], summarize_error(result.output, result.returncode))

    def parse(self, tool: str, parser: Callable[..., Any], *args: Any) -> Any:
        try:
            return parser(*args)
        except Exception as exc:
            self.error(tool, f"unparseable output: {exc}")
            return None
