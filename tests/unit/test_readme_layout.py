"""The README's layout section matches the tree: every path it names exists, and every
top-level folder of the repository is in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _layout_rows() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (.*) \|$", section, re.M)
    assert rows, "no layout table"
    return rows


def _tracked_top_level() -> set[str]:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return {f.split("/")[0] + "/" for f in files if "/" in f}


def test_every_path_in_the_layout_exists():
    for path, what in _layout_rows():
        base = ROOT / path
        assert base.is_dir(), path
        for name in re.findall(r"`([\w.<>-]+(?:/[\w.-]+)*/?)`", what):
            if "<" in name or name.startswith("make") or " " in name:
                continue
            candidates = [base / name, base / f"{name}.py", base / "node" / name,
                          base / "node" / "deepfleet_node" / name,
                          base / "node" / "deepfleet_node" / f"{name}.py",
                          base / "node" / "deepfleet_node" / "detect" / f"{name}.py",
                          base / "detect" / f"{name}.py"]  # fmt: skip
            assert any(c.exists() for c in candidates), f"{path}: {name}"


def test_every_top_level_folder_is_in_the_layout():
    named = {path.split("/")[0] + "/" for path, _ in _layout_rows()}
    assert _tracked_top_level() <= named, _tracked_top_level() - named


def test_every_package_has_a_row_naming_each_of_its_modules():
    """A newcomer finds the place for a change from the README: each folder of the
    orchestrator and of the node package has its row, and the row names every module."""
    rows = dict(_layout_rows())
    packages = [
        d for base in ("orchestrator/deepfleet", "images/node/deepfleet_node")
        for d in sorted((ROOT / base).iterdir()) if (d / "__init__.py").exists()
    ]  # fmt: skip
    assert packages
    for package in packages:
        path = f"{package.relative_to(ROOT).as_posix()}/"
        if package.name == "detect":  # named with its tool families in the node row
            assert "`detect/`" in rows["images/node/deepfleet_node/"]
            continue
        assert path in rows, f"README layout has no row for {path}"
        named = set(re.findall(r"`([\w.-]+)`", rows[path]))
        modules = {p.stem for p in package.glob("*.py") if not p.stem.startswith("__")}
        assert modules <= named, f"{path}: README does not name {sorted(modules - named)}"
