"""Compose: the per-node service spec (compose/node.yml + overlays) as a ContainerSpec.

Only the Compose keys a node container uses are understood; any other key in the
service is an error rather than silently dropped, so the file never says more than
deepfleet does. Merging follows `docker compose -f a -f b`: mappings merge, lists of
volumes/devices merge by target, other values are replaced.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deepfleet.errors import ContainerError
from deepfleet.planning import flavors

SERVICE = "node"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPS = (":-", ":?", ":+", "-", "?", "+")  # colon forms first: they share a prefix
KNOWN_KEYS = {
    "image", "container_name", "command", "entrypoint", "network_mode", "ipc", "shm_size",
    "ulimits", "environment", "volumes", "labels", "restart", "devices", "group_add",
    "security_opt", "cap_add", "cap_drop", "deploy", "working_dir", "user", "privileged",
    "cgroup",
}  # fmt: skip
CGROUP_MODES = ("host", "private")
UNLIMITED = -1


def compose_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "compose"


@dataclass(frozen=True)
class Mount:
    source: str  # volume name (after the top-level `name:` mapping) or host path
    target: str
    kind: str  # "volume" or "bind"
    read_only: bool = False


@dataclass(frozen=True)
class DeviceRequest:
    driver: str
    count: int  # -1 = all
    capabilities: tuple[str, ...]
    device_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to create one node's container; printable for --dry-run."""

    name: str
    image: str
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    network_mode: str | None = None
    ipc_mode: str | None = None
    shm_size: str | None = None
    ulimits: tuple[tuple[str, int, int], ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    restart: str | None = None
    devices: tuple[str, ...] = ()
    group_add: tuple[str, ...] = ()
    security_opt: tuple[str, ...] = ()
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    device_requests: tuple[DeviceRequest, ...] = ()
    working_dir: str | None = None
    user: str | None = None
    privileged: bool = False
    cgroupns: str | None = None  # compose `cgroup:`: host or private (None: the engine's)

    def redacted_environment(self) -> dict[str, str]:
        secret = ("TOKEN", "KEY", "PASSWORD", "SECRET")
        return {
            k: ("<redacted>" if any(s in k for s in secret) and k != "DEEPFLEET_AUTHORIZED_KEY"
                else v)
            for k, v in self.environment.items()
        }  # fmt: skip


def interpolate(value, env: Mapping[str, str], source: str | Path | None = None):
    """Compose-spec interpolation in every string value; `source` names the file in errors.

    $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message},
    ${VAR:+alt}, ${VAR+alt}, with defaults, messages and alts interpolated in turn, and
    $$ for a literal $. The colon forms treat an empty value like an unset one.
    """
    if isinstance(value, str):
        return _substitute(value, env, source)
    if isinstance(value, list):
        return [interpolate(v, env, source) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env, source) for k, v in value.items()}
    return value


def _interp_error(source, text: str) -> ContainerError:
    return ContainerError(f"compose file {source}: {text}" if source else f"compose: {text}")


def _closing_brace(text: str, start: int) -> int:
    """Index of the `}` closing the `{` at `start`, or -1.

    Brace counting stops at the line's end and, when unbalanced, falls back to the line's
    last `}`, as compose-go does, so `${A:-{x}` keeps its `{`.
    """
    line_end = text.find("\n", start)
    line_end = len(text) if line_end < 0 else line_end
    depth, i = 0, start
    while i < line_end:
        if text[i] == "{":
            depth += 1
            i += 1  # compose-go skips the character after each `{`
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return text.rfind("}", start, line_end)


def _substitute(text: str, env: Mapping[str, str], source) -> str:
    out: list[str] = []
    i = 0
    while (j := text.find("$", i)) >= 0:
        out.append(text[i:j])
        after = text[j + 1 : j + 2]
        if after == "$":
            out.append("$")
            i = j + 2
        elif after == "{":
            end = _closing_brace(text, j + 1)
            if end < 0:
                raise _interp_error(source, f"invalid interpolation in {text!r}")
            out.append(_braced(text[j + 2 : end], text, env, source))
            i = end + 1
        elif named := _NAME_RE.match(text, j + 1):
            out.append(env.get(named.group(), ""))
            i = named.end()
        else:  # `$5`, `$ `, a trailing `$`: compose keeps these as they are
            out.append("$")
            i = j + 1
    out.append(text[i:])
    return "".join(out)


def _braced(body: str, text: str, env: Mapping[str, str], source) -> str:
    """One ${...} without its braces; `text` is the whole string, for the error."""
    named = _NAME_RE.match(body)
    rest = body[named.end() :] if named else ""
    op = next((o for o in _OPS if rest.startswith(o)), "")
    if not named or (rest and not op):
        raise _interp_error(source, f"invalid interpolation in {text!r}")
    name, arg = named.group(), rest[len(op) :]
    current = env.get(name)
    unset = current is None or (op.startswith(":") and current == "")
    if op.endswith("-"):
        return _substitute(arg, env, source) if unset else current
    if op.endswith("?"):
        if unset:
            message = _substitute(arg, env, source)
            raise _interp_error(source, f"{name} is required" + (f": {message}" if message else ""))
        return current
    if op.endswith("+"):
        return "" if unset else _substitute(arg, env, source)
    return current or ""


def _env_dict(value) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): "" if v is None else str(v) for k, v in value.items()}
    out = {}
    for item in value:
        key, _, val = str(item).partition("=")
        out[key] = val
    return out


def _by_target(items: list, target) -> list:
    merged: dict = {}
    for item in items:
        merged[target(item)] = item
    return list(merged.values())


def _target_of(item) -> str:
    if isinstance(item, dict):
        return str(item.get("target"))
    parts = str(item).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if key in ("environment", "labels"):
            out[key] = {**_env_dict(out.get(key)), **_env_dict(value)}
        elif key in ("volumes", "devices") and isinstance(value, list):
            out[key] = _by_target(list(out.get(key) or []) + value, _target_of)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load(files: list[Path], env: Mapping[str, str]) -> tuple[dict, dict[str, str]]:
    """Merge the files' `node` service; returns (service, volume-name map)."""
    service: dict = {}
    volume_names: dict[str, str] = {}
    for path in files:
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ContainerError(f"cannot read compose file {path}: {exc}") from exc
        doc = interpolate(doc, env, path)
        services = doc.get("services") or {}
        if SERVICE not in services:
            raise ContainerError(f"{path}: no services.{SERVICE} entry")
        unknown = set(services[SERVICE] or {}) - KNOWN_KEYS
        if unknown:
            raise ContainerError(
                f"{path}: services.{SERVICE} has unsupported keys: {sorted(unknown)}"
            )
        service = merge(service, services[SERVICE] or {})
        for key, spec in (doc.get("volumes") or {}).items():
            volume_names[key] = (spec or {}).get("name", key)
    if "image" not in service:
        raise ContainerError("the node service names no image")
    return service, volume_names


def _mount(item, volume_names: dict[str, str]) -> Mount:
    if isinstance(item, dict):
        source, target = str(item.get("source", "")), str(item["target"])
        read_only = bool(item.get("read_only", False))
    else:
        parts = str(item).split(":")
        if len(parts) < 2:
            raise ContainerError(f"volume {item!r}: anonymous volumes are not supported")
        source, target = parts[0], parts[1]
        read_only = len(parts) > 2 and "ro" in parts[2].split(",")
    is_bind = source.startswith(("/", ".", "~"))
    if not is_bind:
        source = volume_names.get(source, source)
    return Mount(source, target, "bind" if is_bind else "volume", read_only)


def _limit(value) -> int:
    return int(value)


def _ulimits(value: dict | None) -> tuple[tuple[str, int, int], ...]:
    out = []
    for name, spec in (value or {}).items():
        if isinstance(spec, dict):
            out.append((name, _limit(spec["soft"]), _limit(spec["hard"])))
        else:
            out.append((name, _limit(spec), _limit(spec)))
    return tuple(out)


def _device_requests(deploy: dict | None) -> tuple[DeviceRequest, ...]:
    devices = (((deploy or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    out = []
    for dev in devices or []:
        count = dev.get("count", "all")
        out.append(
            DeviceRequest(
                driver=str(dev.get("driver", "")),
                count=UNLIMITED if count == "all" else int(count),
                capabilities=tuple(dev.get("capabilities") or ()),
                device_ids=tuple(str(d) for d in dev.get("device_ids") or ()),
            )
        )
    return tuple(out)


def _argv(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(value.split())
    return tuple(str(v) for v in value)


def _cgroup(value) -> str | None:
    if value is None:
        return None
    if value not in CGROUP_MODES:
        raise ContainerError(f"services.{SERVICE}.cgroup is {value!r}, not host or private")
    return str(value)


def to_spec(service: dict, volume_names: dict[str, str]) -> ContainerSpec:
    return ContainerSpec(
        name=str(service.get("container_name") or "deepfleet-node"),
        image=str(service["image"]),
        command=_argv(service.get("command")),
        entrypoint=_argv(service.get("entrypoint")),
        network_mode=service.get("network_mode"),
        ipc_mode=service.get("ipc"),
        shm_size=str(service["shm_size"]) if service.get("shm_size") else None,
        ulimits=_ulimits(service.get("ulimits")),
        environment=_env_dict(service.get("environment")),
        mounts=tuple(_mount(v, volume_names) for v in service.get("volumes") or []),
        labels=_env_dict(service.get("labels")),
        restart=service.get("restart"),
        devices=tuple(str(d) for d in service.get("devices") or ()),
        group_add=tuple(str(g) for g in service.get("group_add") or ()),
        security_opt=tuple(str(s) for s in service.get("security_opt") or ()),
        cap_add=tuple(service.get("cap_add") or ()),
        cap_drop=tuple(service.get("cap_drop") or ()),
        device_requests=_device_requests(service.get("deploy")),
        working_dir=service.get("working_dir"),
        user=service.get("user"),
        privileged=bool(service.get("privileged", False)),
        cgroupns=_cgroup(service.get("cgroup")),
    )


def files_for(flavor: str, overrides: list[Path] | tuple[Path, ...] = ()) -> list[Path]:
    base = compose_dir()
    return [base / "node.yml", *(base / f for f in flavors.get(flavor).overlays), *overrides]


def node_spec(flavor: str, env: Mapping[str, str], overrides=()) -> ContainerSpec:
    service, volume_names = load(files_for(flavor, overrides), env)
    return to_spec(service, volume_names)
