"""README.md's command reference against the parser it is generated from."""

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from deepfleet.cli.main import parser

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "cli_reference", ROOT / "scripts" / "cli_reference.py"
)
ref = importlib.util.module_from_spec(_spec)
sys.modules["cli_reference"] = ref
_spec.loader.exec_module(ref)


def _small() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="whatever-argv0-was")
    p.add_argument("--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    go = sub.add_parser("go", help="go somewhere")
    go.add_argument("where", help="a place")
    go.add_argument("--speed", type=int, default=3, help="km/h (default %(default)s)")
    go.add_argument("--mode", default="a", help="a|b|c, <any> & more")
    return p


def _commands(p: argparse.ArgumentParser) -> list[str]:
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return [name for action in subs for name in action.choices]


def test_readme_matches_the_parser():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = ref.section_bounds(text)
    wanted = ref.wanted_section(ref.render(ref.load_parser()))
    assert text[start:end] == wanted, (
        f"README.md's command reference differs from deepfleet.cli.main.parser(); run: {ref.FIX}"
    )


def test_render_follows_a_parser_change():
    p = _small()
    before = ref.render(p, prog="tool")
    assert "### deepfleet" not in before
    assert "### tool go\n\ngo somewhere\n" in before
    assert "usage: tool go [-h]" in before
    assert "| `where` | `where` |  | a place |" in before
    assert "| `--speed` | `SPEED` | `3` | km/h (default 3) |" in before
    assert "| `--mode` | `MODE` | `a` | a\\|b\\|c, &lt;any&gt; &amp; more |" in before
    assert "| `--verbose` |  |  |  |" in before  # a global option, no default shown

    go = p._subparsers._group_actions[0].choices["go"]
    go.add_argument("--fuel", choices=("diesel", "electric"), default="electric")
    after = ref.render(p, prog="tool")
    assert after != before
    assert "| `--fuel` | `{diesel,electric}` | `electric` |  |" in after

    p._subparsers._group_actions[0].add_parser("stop")
    assert "### tool stop\n" in ref.render(p, prog="tool")


def test_every_command_is_in_the_reference():
    out = ref.render(ref.load_parser())
    names = _commands(parser())
    assert names
    for name in names:
        assert f"\n### deepfleet {name}\n" in out, name
        assert f"usage: deepfleet {name} " in out, name


def test_usage_ignores_the_terminal_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    wide = ref.render(_small(), prog="tool")
    monkeypatch.setenv("COLUMNS", "30")
    assert ref.render(_small(), prog="tool") == wide


def test_environment_and_paths_do_not_reach_the_reference(monkeypatch, tmp_path):
    here = tmp_path / "wheels"
    here.mkdir()

    def factory():
        p = argparse.ArgumentParser()
        p.add_argument("--config", default=os.environ.get("TOOL_CONFIG"), help="(%(default)s)")
        p.add_argument("--wheels", default=str(here) if here.is_dir() else "")
        p.add_argument("--steps", type=int, default=int(os.environ.get("TOOL_STEPS", "5")))
        return p

    monkeypatch.setenv("TOOL_CONFIG", "/home/someone/cfg")
    monkeypatch.setenv("TOOL_STEPS", "9")
    with_env = ref.render(ref.load_parser(factory))
    monkeypatch.delenv("TOOL_CONFIG")
    monkeypatch.delenv("TOOL_STEPS")
    here.rmdir()
    assert ref.render(ref.load_parser(factory)) == with_env
    assert "| `--config` | `CONFIG` | `$TOOL_CONFIG` | ($TOOL_CONFIG) |" in with_env
    assert f"`{here}` or none, by machine" in with_env
    # a variable the parser converts cannot be traced: it reads as if unset
    assert "| `--steps` | `STEPS` | `5` |" in with_env


def test_check_and_write(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{ref.START}\nstale\n{ref.END}\n\n## After\n", encoding="utf-8")
    assert ref.main(["--check", "--readme", str(readme)]) == 1
    out, err = capsys.readouterr()
    assert "-stale" in out and "+### Global options" in out
    assert ref.FIX in err

    assert ref.main(["--write", "--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(f"# x\n\n{ref.START}\n### Global options\n")
    assert text.endswith(f"{ref.END}\n\n## After\n")
    assert ref.main(["--check", "--readme", str(readme)]) == 0


def test_missing_markers_are_an_error(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n", encoding="utf-8")
    assert ref.main(["--check", "--readme", str(readme)]) == 2
    assert ref.START in capsys.readouterr().err
    with pytest.raises(ValueError):
        ref.section_bounds(f"{ref.END}\n{ref.START}\n")
