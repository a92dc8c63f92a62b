"""The layers in pyproject.toml's [tool.importlinter] hold, and breaking one fails the lint.

Each case copies the two packages and pyproject.toml into a temporary folder, adds one
import that crosses a layer, and runs lint-imports (what `make lint` and `make test` run)
over that copy: the untouched copy passes, every deliberate bad import fails it, naming
the contract it broke.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _copy(tmp: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "orchestrator" / "deepfleet", tmp / "src" / "deepfleet", ignore=ignore)
    node = ROOT / "images" / "node" / "deepfleet_node"
    shutil.copytree(node, tmp / "src" / "deepfleet_node", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    return tmp


def _lint(tmp: Path) -> subprocess.CompletedProcess:
    # the copy first on the path, so grimp reads it and not the installed packages
    env = {**os.environ, "PYTHONPATH": str(tmp / "src")}
    return subprocess.run(
        [str(LINT), "--config", str(tmp / "pyproject.toml"), "--no-cache"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _add_import(tmp: Path, module: str, line: str) -> None:
    path = tmp / "src" / Path(*module.split(".")).with_suffix(".py")
    text = path.read_text()
    # after the __future__ import, so the file stays valid Python
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + "\n" + rest if sep else line + "\n" + text)


def test_the_tree_keeps_every_contract(tmp_path):
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # planning is pure: no Docker, no sockets, no processes
        ("deepfleet.planning.plan", "import docker", "Planning is pure"),
        ("deepfleet.planning.memory", "import subprocess", "Planning is pure"),
        ("deepfleet.planning.inferplan", "from deepfleet.machines import connect", "Planning"),
        # machines and images never reach up into jobs or serving
        ("deepfleet.machines.state", "from deepfleet.jobs import launch", "never import jobs"),
        ("deepfleet.images.build", "from deepfleet.serving import pool", "never import jobs"),
        # the node package never imports the orchestrator
        ("deepfleet_node.joblog", "import deepfleet.layout", "never imports the orchestrator"),
        # and a lower layer never imports a higher one
        ("deepfleet.cluster.down", "from deepfleet.jobs import joblogs", "Layers"),
    ],
)
def test_a_deliberate_bad_import_fails_the_lint(tmp_path, module, line, broken):
    tmp = _copy(tmp_path)
    _add_import(tmp, module, line)
    result = _lint(tmp)
    assert result.returncode != 0, result.stdout
    broken_lines = [ln for ln in result.stdout.splitlines() if ln.endswith(" BROKEN")]
    assert any(broken in ln for ln in broken_lines), result.stdout
