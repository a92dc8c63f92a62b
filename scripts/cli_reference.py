"""The README's command reference, generated from deepfleet's own argparse parser.

    python scripts/cli_reference.py            # print the generated section
    python scripts/cli_reference.py --write    # rewrite it in README.md
    python scripts/cli_reference.py --check    # exit 1 with a diff when README.md has drifted

The section sits between the START and END markers in README.md.
tests/unit/test_cli_reference.py runs the same comparison as --check.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import html
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

START = "<!-- cli-reference:start -->"
END = "<!-- cli-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"
PROG = "deepfleet"
# argparse wraps usage at the terminal's width (COLUMNS); a fixed width keeps the README
# the same whoever regenerates it
WIDTH = 88
FIX = "python scripts/cli_reference.py --write"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ENV_MARK = re.compile("\x00env:([^\x00]*)\x00")


def _mark(key: str) -> str:
    return f"\x00env:{key}\x00"


class Described:
    """A default that depends on where the parser was built, shown as words, not a value."""

    def __init__(self, text: str, markdown: str) -> None:
        self.text = text
        self.markdown = markdown

    def __str__(self) -> str:  # what %(default)s in a help string expands to
        return self.text


# --- building the parser the same way on every machine ---------------------------------


class _ReadLog(dict):
    """An os.environ stand-in that notes which variables the parser reads."""

    def __init__(self, data) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)


@contextlib.contextmanager
def _world(environ: dict, paths_exist: bool) -> Iterator[None]:
    """Give the parser a chosen environment and a filesystem where every probed path is
    there (or none is), so what this machine happens to hold cannot reach a default."""

    def answer(*_args, **_kwargs) -> bool:
        return paths_exist

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(os, "environ", environ))
        for name in ("exists", "isdir", "isfile"):
            stack.enter_context(mock.patch.object(os.path, name, answer))
        for name in ("exists", "is_dir", "is_file"):
            stack.enter_context(mock.patch.object(pathlib.Path, name, answer))
        yield


def _walk(p: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple]:
    for action in p._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in _commands(action):
                yield from _walk(sub, (*path, name))


def _shape(action: argparse.Action) -> tuple:
    return (
        type(action),
        tuple(action.option_strings),
        action.dest,
        action.nargs,
        action.metavar,
        tuple(action.choices) if action.choices is not None else None,
        action.required,
    )


def load_parser(factory: Callable[[], argparse.ArgumentParser] | None = None):
    """factory() (deepfleet.cli.main.parser by default) built so that its defaults read the same
    on every machine: a default taken from an environment variable shows as `$NAME`, one
    that depends on whether a path exists shows both values. Without this, exporting
    DEEPFLEET_SSH_CONFIG or having /opt/wheels would make the README differ per machine."""
    if factory is None:
        from deepfleet.cli.main import parser as factory

    log = _ReadLog(os.environ)
    with _world(log, paths_exist=False):
        factory()
    unset = {k: v for k, v in os.environ.items() if k not in log.read}

    def build(environ: dict, paths_exist: bool) -> argparse.ArgumentParser:
        with _world(environ, paths_exist):
            return factory()

    def traceable(key: str) -> bool:
        try:
            build({**unset, key: _mark(key)}, False)
        except Exception:
            # the parser converts this variable (int(...), ...): a marker cannot pass
            # through it, and the value with the variable unset stands
            return False
        return True

    base = build(unset, False)
    present = build(unset, True)
    marked = {k: _mark(k) for k in sorted(log.read) if traceable(k)}
    from_env = build({**unset, **marked}, False)

    rows = [list(_walk(p)) for p in (base, present, from_env)]
    if len({len(r) for r in rows}) != 1:
        raise RuntimeError("the parser's commands or options depend on the environment")
    for (where, action), (_, if_present), (_, env_action) in zip(*rows, strict=True):
        name = " ".join((PROG, *where, (action.option_strings or [action.dest])[0]))
        if not (_shape(action) == _shape(if_present) == _shape(env_action)):
            raise RuntimeError(f"{name}: its flags or choices depend on the environment")
        if action.help != if_present.help:
            raise RuntimeError(f"{name}: its help depends on which paths exist here")
        if action.help != env_action.help and isinstance(env_action.help, str):
            action.help = _ENV_MARK.sub(r"$\1", env_action.help)
        shown, if_there = _default_text(action), _default_text(if_present)
        if shown != if_there:
            text = f"{if_there or 'none'} or {shown or 'none'}, by machine"
            md = f"{_cell_default(if_present) or 'none'} or {_cell_default(action) or 'none'}"
            md += ", by machine"
            action.default = Described(text, md)
        elif _ENV_MARK.search(_default_text(env_action) or ""):
            text = _ENV_MARK.sub(r"$\1", _default_text(env_action))
            action.default = Described(text, _code(text))
    return base


# --- rendering -------------------------------------------------------------------------


def _commands(action: argparse._SubParsersAction) -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) once per command in the order they were added; aliases share a
    parser with their command and come after it in choices."""
    seen: set[int] = set()
    out = []
    for name, sub in action.choices.items():
        if id(sub) not in seen:
            seen.add(id(sub))
            out.append((name, sub))
    return out


def _aliases(action: argparse._SubParsersAction, name: str) -> list[str]:
    sub = action.choices[name]
    return [n for n, p in action.choices.items() if p is sub and n != name]


def _command_help(action: argparse._SubParsersAction, name: str) -> str | None:
    # a command added without help= has no pseudo-action here
    for choice in action._choices_actions:
        if choice.dest == name:
            return choice.help
    return None


@contextlib.contextmanager
def _steady(p: argparse.ArgumentParser, prog: str) -> Iterator[argparse.HelpFormatter]:
    """p with a fixed program name, width and no colour while its usage is formatted."""
    saved = p.__dict__.copy()
    cls = p.formatter_class
    p.prog = prog
    p.formatter_class = lambda prog: cls(prog=prog, width=WIDTH)
    if hasattr(p, "color"):  # Python 3.14 colours help when the terminal allows
        p.color = False
    try:
        yield p._get_formatter()
    finally:
        p.__dict__.clear()
        p.__dict__.update(saved)


def _code(text: str) -> str:
    """text as a Markdown code span inside a table cell."""
    text = text.replace("|", "\\|")
    ticks = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (ticks + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _prose(text: str) -> str:
    """Help text as one line of a table cell: < and & would start HTML, | a new column."""
    text = " ".join(text.split())
    return html.escape(text.replace("\\", "\\\\"), quote=False).replace("|", "\\|")


def _default_text(action: argparse.Action) -> str | None:
    """The default worth printing: a flag's (store_true, ...) is just 'not given', and
    None, False or empty means nothing is set."""
    value = action.default
    if action.nargs == 0 or value is None or value is False or value is argparse.SUPPRESS:
        return None
    if isinstance(value, (str, list, tuple, dict)) and not value:
        return None
    return str(value)


def _cell_default(action: argparse.Action) -> str:
    if isinstance(action.default, Described):
        return action.default.markdown
    text = _default_text(action)
    return _code(text) if text is not None else ""


def _row(action: argparse.Action, fmt: argparse.HelpFormatter) -> str:
    if action.option_strings:
        name = ", ".join(_code(s) for s in action.option_strings)
        value = (
            ""
            if action.nargs == 0
            else _code(fmt._format_args(action, fmt._get_default_metavar_for_optional(action)))
        )
    else:
        name = _code(fmt._get_default_metavar_for_positional(action))
        value = _code(fmt._format_args(action, fmt._get_default_metavar_for_positional(action)))
    helptext = _prose(_ANSI.sub("", fmt._expand_help(action))) if action.help else ""
    if action.option_strings and action.required:
        helptext = f"**required** {helptext}".rstrip()
    return f"| {name} | {value} | {_cell_default(action)} | {helptext} |"


def _table(p: argparse.ArgumentParser, fmt: argparse.HelpFormatter) -> list[str]:
    shown = [
        a
        for a in p._actions
        if a.help is not argparse.SUPPRESS
        and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
    ]
    # positionals first, as argparse's own --help lists them
    shown.sort(key=lambda a: bool(a.option_strings))
    if not shown:
        return ["No options."]
    head = ["| argument | value | default | help |", "|---|---|---|---|"]
    return head + [_row(a, fmt) for a in shown]


def _section(p: argparse.ArgumentParser, prog: str) -> list[str]:
    with _steady(p, prog) as fmt:
        usage = _ANSI.sub("", p.format_usage()).rstrip()
        lines = ["```", usage, "```", "", *_table(p, fmt)]
    out = []
    for action in p._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, sub in _commands(action):
            path = f"{prog} {name}"
            out += ["", f"### {path}", ""]
            helptext = _command_help(action, name)
            if helptext and helptext is not argparse.SUPPRESS:
                out += [_prose(helptext), ""]
            if sub.description:
                out += [_prose(sub.description.replace("%(prog)s", path)), ""]
            aliases = _aliases(action, name)
            if aliases:
                out += ["Also: " + ", ".join(_code(f"{prog} {a}") for a in aliases) + ".", ""]
            out += _section(sub, path)
    return lines + out


def render(p: argparse.ArgumentParser, prog: str = PROG) -> str:
    """The Markdown reference of p: its global options, then every command (and any
    command under it) as argparse knows them now."""
    lines = ["### Global options", "", *_section(p, prog)]
    return "\n".join(lines) + "\n"


# --- README ----------------------------------------------------------------------------


def section_bounds(text: str) -> tuple[int, int]:
    """Where the generated text starts and ends: just after START, just before END."""
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"needs exactly one {START} and one {END}")
    start, end = text.index(START) + len(START), text.index(END)
    if end < start:
        raise ValueError(f"{END} comes before {START}")
    return start, end


def wanted_section(body: str) -> str:
    return "\n" + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="deepfleet's command reference for README.md")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff when it drifted")
    mode.add_argument("--write", action="store_true", help="rewrite the section in place")
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)

    body = render(load_parser())
    if not (args.check or args.write):
        sys.stdout.write(body)
        return 0
    # newline="" keeps the rest of the file byte for byte
    with open(args.readme, encoding="utf-8", newline="") as f:
        text = f.read()
    try:
        start, end = section_bounds(text)
    except ValueError as exc:
        print(f"cli_reference: {args.readme}: {exc}", file=sys.stderr)
        return 2
    current, wanted = text[start:end], wanted_section(body)
    if args.check:
        if current == wanted:
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                current.splitlines(keepends=True),
                wanted.splitlines(keepends=True),
                f"{args.readme} (command reference)",
                "deepfleet.cli.main.parser()",
            )
        )
        print(f"cli_reference: {args.readme} is out of date; run: {FIX}", file=sys.stderr)
        return 1
    if current != wanted:
        with open(args.readme, "w", encoding="utf-8", newline="") as f:
            f.write(text[:start] + wanted + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
