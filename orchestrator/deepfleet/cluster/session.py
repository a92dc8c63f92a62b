"""A saved cluster brought back to life: connections to its machines, each node's container
checked and, when it exited or went missing, started again or made anew from the saved
options (what `train`, `infer` and `serve` open before they run anything), and the helpers
`up` and `down` share: one error for several machines, the options `up` was given.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import docker

from deepfleet.errors import ContainerError, DeepfleetError, PlanError
from deepfleet.images import published, relay
from deepfleet.images.manifest import read_manifest
from deepfleet.inventory.nodes import NodeSpec
from deepfleet.layout import CLUSTER_KEY, CONTAINER_NAME, RUN_DIR, SSH_DIR
from deepfleet.machines import containers, keys, transfer
from deepfleet.machines.connect import connect, fan_out
from deepfleet.machines.state import ClusterState, NodeState, StateStore
from deepfleet.planning import compose, flavors, hostfile, reports
from deepfleet.planning.plan import ClusterPlan, plan_cluster


class ClusterErrors(DeepfleetError):
    """Several nodes failed; one line each."""

    def __init__(self, errors: dict[str, DeepfleetError]):
        self.errors = errors
        super().__init__("; ".join(e.one_line() for e in errors.values()))

    def lines(self) -> list[str]:
        return [e.one_line() for e in self.errors.values()]


def raise_if(errors: dict[str, DeepfleetError]) -> None:
    if len(errors) == 1:
        raise next(iter(errors.values()))
    if errors:
        raise ClusterErrors(errors)


@dataclass
class UpOptions:
    image: str | None = None  # default: deepfleet/<flavor>:latest
    default_flavor: str | None = None  # None: each node's from what the machine has
    compose_overrides: list[Path] = field(default_factory=list)
    cpu_slots: int = 1
    slots: dict[str, int] = field(default_factory=dict)
    pull: str = "auto"
    timeout: float = 15.0
    use_relay: bool = True  # machines pass the image on to each other (relay.py)
    relay_port: int = relay.RELAY_PORT


def image_for(flavor: str, opts: UpOptions) -> str:
    if opts.image == published.PUBLISHED:  # the newest pushed image of this manifest
        return published.newest(flavor, read_manifest())["ref"]
    return opts.image or flavors.get(flavor).image


def container_spec(node: NodeSpec, flavor: str, cluster: str, pubkey: str, opts: UpOptions):
    image = image_for(flavor, opts)
    # compose interpolates from the operator's environment, deepfleet's own values over it
    env = {
        **os.environ,
        "DEEPFLEET_IMAGE": image,
        "DEEPFLEET_CONTAINER": CONTAINER_NAME,
        "DEEPFLEET_CLUSTER": cluster,
        "DEEPFLEET_NODE": node.name,
        "DEEPFLEET_AUTHORIZED_KEY": pubkey,
    }
    return compose.node_spec(flavor, env, opts.compose_overrides)


class Session:
    """Live connections to the nodes of a saved cluster."""

    def __init__(self, state: ClusterState, clients: dict, store: StateStore | None = None):
        self.state = state
        self.clients = clients
        self.store = store  # where the state is saved (what a job's link refresh records)

    def container(self, name: str):
        node = self.node_state(name)
        try:
            return self.clients[name].containers.get(node.container_id or node.container_name)
        except docker.errors.NotFound as exc:
            raise ContainerError(
                f"its node container {node.container_name} is gone; `deepfleet up` again "
                "(or run a job: train and infer make it anew)",
                name,
            ) from exc

    def node_state(self, name: str) -> NodeState:
        for node in self.state.nodes:
            if node.spec.name == name:
                return node
        raise DeepfleetError(f"no node {name!r} in the cluster")

    @property
    def master(self) -> str:
        return self.state.nodes[0].spec.name

    def container_ids(self) -> dict[str, str]:
        """Every node's container, by node name (what the stop and watch helpers take)."""
        return {n.spec.name: n.container_id for n in self.state.nodes}

    def plan(self, **overrides) -> ClusterPlan:
        return plan_cluster(
            self.state.inventory,
            self.state.reports(),
            cpu_slots=overrides.get("cpu_slots", self.state.cpu_slots),
            slots=overrides.get("slots", self.state.slots),
            backend=overrides.get("backend"),
            mixed=overrides.get("mixed", False),
        )

    def close(self) -> None:
        for client in self.clients.values():
            try:
                client.close()
            except Exception:
                pass


def open_session(
    store: StateStore,
    timeout: float = 15.0,
    heal: bool = False,
    out=sys.stdout,
    refresh: bool = False,
) -> Session:
    """Connections to every node; with `heal`, node containers that stopped are started
    again and missing ones made anew (their host keys pinned again everywhere); with
    `refresh`, every node's detect report is taken again (a job plans from what the
    machines have now: a memory limit or a GPU may have changed since `up`)."""
    state = store.load()
    clients, errors = fan_out(
        state.inventory.nodes, lambda n: connect(n, timeout), lambda n: n.name
    )
    if errors:
        for client in clients.values():
            client.close()
        raise_if(errors)
    session = Session(state, clients, store)
    try:
        if heal:
            heal_containers(session, store, out)
        if refresh:
            collect_reports(state, clients, store)
    except BaseException:
        session.close()
        raise
    return session


def heal_containers(session: Session, store: StateStore, out=sys.stdout) -> list[str]:
    """Start stopped node containers, recreate missing ones; the names of those it healed.

    A machine that rebooted after `up` comes back with its container exited (the spec's
    restart policy is "no"); someone may have removed it. Either way the cluster's key and
    spec are in the state, so the container is made as `up` made it and wired again.
    """
    state = session.state
    key = keys.read(store.key_path)

    def heal(node: NodeState) -> str | None:
        name = node.spec.name
        client = session.clients[name]
        status = containers.state_of(client, node.container_name or CONTAINER_NAME)
        if status == "running":
            return None
        if status == "paused":
            raise ContainerError(
                f"its node container {node.container_name} is paused (frozen); "
                f"`docker unpause {node.container_name}` on that machine",
                name,
            )
        if status == "missing":
            opts = saved_options(state)
            spec = container_spec(node.spec, node.flavor, state.cluster, key.public_openssh, opts)
            container = containers.create_and_start(client, spec, name)
            node.container_id, node.container_name = container.id, spec.name
        else:  # exited, created, dead: start the one that is there
            container = client.containers.get(node.container_name)
            containers.start_existing(container, name)
            node.container_id = container.id
        node.host_key = containers.wait_host_key(container, name)
        return status

    results, errors = fan_out(state.nodes, heal, lambda n: n.spec.name)
    healed = {name: status for name, status in results.items() if status}
    if healed:
        store.save(state)  # the new container IDs and host keys, before anything else fails
    raise_if(errors)
    if not healed:
        return []
    for name, status in healed.items():
        done = "made it anew" if status == "missing" else "started it again"
        say(out, f"[{name}] node container was {status}; {done}")
    clients = session.clients
    plan = session.plan()
    wire_ssh(state, clients, plan, key)
    store.save(state)
    return sorted(healed)


def saved_options(state: ClusterState) -> UpOptions:
    return UpOptions(
        image=state.image or None,
        compose_overrides=[Path(p) for p in state.compose_overrides],
        cpu_slots=state.cpu_slots,
        slots=dict(state.slots),
    )


def say(out, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def collect_reports(state, clients, store) -> ClusterPlan:
    def detect(node: NodeState):
        container = clients[node.spec.name].containers.get(node.container_id)
        text = containers.exec_text(container, ["detect", "--json"], node.spec.name)
        reports.parse(text, node.spec.name)  # validate before keeping
        return text

    results, errors = fan_out(state.nodes, detect, lambda n: n.spec.name)
    raise_if(errors)

    for node in state.nodes:
        node.report = json.loads(results[node.spec.name])
    store.save(state)
    return plan_cluster(
        state.inventory, state.reports(), cpu_slots=state.cpu_slots, slots=state.slots
    )


def wire_ssh(state: ClusterState, clients: dict, plan: ClusterPlan, key: keys.KeyPair) -> None:
    """Give every container the hostfile, env and pinned host keys; the master the key."""
    known = "".join(
        keys.known_hosts_line(p.address, plan.ssh_port, n.host_key) + "\n"
        for p, n in zip(plan.nodes, state.nodes, strict=True)
    )
    ssh_config = hostfile.render_ssh_config(plan, CLUSTER_KEY, f"{SSH_DIR}/known_hosts")
    run_files = {
        "hostfile": (hostfile.render_hostfile(plan).encode(), 0o644),
    }
    env_file = hostfile.render_deepspeed_env(plan.env).encode()

    def wire(node: NodeState):
        name = node.spec.name
        container = clients[name].containers.get(node.container_id)
        ssh_files = {"known_hosts": (known.encode(), 0o644), "config": (ssh_config.encode(), 0o600)}
        if name == state.nodes[0].spec.name:
            ssh_files["deepfleet_cluster"] = (key.private_openssh, 0o600)
        transfer.put_files(container, SSH_DIR, ssh_files, name)
        transfer.put_files(container, RUN_DIR, run_files, name)
        transfer.put_files(container, "/root", {".deepspeed_env": (env_file, 0o644)}, name)

    _, errors = fan_out(state.nodes, wire, lambda n: n.spec.name)
    raise_if(errors)
    check_ssh(state, clients, plan)


def check_ssh(state: ClusterState, clients: dict, plan: ClusterPlan) -> None:
    """From the master, ssh into every node the way pdsh will; names the node that fails.
    All at once: one after the other, a machine's key exchanges added up to seconds."""
    master = clients[state.nodes[0].spec.name].containers.get(state.nodes[0].container_id)

    def check(node) -> None:
        code, out = master.exec_run(["ssh", node.address, "true"], demux=True)
        if code != 0:
            err = (out[1] or b"").decode(errors="replace").strip().splitlines()
            raise PlanError(
                f"master cannot ssh to {node.address}:{plan.ssh_port}: "
                f"{err[-1] if err else f'exit {code}'}",
                node.name,
            )

    _, errors = fan_out(plan.nodes, check, lambda n: n.name)
    raise_if(errors)
