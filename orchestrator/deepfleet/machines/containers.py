"""Containers: create, start, inspect and remove one node container from a ContainerSpec."""

from __future__ import annotations

import time

from docker.errors import APIError, NotFound
from docker.types import DeviceRequest, Mount, Ulimit

from deepfleet.errors import ContainerError
from deepfleet.machines.connect import docker_cause
from deepfleet.machines.hostprobe import explain_start_error
from deepfleet.planning.compose import ContainerSpec

CLUSTER_LABEL = "deepfleet.cluster"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key.pub"


def run_kwargs(spec: ContainerSpec) -> dict:
    """docker-py containers.create arguments for the spec (the one place that maps them)."""
    kwargs: dict = {
        "image": spec.image,
        "name": spec.name,
        "detach": True,
        "environment": dict(spec.environment),
        "labels": dict(spec.labels),
        "mounts": [
            Mount(m.target, m.source, type=m.kind, read_only=m.read_only) for m in spec.mounts
        ],
        "ulimits": [Ulimit(name=n, soft=s, hard=h) for n, s, h in spec.ulimits],
    }
    optional = {
        "command": list(spec.command) if spec.command else None,
        "entrypoint": list(spec.entrypoint) if spec.entrypoint else None,
        "network_mode": spec.network_mode,
        "ipc_mode": spec.ipc_mode,
        "shm_size": spec.shm_size,
        "devices": [d if d.count(":") else f"{d}:{d}:rwm" for d in spec.devices] or None,
        "group_add": list(spec.group_add) or None,
        "security_opt": list(spec.security_opt) or None,
        "cap_add": list(spec.cap_add) or None,
        "cap_drop": list(spec.cap_drop) or None,
        "working_dir": spec.working_dir,
        "user": spec.user,
        "privileged": spec.privileged or None,
        "cgroupns": spec.cgroupns,
        "restart_policy": {"Name": spec.restart} if spec.restart and spec.restart != "no" else None,
        "device_requests": [
            DeviceRequest(
                driver=r.driver,
                count=r.count if not r.device_ids else 0,
                device_ids=list(r.device_ids) or None,
                capabilities=[list(r.capabilities)],
            )
            for r in spec.device_requests
        ]
        or None,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    return kwargs


def remove_if_present(client, name: str, node: str, cluster: str | None = None) -> bool:
    """Remove the named container. With `cluster`, refuse one that belongs to another cluster."""
    try:
        container = client.containers.get(name)
    except NotFound:
        return False
    owner = container.labels.get(CLUSTER_LABEL)
    if cluster is not None and owner != cluster:
        raise ContainerError(
            f"a container named {name} already exists there (cluster {owner or 'unknown'}); "
            "remove it with `deepfleet down` from the machine that made it, or `docker rm -f`",
            node,
        )
    container.remove(force=True)
    return True


def create_and_start(client, spec: ContainerSpec, node: str):
    try:
        container = client.containers.create(**run_kwargs(spec))
    except APIError as exc:
        raise ContainerError(f"cannot create {spec.name}: {exc.explanation or exc}", node) from exc
    try:
        container.start()
    except APIError as exc:
        container.remove(force=True)
        cause = explain_start_error(str(exc.explanation or exc))
        raise ContainerError(f"cannot start {spec.name}: {cause}", node) from exc
    return container


def start_existing(container, node: str) -> None:
    """Start a stopped node container again (its host keys survive in its filesystem)."""
    try:
        container.start()
    except APIError as exc:
        cause = explain_start_error(str(exc.explanation or exc))
        raise ContainerError(f"cannot start {container.name} again: {cause}", node) from exc


def exec_text(container, argv: list[str], node: str, env: dict | None = None) -> str:
    """Run argv in the container; its stdout, or ContainerError with its last output line.

    Read with a progress-based timeout (see execstream): a long silent command is fine,
    a machine that stops answering is not.
    """
    from deepfleet.machines.execstream import (
        run_collect,  # execstream needs connect, which needs nothing here
    )

    try:
        code, stdout, stderr_text = run_collect(container.client, container.id, argv, node, env)
    except APIError as exc:
        raise ContainerError(docker_cause(exc, container.name), node) from exc
    if code != 0:
        stderr = stderr_text.strip().splitlines()
        last = stderr[-1] if stderr else stdout.strip()[-200:]
        shown = " ".join(argv) if len(" ".join(argv)) < 80 else " ".join(argv[:3]) + " ..."
        error = ContainerError(f"`{shown}` exited {code}: {last}", node)
        error.cause = last
        raise error
    return stdout


def wait_host_key(container, node: str, timeout: float = 30.0) -> str:
    """The container sshd's host key, read over the Docker API (a channel already trusted)."""
    deadline = time.monotonic() + timeout
    while True:
        container.reload()
        if container.status != "running":
            logs = container.logs(tail=5).decode(errors="replace").strip().replace("\n", " | ")
            raise ContainerError(f"node container stopped ({container.status}): {logs}", node)
        code, out = container.exec_run(["cat", HOST_KEY])
        if code == 0 and out.strip():
            return " ".join(out.decode().split()[:2])
        if time.monotonic() > deadline:
            raise ContainerError(f"sshd made no host key in {timeout:.0f}s", node)
        time.sleep(0.5)


def state_of(client, name: str) -> str:
    try:
        return client.containers.get(name).status
    except NotFound:
        return "missing"
