"""NODES words resolved through the user's SSH configuration (HostName, User, Port,
IdentityFile, UserKnownHostsFile), as OpenSSH would. Reading the file is all it does:
nothing here touches the network."""

from __future__ import annotations

import getpass
from collections.abc import Iterable
from pathlib import Path

import paramiko

from deepfleet.errors import InventoryError
from deepfleet.inventory.nodes import Inventory, NodeArg, NodeSpec, check_unique, parse_node_arg

DEFAULT_SSH_CONFIG = Path("~/.ssh/config")
DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")


def load_ssh_config(path: Path | None) -> paramiko.SSHConfig:
    config = paramiko.SSHConfig()
    if path is None:
        return config
    path = path.expanduser()
    if not path.exists():
        return config
    try:
        with path.open() as fh:
            config.parse(fh)
    except (OSError, Exception) as exc:  # paramiko raises bare Exceptions for bad syntax
        raise InventoryError(f"cannot read SSH config {path}: {exc}") from exc
    return config


def resolve(
    words: list[str],
    ssh_config: Path | None = None,
    default_user: str | None = None,
) -> Inventory:
    """Turn NODES words into NodeSpecs; the SSH config supplies HostName/User/Port/keys."""
    if not words:
        raise InventoryError('no nodes given (NODES="host1 host2 ...")')
    return resolve_args((parse_node_arg(word) for word in words), ssh_config, default_user)


def resolve_args(
    args: Iterable[NodeArg],
    ssh_config: Path | None = None,
    default_user: str | None = None,
) -> Inventory:
    """NodeArgs to NodeSpecs: what an arg says wins over the SSH config, which wins over
    the defaults (port 22, the local user, ~/.ssh/known_hosts)."""
    config_path = ssh_config if ssh_config is not None else DEFAULT_SSH_CONFIG
    config = load_ssh_config(config_path)
    nodes = [_node_spec(arg, config, default_user) for arg in args]
    check_unique(nodes)
    return Inventory(nodes=tuple(nodes), ssh_config=str(config_path.expanduser()))


def _node_spec(arg: NodeArg, config: paramiko.SSHConfig, default_user: str | None) -> NodeSpec:
    entry = config.lookup(arg.host)
    identities = [arg.identity_file] if arg.identity_file else entry.get("identityfile") or []
    known = entry.get("userknownhostsfile", str(DEFAULT_KNOWN_HOSTS)).split()[0]
    try:
        port = arg.port or int(entry.get("port", 22))
    except ValueError as exc:
        raise InventoryError(f"bad Port in SSH config: {entry.get('port')}", arg.host) from exc
    return NodeSpec(
        name=arg.host,
        host=arg.hostname or entry.get("hostname", arg.host),
        user=arg.user or entry.get("user") or default_user or getpass.getuser(),
        port=port,
        identity_file=str(Path(identities[0]).expanduser()) if identities else None,
        known_hosts=str(Path(known).expanduser()),
        flavor=arg.flavor,
    )
