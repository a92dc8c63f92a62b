"""netif: the interface a rank binds gloo/NCCL to, on this machine's real interfaces.

UDP connect() picks a route and sends nothing, so these touch no network.
"""

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "images" / "node"))

from deepfleet_node import netif  # noqa: E402


def own_addresses() -> dict[str, str]:
    found = {}
    for _, name in socket.if_nameindex():
        address = netif.ipv4_of(name)
        if address:
            found[name] = address
    return found


def test_loopback_is_found_by_its_address():
    assert netif.ipv4_of("lo") == "127.0.0.1"
    assert netif.interface_of("127.0.0.1") == "lo"
    assert netif.source_address("127.0.0.1") == "127.0.0.1"


def test_a_master_on_this_machine_pins_the_interface_holding_its_address():
    others = {n: a for n, a in own_addresses().items() if n != "lo"}
    if not others:
        pytest.skip("this machine has no IPv4 interface besides lo")
    name, address = sorted(others.items())[0]
    env = {"MASTER_ADDR": address}
    assert netif.pin_socket_interfaces(env) == name
    assert env == {
        "MASTER_ADDR": address,
        "GLOO_SOCKET_IFNAME": name,
        "NCCL_SOCKET_IFNAME": f"={name}",
    }


def test_the_users_choice_wins():
    env = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "eth7"}
    assert netif.pin_socket_interfaces(env) is None
    assert env["GLOO_SOCKET_IFNAME"] == "eth7" and "NCCL_SOCKET_IFNAME" not in env
    env = {"MASTER_ADDR": "127.0.0.1", "NCCL_SOCKET_IFNAME": "ib0"}
    assert netif.pin_socket_interfaces(env) == "lo"
    assert env["NCCL_SOCKET_IFNAME"] == "ib0"


def test_nothing_is_set_without_a_usable_master():
    for env in ({}, {"MASTER_ADDR": ""}):
        assert netif.pin_socket_interfaces(env) is None
        assert "GLOO_SOCKET_IFNAME" not in env
    assert netif.ipv4_of("nosuchif0") is None
    assert netif.interface_of("192.0.2.1") is None
