"""Typed errors. The CLI turns each into one line: `deepfleet: <node>: <cause>`."""

from __future__ import annotations


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


class StateError(DeepfleetError):
    """No cluster is up, or its saved state is unreadable."""


class JobError(DeepfleetError):
    """The launched job failed; carries its exit code."""

    def __init__(self, message: str, exit_code: int, node: str | None = None):
        super().__init__(message, node)
        self.exit_code = exit_code
