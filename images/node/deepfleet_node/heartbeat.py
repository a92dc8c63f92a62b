"""Heartbeat: each rank's thread stamps a file every few seconds while its process runs.

The operator's watchdog (deepfleet/watchdog.py) reads the stamps; a stamp that stops
moving means the process no longer runs at all (frozen, stopped, starved), which no
error message would ever say. A rank busy in a long step or waiting in a collective still
beats: waiting on a dead peer is the process group timeout's to end.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from pathlib import Path

DIR_ENV = "DEEPFLEET_HEARTBEAT_DIR"
EVERY_S = 3.0


def _beat(path: Path, stop: threading.Event) -> None:
    tmp = path.with_suffix(".tmp")
    while not stop.is_set():
        try:
            tmp.write_text(f"{time.time():.1f}\n")
            os.replace(tmp, path)
        except OSError:
            pass  # a full disk must not kill training; the watchdog will see the stamp age
        stop.wait(EVERY_S)


def start(rank: int | None = None) -> Path | None:
    """Begin beating for this rank when the launcher asked for it (DEEPFLEET_HEARTBEAT_DIR)."""
    directory = os.environ.get(DIR_ENV)
    if not directory:
        return None
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    path = Path(directory) / f"rank-{rank}"
    path.parent.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    threading.Thread(target=_beat, args=(path, stop), daemon=True, name="heartbeat").start()
    atexit.register(finish, path, stop)
    _current.update(path=path, stop=stop)
    return path


def finish(path: Path | None = None, stop: threading.Event | None = None) -> None:
    """Stop beating and remove the stamp: a rank that is done is not a frozen one."""
    path = path or _current.get("path")
    stop = stop or _current.get("stop")
    if stop is not None:
        stop.set()
    if path is not None:
        path.unlink(missing_ok=True)
        path.with_suffix(".tmp").unlink(missing_ok=True)


_current: dict = {}
