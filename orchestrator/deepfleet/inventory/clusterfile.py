"""Cluster file: the machines and `up` options in one YAML file, instead of a NODES list.

A machine is what a NODES word is (`[user@]name[:port][=flavor]`), plus what otherwise only
an SSH config can say (the address to dial, the key). The file's fields win over the SSH
config, as a word's user and port do, so a file and the words it replaces give the same
NodeSpecs. Relative paths are taken from the file's folder, not from where deepfleet runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

from deepfleet.errors import ClusterFileError, InventoryError
from deepfleet.inventory.nodes import FLAVORS, Inventory, NodeArg, parse_node_arg
from deepfleet.inventory.sshconfig import DEFAULT_SSH_CONFIG, resolve_args
from deepfleet.layout import RELAY_PORT

_TEXT = {"type": "string", "minLength": 1}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
MACHINE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": _TEXT,
        "host": _TEXT,
        "user": _TEXT,
        "port": _PORT,
        "key": _TEXT,
        "flavor": {"enum": list(FLAVORS)},
        "slots": {"type": "integer", "minimum": 0},  # 0 leaves the machine out of jobs
    },
}
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["machines"],
    "properties": {
        "image": _TEXT,
        "flavor": {"enum": list(FLAVORS)},
        "ssh_config": _TEXT,
        "cpu_slots": {"type": "integer", "minimum": 1},
        "relay_port": _PORT,
        "compose_overrides": {"type": "array", "items": _TEXT},
        "machines": {"type": "array", "minItems": 1, "items": MACHINE_SCHEMA},
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


@dataclass(frozen=True)
class Machine:
    name: str  # the node's name everywhere: an SSH config alias or the host itself
    host: str | None = None  # None: the SSH config's HostName, else the name
    user: str | None = None
    port: int | None = None
    key: str | None = None  # absolute identity file
    flavor: str | None = None
    slots: int | None = None


@dataclass(frozen=True)
class ClusterFile:
    """A loaded cluster file. None: the file leaves it to the command line's default."""

    path: Path
    machines: tuple[Machine, ...]
    image: str | None = None
    flavor: str | None = None  # for machines that name none; None: from what each has
    ssh_config: Path | None = None  # absolute; None: ~/.ssh/config
    cpu_slots: int | None = None
    relay_port: int | None = None
    compose_overrides: tuple[Path, ...] = ()  # absolute

    @property
    def slots(self) -> dict[str, int]:
        return {m.name: m.slots for m in self.machines if m.slots is not None}

    def inventory(self) -> Inventory:
        args = (
            NodeArg(m.name, m.user, m.port, m.flavor, hostname=m.host, identity_file=m.key)
            for m in self.machines
        )
        return resolve_args(args, self.ssh_config)


def load(path: str | Path) -> ClusterFile:
    """Read and check a cluster file; every problem is one ClusterFileError line."""
    shown = str(path)
    path = Path(path).expanduser()
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ClusterFileError(f"{shown}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ClusterFileError(f"{shown}: not UTF-8 text") from exc
    except yaml.YAMLError as exc:
        raise ClusterFileError(f"{shown}: not YAML: {_yaml_problem(exc)}") from exc
    doc = {} if doc is None else doc  # an empty file: say what it lacks, not "None is ..."
    # the first error in schema order: machines by index, a machine's unknown keys first
    error = next(iter(_VALIDATOR.iter_errors(doc)), None)
    if error is not None:
        raise ClusterFileError(f"{shown}: {_schema_problem(error)}")
    base = _absolute(path).parent
    machines = tuple(_machine(shown, i, item, base) for i, item in enumerate(doc["machines"]))
    seen: set[str] = set()
    for i, machine in enumerate(machines):
        if machine.name in seen:
            raise ClusterFileError(f"{shown}: machines[{i}].name: {machine.name!r} is listed twice")
        seen.add(machine.name)
    return ClusterFile(
        path=_absolute(path),
        machines=machines,
        image=doc.get("image"),
        flavor=doc.get("flavor"),
        ssh_config=_path(doc["ssh_config"], base) if "ssh_config" in doc else None,
        cpu_slots=doc.get("cpu_slots"),
        relay_port=doc.get("relay_port"),
        compose_overrides=tuple(_path(p, base) for p in doc.get("compose_overrides", ())),
    )


def _absolute(path: Path) -> Path:
    # not resolve(): a symlinked folder stays as written, as the SSH config's paths do
    return Path(os.path.abspath(path))


def _path(text: str, base: Path) -> Path:
    return _absolute(base / Path(text).expanduser())


def _machine(shown: str, index: int, item: Mapping, base: Path) -> Machine:
    for field in ("name", "host"):
        if field in item:
            problem = _bare_host_problem(item[field])
            if problem:
                raise ClusterFileError(f"{shown}: machines[{index}].{field}: {problem}")
    return Machine(
        name=item["name"],
        host=item.get("host"),
        user=item.get("user"),
        port=int(item["port"]) if "port" in item else None,  # YAML's 22.0 is an integer
        key=str(_path(item["key"], base)) if "key" in item else None,
        flavor=item.get("flavor"),
        slots=int(item["slots"]) if "slots" in item else None,
    )


def _bare_host_problem(text: str) -> str | None:
    # the NODES word grammar, so a name is exactly what the same word would name
    try:
        arg = parse_node_arg(text)
    except InventoryError as exc:
        return str(exc)
    if arg != NodeArg(host=text):
        return f"{text!r} is not a bare host name; user, port and flavor have their own fields"
    return None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    return f"line {mark.line + 1} column {mark.column + 1}: {problem}" if mark else problem


def _schema_problem(error: jsonschema.ValidationError) -> str:
    where = ""
    for part in error.absolute_path:
        where += f"[{part}]" if isinstance(part, int) else f"{'.' if where else ''}{part}"

    def at(key) -> str:
        return f"{where}.{key}" if where else str(key)

    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        unknown = sorted(str(k) for k in error.instance if k not in known)
        return f"{at(unknown[0])}: unknown key; known: {', '.join(known)}"
    if error.validator == "required":
        missing = next(k for k in error.validator_value if k not in error.instance)
        return f"{at(missing)}: required but not given"
    return f"{where}: {error.message}" if where else error.message


_HEADER = """\
# deepfleet cluster file, for `deepfleet up --cluster-file {name}` and `deepfleet doctor
# --cluster-file {name}`. A field left out takes the command line's default. Relative
# paths are taken from this file's folder.
"""
# key, example, comment: the top-level options, shown commented out when not given
_OPTIONS = (
    ("image", "deepfleet/cpu:latest", "node image (default: deepfleet/<flavor>:latest)"),
    ("flavor", "cpu", "cpu, cuda or rocm for machines naming none (default: what each has)"),
    ("ssh_config", str(DEFAULT_SSH_CONFIG), "where the aliases, HostName, User, Port, keys are"),
    ("cpu_slots", 1, "processes on each CPU-only machine"),
    ("relay_port", RELAY_PORT, "the port each machine takes the image on from the one before"),
)
_MACHINE_HELP = """\
# The first machine is the master (rank 0). Every field but name is optional:
#   - name: lab1              # an SSH config alias or host name; the node's name everywhere
#     host: 172.20.0.2        # address to dial (default: the SSH config's HostName, or name)
#     user: root              # (default: the SSH config's User, or yours here)
#     port: 22                # (default: the SSH config's Port, or 22)
#     key: ~/.ssh/id_ed25519  # identity file (default: the SSH config's IdentityFile)
#     flavor: cuda            # cpu, cuda or rocm (default: from what the machine has)
#     slots: 2                # processes for jobs (default: its GPUs, or cpu_slots; 0: none)
machines:"""


def render_init(
    inventory: Inventory,
    *,
    image: str | None = None,
    slots: Mapping[str, int] | None = None,
    compose_overrides=(),
    ssh_config: str | Path | None = None,
    name: str = "cluster.yaml",
) -> str:
    """A commented cluster file that `load` reads back to `inventory`.

    A machine gets only the fields its name alone would not resolve to through the SSH
    config, so the file keeps following that config as the NODES words did.
    """
    slots = dict(slots or {})
    unknown = set(slots) - {n.name for n in inventory.nodes}
    if unknown:
        raise InventoryError(f"slots given for unknown nodes: {', '.join(sorted(unknown))}")
    config_text = str(ssh_config) if ssh_config is not None else inventory.ssh_config
    config_path = Path(config_text).expanduser() if config_text else DEFAULT_SSH_CONFIG
    given = {"image": image}
    if _absolute(config_path) != _absolute(DEFAULT_SSH_CONFIG.expanduser()):
        given["ssh_config"] = _path_text(config_text)
    lines = [_HEADER.format(name=name)]
    for key, example, comment in _OPTIONS:
        value = given.get(key)
        lines += [f"# {comment}", f"{key}: {_yaml(value)}" if value else f"# {key}: {example}"]
    lines.append("# compose files merged over compose/node.yml, as `docker compose -f` does")
    overrides = [_path_text(p) for p in compose_overrides]
    if overrides:
        lines += ["compose_overrides:", *(f"  - {_yaml(p)}" for p in overrides)]
    else:
        lines.append("# compose_overrides: [compose.override.yml]")
    lines += ["", _MACHINE_HELP]
    for node in inventory.nodes:
        plain = resolve_args([NodeArg(node.name)], config_path).master
        fields = {
            "name": node.name,
            "host": node.host if node.host != plain.host else None,
            "user": node.user if node.user != plain.user else None,
            "port": node.port if node.port != plain.port else None,
            "key": node.identity_file if node.identity_file != plain.identity_file else None,
            "flavor": node.flavor,
            "slots": slots.get(node.name),
        }
        set_fields = [(k, v) for k, v in fields.items() if v is not None]
        for i, (key, value) in enumerate(set_fields):
            lines.append(f"{'  - ' if i == 0 else '    '}{key}: {_yaml(value)}")
    return "\n".join(lines) + "\n"


def _path_text(path: str | Path) -> str:
    # keep `~` so the file still works for the same user elsewhere
    text = str(path)
    return text if text.startswith("~") else str(_absolute(Path(text)))


def _yaml(value) -> str:
    # YAML's own quoting: a bare `10:20` or `yes` would read back as a number or a bool
    return yaml.safe_dump(value, width=1 << 20).removesuffix("...\n").strip()
