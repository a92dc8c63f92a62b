"""The executor: applies what inventory/compose/plan decided, node by node, in parallel.

`up` records each container in the state file as soon as it exists, and undoes
everything it made when any step fails, so a failed `up` leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import docker

from . import (
    compose,
    containers,
    fanout,
    flavors,
    hostfile,
    hostprobe,
    images,
    keys,
    progress,
    published,
    relay,
    reports,
    transfer,
    upplan,
)
from .connect import by_outcome, connect, fan_out, run_host
from .errors import ContainerError, DeepfleetError, PlanError
from .inventory import Inventory, NodeSpec
from .layout import CLUSTER_KEY, CONTAINER_NAME, RUN_DIR, SSH_DIR
from .manifest import read_manifest
from .plan import ClusterPlan, left_out_lines, plan_cluster
from .state import ClusterState, NodeState, StateStore


class ClusterErrors(DeepfleetError):
    """Several nodes failed; one line each."""

    def __init__(self, errors: dict[str, DeepfleetError]):
        self.errors = errors
        super().__init__("; ".join(e.one_line() for e in errors.values()))

    def lines(self) -> list[str]:
        return [e.one_line() for e in self.errors.values()]


def _raise_if(errors: dict[str, DeepfleetError]) -> None:
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


def dry_run(inventory: Inventory, opts: UpOptions, out=sys.stdout) -> upplan.UpPlan:
    """The plan `up` would execute on these machines, after probing them (what each has,
    which image it holds); nothing is changed anywhere."""
    state = ClusterState(
        cluster=upplan.NEW_CLUSTER, image=opts.image or "",
        nodes=[NodeState(spec=n, flavor="") for n in inventory.nodes],
        ssh_config=inventory.ssh_config,
    )  # fmt: skip
    clients, errors = fan_out(inventory.nodes, lambda n: connect(n, opts.timeout), lambda n: n.name)
    try:
        _raise_if(errors)
        return plan_up(state, clients, opts, upplan.NEW_KEY, out)
    finally:
        for client in clients.values():
            client.close()


class Session:
    """Live connections to the nodes of a saved cluster."""

    def __init__(self, state: ClusterState, clients: dict):
        self.state = state
        self.clients = clients

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
        _raise_if(errors)
    session = Session(state, clients)
    try:
        if heal:
            heal_containers(session, store, out)
        if refresh:
            _collect_reports(state, clients, store)
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
            opts = _saved_options(state)
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
    _raise_if(errors)
    if not healed:
        return []
    for name, status in healed.items():
        done = "made it anew" if status == "missing" else "started it again"
        _log(out, f"[{name}] node container was {status}; {done}")
    clients = session.clients
    plan = session.plan()
    _wire_ssh(state, clients, plan, key)
    store.save(state)
    return sorted(healed)


def _saved_options(state: ClusterState) -> UpOptions:
    return UpOptions(
        image=state.image or None,
        compose_overrides=[Path(p) for p in state.compose_overrides],
        cpu_slots=state.cpu_slots,
        slots=dict(state.slots),
    )


def _log(out, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def up(inventory: Inventory, store: StateStore, opts: UpOptions, out=sys.stdout) -> ClusterState:
    if store.exists():
        raise DeepfleetError(
            f"a cluster is already up (state in {store.dir}); `deepfleet down` first"
        )
    cluster = secrets.token_hex(4)
    key = keys.generate(f"deepfleet-{cluster}")
    store.dir.mkdir(parents=True, exist_ok=True)
    store.dir.chmod(0o700)
    keys.write_private(store.key_path, key)
    state = ClusterState(
        cluster=cluster,
        image=opts.image or "",
        nodes=[NodeState(spec=n, flavor="") for n in inventory.nodes],
        ssh_config=inventory.ssh_config,
        cpu_slots=opts.cpu_slots,
        slots=dict(opts.slots),
        compose_overrides=[str(p) for p in opts.compose_overrides],
    )
    clients: dict = {}
    try:
        _log(out, f"deepfleet: cluster {cluster}: connecting to {len(inventory.nodes)} nodes")
        clients, errors = fan_out(
            inventory.nodes, lambda n: connect(n, opts.timeout), lambda n: n.name
        )
        _raise_if(errors)
        up_plan = plan_up(state, clients, opts, key.public_openssh, out)
        _put_images(up_plan.images, state, clients, opts, out)
        _start_containers(up_plan, state, clients, store, out)
        plan = _collect_reports(state, clients, store)
        _wire_ssh(state, clients, plan, key)
        store.save(state)
        _log(
            out,
            f"deepfleet: cluster {cluster} is up: {plan.world_size} slots, backend {plan.backend}",
        )
        # the status table that follows shows the machines; a machine left out says why here
        for line in left_out_lines(plan):
            _log(out, line)
        return state
    except BaseException:
        _undo(state, clients, store, out)
        raise
    finally:
        for client in clients.values():
            client.close()


def _choose_flavors(state: ClusterState, clients: dict, opts: UpOptions, out) -> None:
    """Each node's flavor from its machine's devices, unless the user named one."""

    cuda_image = image_for("cuda", opts)
    # read here, before anything is shipped: a driver too old for it fails now, not after
    # gigabytes have been streamed
    image_cuda = _local_labels(cuda_image).get(images.CUDA_LABEL)

    def choose(node: NodeState):
        name = node.spec.name
        facts = hostprobe.probe(clients[name], name, run_host)
        flavor = hostprobe.choose_flavor(facts, node.spec.flavor or opts.default_flavor)
        found = hostprobe.problems(facts, flavor, cuda_image, image_cuda)
        if found:
            raise ContainerError("; ".join(found), name)
        return flavor

    results, errors = fan_out(state.nodes, choose, lambda n: n.spec.name)
    _raise_if(errors)
    for node in state.nodes:
        node.flavor = results[node.spec.name]
    _log(out, "deepfleet: flavors: " + ", ".join(f"{n.spec.name} {n.flavor}" for n in state.nodes))


def _local_labels(ref: str) -> dict[str, str]:
    """Labels of an image in this machine's engine; {} without the image or the engine."""
    try:
        local = docker.from_env(timeout=30)
    except docker.errors.DockerException:
        return {}
    try:
        return images.local_labels(local, ref)
    finally:
        local.close()


def plan_up(state: ClusterState, clients: dict, opts: UpOptions, pubkey: str, out):
    """Probe the machines (devices, the images they hold: reads only) and decide what each
    gets: upplan's plan, which `up` executes and `--dry-run` prints."""
    _choose_flavors(state, clients, opts, out)
    refs = {n.spec.name: image_for(n.flavor, opts) for n in state.nodes}
    have, errors = fan_out(
        state.nodes, lambda n: images.node_image_id(clients[n.spec.name], refs[n.spec.name]),
        lambda n: n.spec.name,
    )  # fmt: skip
    _raise_if(errors)
    local = docker.from_env(timeout=600)
    try:
        image_plan = fanout.plan_images(
            refs,
            {ref: images.local_image_id(local, ref) for ref in set(refs.values())},
            have,
            {n.spec.name: n.spec.host for n in state.nodes},
            opts.pull,
            relay_ready=images.local_image_id(local, relay.RELAY_IMAGE) is not None,
            use_relay=opts.use_relay,
            port=opts.relay_port,
        )
    finally:
        local.close()
    specs = {
        n.spec.name: container_spec(n.spec, n.flavor, state.cluster, pubkey, opts)
        for n in state.nodes
    }
    flavors = {n.spec.name: n.flavor for n in state.nodes}
    return upplan.plan_up(state.inventory.nodes, flavors, specs, image_plan, state.cluster)


def _put_images(plan: fanout.ImagePlan, state: ClusterState, clients: dict, opts, out) -> None:
    local = docker.from_env(timeout=600)
    try:
        if plan.chains or plan.pull or plan.notes:  # what moves: one line each
            _log(out, plan.describe())
        board = progress.Board(out)
        try:
            outcome = fanout.put_images(local, clients, plan, lambda line: _log(out, line), board)
        finally:
            board.close()
        _raise_if(outcome.errors)
        by_name = {n.spec.name: n for n in state.nodes}
        for name, result in outcome.results.items():
            by_name[name].image_id = result.image_id
            _log(out, f"[{name}] image {result.describe()}")
        if outcome.sent_here:
            moved = sum(r.bytes_received or r.bytes_sent for r in outcome.results.values())
            _log(
                out,
                f"deepfleet: images: {outcome.sent_here / 1e6:.0f} MB sent from here, "
                f"{moved / 1e6:.0f} MB received by the machines",
            )
    finally:
        local.close()


def _start_containers(plan: upplan.UpPlan, state, clients, store, out) -> None:
    def start(node: NodeState):
        client = clients[node.spec.name]
        spec = plan.machine(node.spec.name).container
        if "@" in spec.image and node.image_id:
            # a digest reference exists only where it was pulled; a machine that took the
            # stream instead holds the same image ID under this machine's name for it
            spec = replace(spec, image=node.image_id)
        containers.remove_if_present(client, spec.name, node.spec.name, cluster=state.cluster)
        node.container_name = spec.name  # before create: an undo must look for it
        container = containers.create_and_start(client, spec, node.spec.name)
        node.container_id, node.container_name = container.id, spec.name
        node.host_key = containers.wait_host_key(container, node.spec.name)
        return container

    results, errors = fan_out(state.nodes, start, lambda n: n.spec.name)
    store.save(state)  # before raising: down must find whatever did start
    _raise_if(errors)
    _log(out, f"deepfleet: container {CONTAINER_NAME} running on {', '.join(results)}")


def _collect_reports(state, clients, store) -> ClusterPlan:
    def detect(node: NodeState):
        container = clients[node.spec.name].containers.get(node.container_id)
        text = containers.exec_text(container, ["detect", "--json"], node.spec.name)
        reports.parse(text, node.spec.name)  # validate before keeping
        return text

    results, errors = fan_out(state.nodes, detect, lambda n: n.spec.name)
    _raise_if(errors)

    for node in state.nodes:
        node.report = json.loads(results[node.spec.name])
    store.save(state)
    return plan_cluster(
        state.inventory, state.reports(), cpu_slots=state.cpu_slots, slots=state.slots
    )


def _wire_ssh(state: ClusterState, clients: dict, plan: ClusterPlan, key: keys.KeyPair) -> None:
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
    _raise_if(errors)
    _check_ssh(state, clients, plan)


def _check_ssh(state: ClusterState, clients: dict, plan: ClusterPlan) -> None:
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
    _raise_if(errors)


def _undo(state: ClusterState, clients: dict, store: StateStore, out) -> None:
    """Remove what a failed `up` made. A node whose container could not be removed stays
    in the state (with the key), so `deepfleet down` can finish the job later."""

    def remove(node: NodeState) -> None:
        client = clients.get(node.spec.name)
        if client is not None and node.container_name:
            containers.remove_if_present(
                client, node.container_name, node.spec.name, cluster=state.cluster
            )

    made = [n for n in state.nodes if n.container_name]
    _, errors = fan_out(made, remove, lambda n: n.spec.name)
    if not errors:
        store.remove()
        return
    state.nodes = [n for n in state.nodes if n.spec.name in errors]
    store.save(state)
    for name, exc in errors.items():
        _log(
            out,
            f"deepfleet: warning: {name}: could not remove its node container "
            f"({exc.one_line()}); `deepfleet down` will finish when it answers",
        )


def down(
    store: StateStore, volumes: bool = False, timeout: float = 15.0, out=sys.stdout
) -> list[str]:
    """Remove every container and the local state; returns warnings for nodes left behind."""
    state = store.load()
    warnings: list[str] = []

    def remove(node: NodeState):
        client = connect(node.spec, timeout)
        try:
            removed = containers.remove_if_present(
                client, node.container_name or CONTAINER_NAME, node.spec.name, cluster=state.cluster
            )
            if volumes:
                spec = compose.node_spec(node.flavor, {}, ())
                for mount in spec.mounts:
                    if mount.kind == "volume":
                        try:
                            client.volumes.get(mount.source).remove(force=True)
                        except docker.errors.NotFound:
                            pass
            return removed
        finally:
            client.close()

    results, errors = fan_out(state.nodes, remove, lambda n: n.spec.name)
    for outcome, names in by_outcome(results, {True: "removed", False: "was already gone"}):
        _log(out, f"deepfleet: container {outcome} on {', '.join(names)}")
    for name, exc in errors.items():
        warnings.append(
            f"{name}: not cleaned ({exc.one_line()}); its container may remain: "
            "`deepfleet down` again when it answers"
        )
    if errors:  # keep what is left to clean, and the key it may still need
        state.nodes = [n for n in state.nodes if n.spec.name in errors]
        store.save(state)
    else:
        store.remove()
    return warnings
