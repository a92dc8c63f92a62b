"""Hostfile: the DeepSpeed launcher's files rendered from a ClusterPlan."""

from __future__ import annotations

from collections.abc import Mapping

from deepfleet.errors import PlanError
from deepfleet.planning.plan import ClusterPlan


def render_hostfile(plan: ClusterPlan) -> str:
    """`address slots=N` per node, master first (DeepSpeed's rank order follows the file).

    A node whose ranks skip some GPUs lists every device up to its last one; the
    launcher's --include (launch.include_filter) then picks the ones it uses."""
    return "".join(f"{node.address} slots={device_count(node)}\n" for node in plan.nodes)


def device_count(node) -> int:
    return max(node.devices) + 1 if node.devices else node.slots


def render_deepspeed_env(env: Mapping[str, str]) -> str:
    """.deepspeed_env: the launcher exports each KEY=VALUE line on every node."""
    lines = []
    for key, value in env.items():
        if not key.isidentifier() or "\n" in value:
            raise PlanError(f"cannot pass {key!r} through .deepspeed_env")
        lines.append(f"{key}={value}\n")
    return "".join(lines)


def render_ssh_config(plan: ClusterPlan, identity: str, known_hosts: str) -> str:
    """The master's ~/.ssh/config: the launcher's ssh/pdsh dial every node on the node
    sshd port with the cluster key, checking host keys against the pinned file."""
    return (
        "Host *\n"
        f"  Port {plan.ssh_port}\n"
        "  User root\n"
        f"  IdentityFile {identity}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known_hosts}\n"
        "  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n"
        "  LogLevel ERROR\n"
        # the launcher's hops notice a node that stopped answering (30 s), and a NAT or
        # firewall on the way keeps their idle state
        "  ConnectTimeout 10\n"
        "  ServerAliveInterval 5\n"
        "  ServerAliveCountMax 6\n"
    )
