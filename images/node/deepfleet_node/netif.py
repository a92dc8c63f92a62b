"""Which network interface a rank's collectives bind to.

gloo binds to whatever the machine's hostname resolves to. Debian and Ubuntu installers
map the hostname to 127.0.1.1 in /etc/hosts, and a host-networked container inherits that
file, so each rank advertises a loopback address and the others hang in connectFullMesh
("remote=[127.0.1.1]"). The interface that carries this machine's traffic to the master is
one the other nodes can reach: gloo (and NCCL's socket bootstrap) are pinned to it unless
the user chose an interface already.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import MutableMapping

SIOCGIFADDR = 0x8915
IFNAMSIZ = 16


def source_address(destination: str) -> str | None:
    """The local address the kernel would send from to reach destination.

    connect() on a UDP socket sends nothing; it only resolves the route.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((destination, 9))
            return sock.getsockname()[0]
    except OSError:
        return None


def ipv4_of(name: str) -> str | None:
    """An interface's (primary) IPv4 address, or None."""
    request = struct.pack("256s", name.encode()[: IFNAMSIZ - 1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            answer = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
        except OSError:
            return None
    return socket.inet_ntoa(answer[20:24])


def interface_of(address: str) -> str | None:
    for _, name in socket.if_nameindex():
        if ipv4_of(name) == address:
            return name
    return None


def pin_socket_interfaces(env: MutableMapping[str, str] = os.environ) -> str | None:
    """Set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the interface towards
    MASTER_ADDR; returns it, or None when the user chose one or none could be found."""
    if env.get("GLOO_SOCKET_IFNAME"):
        return None
    master = env.get("MASTER_ADDR")
    source = source_address(master) if master else None
    name = interface_of(source) if source else None
    if not name:
        return None
    env["GLOO_SOCKET_IFNAME"] = name
    env.setdefault("NCCL_SOCKET_IFNAME", f"={name}")  # '=': this interface, not a prefix
    return name
