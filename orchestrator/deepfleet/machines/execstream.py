"""Exec streams with progress-based timeouts.

docker-py reads an exec's output with no timeout at all (`_disable_socket_timeout`), so a
machine that freezes mid-command leaves the caller waiting forever, while its plain
`exec_run` fails any command that is silent for longer than the API's read timeout. Here
the exec's socket is read in short polls: the caller sees every frame as it comes and a
tick between them, and decides itself how long silence may last and what else to check.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from deepfleet.errors import ContainerError
from deepfleet.machines.connect import stall_timeout

_HEADER = struct.Struct(">BxxxL")  # Docker's multiplexed stream: stream id, payload length
STDOUT, STDERR = 1, 2


class Stalled(ContainerError):
    """The exec produced nothing and its node did not show it alive for too long."""


@dataclass
class Frame:
    stream: int  # STDOUT or STDERR
    data: bytes


class ExecStream:
    """One exec in a container, its output read frame by frame with a poll interval."""

    def __init__(self, client, container_id: str, argv, env=None, workdir=None):
        self.api = client.api
        self.exec_id = self.api.exec_create(
            container_id, list(argv), environment=env, workdir=workdir, tty=False
        )["Id"]
        raw = self.api.exec_start(self.exec_id, socket=True)
        self.sock = getattr(raw, "_sock", raw)  # SocketIO over a unix socket; a channel over SSH
        self._buffer = b""
        self.closed = False

    def frames(self, poll: float = 1.0) -> Iterator[Frame | None]:
        """Frames as they come; None after each `poll` seconds without one; ends at EOF."""
        self.sock.settimeout(poll)
        while True:
            frame = self._next_buffered()
            if frame is not None:
                yield frame
                continue
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                yield None
                continue
            except OSError:
                if self.closed:
                    return
                raise
            if not chunk:
                return
            self._buffer += chunk

    def _next_buffered(self) -> Frame | None:
        if len(self._buffer) < _HEADER.size:
            return None
        stream, length = _HEADER.unpack_from(self._buffer)
        end = _HEADER.size + length
        if len(self._buffer) < end:
            return None
        data, self._buffer = self._buffer[_HEADER.size : end], self._buffer[end:]
        return Frame(stream, data)

    def inspect(self) -> dict:
        return self.api.exec_inspect(self.exec_id)

    def exit_code(self) -> int:
        code = self.inspect().get("ExitCode")
        return 1 if code is None else int(code)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def run_collect(client, container_id: str, argv, node: str, env=None, stall: float | None = None):
    """(exit code, stdout, stderr) of a command that may run long.

    Silence alone is no failure: every `stall` seconds without output the engine is asked
    whether the command still runs. It fails when the engine stops answering, which is
    what a frozen or unplugged machine looks like from here.
    """
    stall = stall or stall_timeout()
    stream = ExecStream(client, container_id, argv, env=env)
    out, err = [], []
    quiet_since = time.monotonic()
    try:
        for frame in stream.frames(poll=min(5.0, stall)):
            if frame is not None:
                (out if frame.stream == STDOUT else err).append(frame.data)
                quiet_since = time.monotonic()
                continue
            if time.monotonic() - quiet_since < stall:
                continue
            try:
                running = stream.inspect().get("Running")
            except Exception as exc:
                raise Stalled(
                    f"stopped answering while running `{_shown(argv)}` "
                    f"(no reply for {stall:.0f} s)",
                    node,
                ) from exc
            if not running:
                break  # output ended without EOF reaching us: the command is done
            quiet_since = time.monotonic()
        code = stream.exit_code()
    finally:
        stream.close()
    return code, b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace")


def _shown(argv) -> str:
    text = " ".join(argv)
    return text if len(text) < 80 else " ".join(list(argv)[:3]) + " ..."
