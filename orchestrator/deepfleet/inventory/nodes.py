"""Inventory: the machines, as the node list the user typed names them (resolved through
their SSH configuration by sshconfig).

A node is `[user@]host[:port]` or an alias from the SSH config (`Host lab1`), optionally
followed by `=flavor` to force an image flavor. Nothing here touches the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deepfleet.errors import InventoryError

FLAVORS = ("cpu", "cuda", "rocm")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class NodeSpec:
    name: str  # what the user typed (minus user/port/flavor); the key everywhere else
    host: str  # HostName to dial
    user: str
    port: int
    identity_file: str | None
    known_hosts: str
    flavor: str | None = None  # None: chosen from what the host has

    @property
    def docker_url(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Inventory:
    nodes: tuple[NodeSpec, ...]
    ssh_config: str | None

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise InventoryError(f"no node named {name!r} in this cluster")

    @property
    def master(self) -> NodeSpec:
        return self.nodes[0]


@dataclass(frozen=True)
class NodeArg:
    """One NODES word split into its parts, before the SSH config fills the gaps."""

    host: str
    user: str | None = None
    port: int | None = None
    flavor: str | None = None
    # no word sets these; a cluster file may, over the SSH config's HostName and IdentityFile
    hostname: str | None = None
    identity_file: str | None = None


def parse_node_arg(text: str) -> NodeArg:
    word = text.strip()
    if not word:
        raise InventoryError("empty node name")
    flavor = None
    if "=" in word:
        word, flavor = word.rsplit("=", 1)
        if flavor not in FLAVORS:
            raise InventoryError(
                f"unknown flavor {flavor!r}; use one of {', '.join(FLAVORS)}", text
            )
    user = None
    if "@" in word:
        user, word = word.rsplit("@", 1)
        if not user:
            raise InventoryError("empty user before '@'", text)
    port = None
    if word.startswith("["):  # [v6::addr]:port
        end = word.find("]")
        if end < 0:
            raise InventoryError("unclosed '[' in IPv6 address", text)
        host, rest = word[1:end], word[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise InventoryError("expected ':port' after ']'", text)
            port = _port(rest[1:], text)
    elif word.count(":") == 1:
        host, port_text = word.split(":")
        port = _port(port_text, text)
    elif word.count(":") > 1:
        host = word  # bare IPv6 address, no port
    else:
        host = word
    if not host or (":" not in host and not _NAME_RE.match(host)):
        raise InventoryError(f"{host!r} is not a host name or address", text)
    return NodeArg(host=host, user=user, port=port, flavor=flavor)


def _port(text: str, node: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InventoryError(f"port {text!r} is not a number from 1 to 65535", node)
    return int(text)


def check_unique(nodes: list[NodeSpec]) -> None:
    seen: dict[tuple[str, int], str] = {}
    names: set[str] = set()
    for node in nodes:
        if node.name in names:
            raise InventoryError("listed twice", node.name)
        names.add(node.name)
        key = (node.host, node.port)
        if key in seen:
            raise InventoryError(
                f"same machine as {seen[key]} ({node.host}:{node.port})", node.name
            )
        seen[key] = node.name
