"""Typed errors. The CLI turns each into one line: `deepfleet: <node>: <cause>`."""

from __future__ import annotations

import signal
from contextlib import contextmanager


class DeepfleetError(Exception):
    """Anything the user can act on. `node` names the machine at fault, when there is one."""

    def __init__(self, message: str, node: str | None = None):
        super().__init__(message)
        self.node = node

    def one_line(self) -> str:
        text = " ".join(str(self).split())
        return f"{self.node}: {text}" if self.node else text


class InventoryError(DeepfleetError):
    """The node list or SSH configuration cannot be understood."""


class ClusterFileError(InventoryError):
    """A cluster file is missing, not YAML, or off its schema; the message names the field."""


class ConnectError(DeepfleetError):
    """A node's Docker engine cannot be reached over SSH."""


class ImageError(DeepfleetError):
    """An image cannot be built, found, pulled or streamed."""


class ContainerError(DeepfleetError):
    """A node container cannot be created, started or inspected."""


class ReportError(DeepfleetError):
    """A node's detect report is missing or malformed."""


class PlanError(DeepfleetError):
    """The cluster cannot run the job as asked (version mismatch, no slots, ...)."""


class InputError(DeepfleetError):
    """A data, prompts or model input on this machine is unusable; the message names the file."""


class StateError(DeepfleetError):
    """No cluster is up, or its saved state is unreadable."""


class JobError(DeepfleetError):
    """The launched job failed; carries its exit code."""

    def __init__(self, message: str, exit_code: int, node: str | None = None):
        super().__init__(message, node)
        self.exit_code = exit_code


class PreflightError(DeepfleetError):
    """A machine cannot reach another on a port the job needs, or the port is taken.

    `node` is the machine to look at (the one that cannot connect, or the master whose
    rendezvous port is in use). The message names the machines itself, so the line gets no
    `node:` prefix.
    """

    def one_line(self) -> str:
        return " ".join(str(self).split())


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a closed terminal, `timeout`, a service stop), handled as Ctrl-C."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


def raise_interrupted(signum, _frame) -> None:
    raise Interrupted(signum)


@contextmanager
def ignoring_interrupts():
    """Hold Ctrl-C, SIGTERM and SIGHUP while a stop that must finish runs."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    try:
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    except ValueError:  # not the main thread: signals are not ours to hold
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
