"""`down`: every container, key and state file `up` made, removed; a machine that does not
answer keeps its place in the state so a later `down` finishes the job."""

from __future__ import annotations

import sys

import docker

from deepfleet.cluster.session import say
from deepfleet.layout import CONTAINER_NAME
from deepfleet.machines import containers
from deepfleet.machines.connect import by_outcome, connect, fan_out
from deepfleet.machines.state import NodeState, StateStore
from deepfleet.planning import compose


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
        say(out, f"deepfleet: container {outcome} on {', '.join(names)}")
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
