"""The executor of `up`: applies what inventory, compose and the plans decided, machine by
machine, in parallel. It records each container in the state file as soon as it exists,
and undoes everything it made when any step fails, so a failed `up` leaves nothing behind.
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import replace

import docker

from deepfleet import progress
from deepfleet.cluster import upplan
from deepfleet.cluster.session import (
    UpOptions,
    collect_reports,
    container_spec,
    image_for,
    raise_if,
    say,
    wire_ssh,
)
from deepfleet.errors import ContainerError, DeepfleetError
from deepfleet.images import delivery, fanout, relay
from deepfleet.inventory.nodes import Inventory
from deepfleet.layout import CONTAINER_NAME
from deepfleet.machines import containers, hostprobe, keys, links
from deepfleet.machines.connect import connect, fan_out, run_host
from deepfleet.machines.state import ClusterState, NodeState, StateStore
from deepfleet.planning.plan import left_out_lines


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
        raise_if(errors)
        return plan_up(state, clients, opts, upplan.NEW_KEY, out)
    finally:
        for client in clients.values():
            client.close()


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
        say(out, f"deepfleet: cluster {cluster}: connecting to {len(inventory.nodes)} nodes")
        clients, errors = fan_out(
            inventory.nodes, lambda n: connect(n, opts.timeout), lambda n: n.name
        )
        raise_if(errors)
        up_plan = plan_up(state, clients, opts, key.public_openssh, out)
        _put_images(up_plan.images, state, clients, opts, out)
        _start_containers(up_plan, state, clients, store, out)
        plan = collect_reports(state, clients, store)
        wire_ssh(state, clients, plan, key)
        store.save(state)
        say(
            out,
            f"deepfleet: cluster {cluster} is up: {plan.world_size} slots, backend {plan.backend}",
        )
        # the status table that follows shows the machines; a machine left out says why here
        for line in left_out_lines(plan):
            say(out, line)
        _measure_links(state, clients, store, out)
        return state
    except BaseException:
        _undo(state, clients, store, out)
        raise
    finally:
        for client in clients.values():
            client.close()


def _measure_links(state: ClusterState, clients: dict, store: StateStore, out) -> None:
    """The link table, recorded; the cluster is up whatever it says: a warning line at most."""
    try:
        links.refresh(state, clients, store, out)
    except Exception as exc:
        say(out, f"deepfleet: warning: links not measured: {exc}")


def _choose_flavors(state: ClusterState, clients: dict, opts: UpOptions, out) -> None:
    """Each node's flavor from its machine's devices, unless the user named one."""

    cuda_image = image_for("cuda", opts)
    # read here, before anything is shipped: a driver too old for it fails now, not after
    # gigabytes have been streamed
    image_cuda = _local_labels(cuda_image).get(delivery.CUDA_LABEL)

    def choose(node: NodeState):
        name = node.spec.name
        facts = hostprobe.probe(clients[name], name, run_host)
        flavor = hostprobe.choose_flavor(facts, node.spec.flavor or opts.default_flavor)
        found = hostprobe.problems(facts, flavor, cuda_image, image_cuda)
        if found:
            raise ContainerError("; ".join(found), name)
        return flavor

    results, errors = fan_out(state.nodes, choose, lambda n: n.spec.name)
    raise_if(errors)
    for node in state.nodes:
        node.flavor = results[node.spec.name]
    say(out, "deepfleet: flavors: " + ", ".join(f"{n.spec.name} {n.flavor}" for n in state.nodes))


def _local_labels(ref: str) -> dict[str, str]:
    """Labels of an image in this machine's engine; {} without the image or the engine."""
    try:
        local = docker.from_env(timeout=30)
    except docker.errors.DockerException:
        return {}
    try:
        return delivery.local_labels(local, ref)
    finally:
        local.close()


def plan_up(state: ClusterState, clients: dict, opts: UpOptions, pubkey: str, out):
    """Probe the machines (devices, the images they hold: reads only) and decide what each
    gets: upplan's plan, which `up` executes and `--dry-run` prints."""
    _choose_flavors(state, clients, opts, out)
    refs = {n.spec.name: image_for(n.flavor, opts) for n in state.nodes}
    have, errors = fan_out(
        state.nodes, lambda n: delivery.node_image_id(clients[n.spec.name], refs[n.spec.name]),
        lambda n: n.spec.name,
    )  # fmt: skip
    raise_if(errors)
    local = docker.from_env(timeout=600)
    try:
        image_plan = fanout.plan_images(
            refs,
            {ref: delivery.local_image_id(local, ref) for ref in set(refs.values())},
            have,
            {n.spec.name: n.spec.host for n in state.nodes},
            opts.pull,
            relay_ready=delivery.local_image_id(local, relay.RELAY_IMAGE) is not None,
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
            say(out, plan.describe())
        board = progress.Board(out)
        try:
            outcome = fanout.put_images(local, clients, plan, lambda line: say(out, line), board)
        finally:
            board.close()
        raise_if(outcome.errors)
        by_name = {n.spec.name: n for n in state.nodes}
        for name, result in outcome.results.items():
            by_name[name].image_id = result.image_id
            say(out, f"[{name}] image {result.describe()}")
        if outcome.sent_here:
            moved = sum(r.bytes_received or r.bytes_sent for r in outcome.results.values())
            say(
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
    raise_if(errors)
    say(out, f"deepfleet: container {CONTAINER_NAME} running on {', '.join(results)}")


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
        say(
            out,
            f"deepfleet: warning: {name}: could not remove its node container "
            f"({exc.one_line()}); `deepfleet down` will finish when it answers",
        )
