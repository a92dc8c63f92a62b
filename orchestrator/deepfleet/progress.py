"""Progress lines for long transfers (an image, a model, data): one per machine, by tqdm.

On a terminal each machine gets its own live line (bytes, rate, ETA). Written to a log or
a pipe, the same meter is printed as a plain line every LOG_EVERY_S seconds, so a long
transfer shows that it moves without filling the log with redraws (the caller prints the
outcome).
"""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm

LOG_EVERY_S = 15.0


def _is_tty(out) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


class Bar:
    """One machine's transfer. update_to() takes the bytes done so far, from any thread."""

    def __init__(self, board: Board, label: str, total: int, position: int, unit: str = "B"):
        self._board = board
        self._label = label
        self._unit = unit
        self._scale = unit == "B"  # bytes in kB/MB/GB; counted things as they are
        self._total = max(total, 0)
        self._done = 0
        self._began = time.monotonic()
        self._printed = self._began
        self._lock = threading.Lock()
        self._bar = None
        if board.tty:
            self._bar = tqdm(
                total=self._total or None, desc=label, unit=unit, unit_scale=self._scale,
                unit_divisor=1000, position=position, leave=False, file=board.out,
                dynamic_ncols=True, mininterval=0.5,
            )  # fmt: skip

    def set_total(self, total: int) -> None:
        """For a count first known after the start (an image build's number of steps)."""
        with self._lock:
            self._total = max(total, 0)
            if self._bar is not None:
                self._bar.total = self._total or None
                self._bar.refresh()

    def update_to(self, done: int) -> None:
        with self._lock:
            if done <= self._done:
                return
            step, self._done = done - self._done, done
            if self._bar is not None:
                self._bar.update(step)
                return
            now = time.monotonic()
            if now - self._printed >= LOG_EVERY_S:
                self._printed = now
                self._board.line(self.meter())

    def meter(self) -> str:
        return tqdm.format_meter(
            self._done, self._total or None, time.monotonic() - self._began,
            prefix=self._label, unit=self._unit, unit_scale=self._scale, unit_divisor=1000,
        )  # fmt: skip

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None


class Board:
    """The progress lines of one step that runs on many machines at once."""

    def __init__(self, out=None, tty: bool | None = None):
        self.out = out if out is not None else sys.stderr
        self.tty = _is_tty(self.out) if tty is None else tty
        self._bars: list[Bar] = []
        self._lock = threading.Lock()

    def bar(self, label: str, total: int, unit: str = "B") -> Bar:
        with self._lock:
            bar = Bar(self, label, total, len(self._bars), unit)
            self._bars.append(bar)
            return bar

    def line(self, text: str) -> None:
        """A plain line that does not tear a live bar."""
        with self._lock:
            if self.tty:
                tqdm.write(text, file=self.out)
            else:
                self.out.write(text + "\n")
                self.out.flush()

    def close(self) -> None:
        for bar in self._bars:
            bar.close()


class Counted:
    """A stream of chunks passed on as they are, the bytes so far in `done` and, given
    one, in a progress bar."""

    def __init__(self, chunks, bar: Bar | None = None):
        self._chunks = chunks
        self._bar = bar
        self.done = 0

    def __iter__(self):
        for chunk in self._chunks:
            self.done += len(chunk)
            if self._bar is not None:
                self._bar.update_to(self.done)
            yield chunk
