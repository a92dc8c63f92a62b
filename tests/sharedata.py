"""The project's shared material (``../shared`` beside the clone: the recorded GPU tool
outputs, the Compose Specification schema), and the one rule for a test that needs it.

- Locally, where the folder is absent, such a test skips and says where it looked.
- Under CI (the environment variable ``CI`` set, as CI runners do, to anything but ''/0/false)
  CI lays a copy of ``shared/`` beside the clone, so a missing folder or file is a failure:
  a test that silently skipped there would prove nothing.

``DEEPFLEET_SHARED_DIR`` points at the folder instead of ``../shared`` (a container that
mounts it elsewhere; or a missing path, to see the rule work).

Tests reach this module through their folder's data module (tests/unit/unitdata.py puts
``tests/`` on sys.path); every read of shared material goes through ``require``/``read``,
and every parametrisation over it through ``files``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

SHARED_DIR_ENV = "DEEPFLEET_SHARED_DIR"
GPU_TOOL_OUTPUTS = "gpu-tool-outputs"


def shared_dir() -> Path:
    """``$DEEPFLEET_SHARED_DIR``, or ``shared/`` beside the repository's root."""
    override = os.environ.get(SHARED_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser().absolute()
    return Path(__file__).resolve().parents[1].parent / "shared"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def absent(path: Path) -> NoReturn:
    """Skip (locally) or fail (under CI) the running test: ``path`` is not there."""
    if in_ci():
        pytest.fail(
            f"shared material missing: {path} does not exist. CI requires it (CI is set): "
            f"lay shared/ beside the clone ({shared_dir()}) or point {SHARED_DIR_ENV} at it",
            pytrace=False,
        )
    pytest.skip(f"{path} is absent (shared/ is read beside the clone, or from {SHARED_DIR_ENV})")


def require(relative: str = "") -> Path:
    """The path of ``relative`` inside the shared folder; skips or fails where it is absent."""
    path = shared_dir() / relative
    if not path.exists():
        absent(path)
    return path


def read(relative: str) -> str:
    path = require(relative)
    if not path.is_file():
        absent(path)
    return path.read_text(encoding="utf-8", errors="replace")


def files(relative: str, exclude: tuple[str, ...] = ("SOURCES.md",)) -> list:
    """Parameters for every file under ``relative`` (paths relative to it, sorted), for
    ``pytest.mark.parametrize``. Where the folder is absent there is one parameter, None,
    whose test must call ``require(relative)``: it skips or fails there, rather than the
    whole parametrisation vanishing into pytest's quiet 'empty parameter set'."""
    root = shared_dir() / relative
    if not root.is_dir():
        return [pytest.param(None, id=f"{relative}-absent")]
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in exclude
    )
