"""Connect: one docker-py client per node, over SSH, with pinned host keys.

docker-py's own SSH transport reads only ~/.ssh/config and ~/.ssh/known_hosts; deepfleet
needs the user's chosen config and key files and a connect timeout, so the adapter is
built here from the NodeSpec. The transport itself (docker system dial-stdio over a
paramiko channel) is docker-py's.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import docker
import paramiko
import requests
from docker.transport.sshconn import SSHConnection, SSHConnectionPool, SSHHTTPAdapter

from deepfleet.errors import ConnectError, DeepfleetError
from deepfleet.inventory.nodes import NodeSpec

# paramiko logs refused channels (handled below) at ERROR; the CLI reports real failures.
logging.getLogger("paramiko").setLevel(logging.CRITICAL)

# How long a long operation (an image load, a copy, a job's output) may go without any
# sign of progress before it fails naming its node; `--stall-timeout` sets it.
STALL_ENV = "DEEPFLEET_STALL_TIMEOUT"
DEFAULT_STALL = 120.0
# SSH keepalives: a NAT or firewall on the way keeps an idle connection's state, and a
# peer that vanished is noticed by the transport.
KEEPALIVE_S = 15
# Quick API calls (inspect, create, exec of a short command) that get no answer in this
# long mean the machine is not answering.
API_TIMEOUT = 60.0

# docker 20.10 speaks 1.41; newer engines negotiate down to what docker-py knows.
_BOOT_API_VERSION = "1.41"
T = TypeVar("T")
R = TypeVar("R")


class _Connection(SSHConnection):
    """One HTTP connection = one SSH session running `docker system dial-stdio`."""

    def __init__(self, open_channel, timeout):
        super().__init__(None, timeout, "")
        self._open_channel = open_channel

    def connect(self):
        channel = self._open_channel()
        channel.settimeout(self.timeout)
        channel.exec_command("docker system dial-stdio")
        self.sock = channel


class _Pool(SSHConnectionPool):
    def __init__(self, open_channel, timeout, maxsize):
        super().__init__(ssh_client=None, timeout=timeout, maxsize=maxsize, host="")
        self._open_channel = open_channel

    def _new_conn(self):
        return _Connection(self._open_channel, self.timeout)


class PinnedSSHAdapter(SSHHTTPAdapter):
    """docker-py's SSH adapter, configured from a NodeSpec instead of ~/.ssh.

    sshd caps sessions per connection (MaxSessions, 10 by default) and docker-py's exec
    leaves some sessions open until the engine ends them, so when one SSH connection is
    full another is opened rather than failing the call.
    """

    def __init__(self, node: NodeSpec, timeout: float):
        self._node = node
        self._connect_timeout = timeout
        self._clients: list[paramiko.SSHClient] = []
        self._lock = threading.Lock()
        super().__init__(node.docker_url, timeout=max(timeout, 600))

    def _new_client(self) -> paramiko.SSHClient:
        node = self._node
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(node.known_hosts)
        except FileNotFoundError:
            pass  # RejectPolicy turns this into "host key unknown"
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        params = {
            "hostname": node.host,
            "port": node.port,
            "username": node.user,
            "timeout": self._connect_timeout,
            "banner_timeout": self._connect_timeout,
            "auth_timeout": self._connect_timeout,
        }
        if node.identity_file:
            params["key_filename"] = node.identity_file
        try:
            client.connect(**params)
        except BaseException:
            client.close()
            raise
        client.get_transport().set_keepalive(KEEPALIVE_S)
        return client

    def _create_paramiko_client(self, base_url):
        self.ssh_client = None  # connections come from _open_channel

    def _connect(self):
        self._clients.append(self._new_client())

    def _open_channel(self):
        with self._lock:
            for client in reversed(self._clients):
                transport = client.get_transport()
                if transport is None or not transport.is_active():
                    continue
                try:
                    return transport.open_session(timeout=self._connect_timeout)
                except paramiko.ChannelException:
                    continue  # this connection is at MaxSessions
            client = self._new_client()
            self._clients.append(client)
            return client.get_transport().open_session(timeout=self._connect_timeout)

    def run_host(self, command: str, timeout: float) -> tuple[int, str, str]:
        """Run a shell command on the node itself (not in a container) over SSH."""
        with self._lock:
            client = self._clients[-1] if self._clients else self._new_client()
        stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
        stdin.close()
        out, err = stdout.read(), stderr.read()
        code = stdout.channel.recv_exit_status()
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    def host_channel(self, command: str) -> paramiko.Channel:
        """A long-running shell command on the node's host: its stdin, stdout and stderr
        are the channel's, read and written as the caller goes."""
        channel = self._open_channel()
        channel.exec_command(command)
        return channel

    def get_connection(self, url, proxies=None):
        with self.pools.lock:
            pool = self.pools.get(url)
            if pool is None:
                pool = _Pool(self._open_channel, self.timeout, self.max_pool_size)
                self.pools[url] = pool
            return pool

    def close(self):
        super().close()
        for client in self._clients:
            client.close()
        self._clients.clear()


def stall_timeout() -> float:
    try:
        return max(1.0, float(os.environ.get(STALL_ENV, DEFAULT_STALL)))
    except ValueError:
        return DEFAULT_STALL


def _ssh_error(node: NodeSpec, exc: BaseException) -> ConnectError:
    where = f"{node.user}@{node.host}:{node.port}"
    if isinstance(exc, paramiko.BadHostKeyException):
        cause = f"host key of {where} does not match the one pinned in {node.known_hosts}"
    elif isinstance(exc, paramiko.AuthenticationException):
        cause = f"SSH authentication to {where} failed (key {node.identity_file or 'default'})"
    elif isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        cause = (
            f"host key of {where} is not in {node.known_hosts}; "
            f"check it and add it (ssh-keyscan -p {node.port} {node.host})"
        )
    elif isinstance(exc, (socket.timeout, TimeoutError)):
        cause = f"timed out connecting to {where}"
    elif isinstance(exc, (OSError, paramiko.SSHException)):
        cause = f"cannot reach {where}: {exc}"
    else:
        cause = f"{where}: {exc}"
    return ConnectError(cause, node.name)


def connect(node: NodeSpec, timeout: float = 15.0) -> docker.DockerClient:
    """A DockerClient for the node's engine; raises ConnectError naming node and cause."""
    try:
        adapter = PinnedSSHAdapter(node, timeout)
    except Exception as exc:  # paramiko raises many types; all are "cannot connect"
        raise _ssh_error(node, exc) from exc
    # An explicit version keeps APIClient from dialing its placeholder URL.
    api = docker.APIClient(
        base_url="unix:///var/run/docker.sock", version=_BOOT_API_VERSION, timeout=API_TIMEOUT
    )
    api.mount("http+docker://ssh", adapter)
    api.base_url = "http+docker://ssh"
    api._custom_adapter = adapter
    try:
        server = api.version(api_version=False)
    except Exception as exc:
        adapter.close()
        raise ConnectError(
            f"SSH works but the Docker engine did not answer (is docker installed and "
            f"running, and may {node.user} use it?): {first_line(exc)}",
            node.name,
        ) from exc
    api._version = min(
        server.get("ApiVersion", _BOOT_API_VERSION),
        docker.constants.DEFAULT_DOCKER_API_VERSION,
        key=_vkey,
    )
    client = docker.DockerClient.__new__(docker.DockerClient)
    client.api = api
    return client


def run_host(client: docker.DockerClient, command: str, timeout: float = 20.0):
    """(exit code, stdout, stderr) of a shell command on the node's host."""
    return client.api._custom_adapter.run_host(command, timeout)


def host_channel(client: docker.DockerClient, command: str) -> paramiko.Channel:
    """An SSH channel running `command` on the node's host (see PinnedSSHAdapter)."""
    return client.api._custom_adapter.host_channel(command)


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def docker_cause(exc: BaseException, container: str = "") -> str:
    """One line for an engine's refusal, without docker-py's URL and status text."""
    cause = engine_cause(exc)
    if cause:
        return cause
    text = str(getattr(exc, "explanation", None) or exc)
    status = getattr(exc, "status_code", None)
    name = container or "the node container"
    if "is paused" in text:
        return f"{name} is paused (frozen); `docker unpause {name}` on that machine"
    if "is not running" in text or status == 409:
        return f"{name} is not running; `deepfleet up` again (or run a job, which restarts it)"
    if status == 404 and ("container" in text.lower() or container):
        return f"{name} is gone; run a job (it makes the container anew) or `deepfleet up`"
    return " ".join(text.split())[:300]


def engine_cause(exc: BaseException) -> str | None:
    """One line for a call to an engine that did not come back (requests' own text names
    a local socket pool and a timeout, not the machine's state)."""
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return ("its Docker engine did not answer in time (busy, or held up by a frozen "
                "container; `docker ps` on that machine shows which)")  # fmt: skip
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "the connection to its Docker engine was lost (ssh or the engine went away)"
    return None


def first_line(exc: BaseException) -> str:
    cause = engine_cause(exc)
    if cause:
        return cause
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def fan_out(
    items: Iterable[T], fn: Callable[[T], R], key: Callable[[T], str], workers: int = 16
) -> tuple[dict[str, R], dict[str, DeepfleetError]]:
    """Run fn on every item in parallel; results and errors keyed by node name.

    Every node is tried even when one fails, so a single run reports every bad node.
    """
    items = list(items)
    results: dict[str, R] = {}
    errors: dict[str, DeepfleetError] = {}
    if not items:
        return results, errors
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = {key(item): pool.submit(fn, item) for item in items}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except DeepfleetError as exc:
                exc.node = exc.node or name
                errors[name] = exc
            except docker.errors.APIError as exc:
                errors[name] = DeepfleetError(docker_cause(exc), name)
            except Exception as exc:  # an unexpected failure still names its node
                errors[name] = DeepfleetError(first_line(exc), name)
    return results, errors


def by_outcome(results: dict[str, R], words: dict[R, str]) -> list[tuple[str, list[str]]]:
    """fan_out's results as (word, machines) per outcome, in words' order: one line
    per outcome reads the same for 2 machines or 20."""
    grouped = [
        (word, [n for n, r in results.items() if r == value]) for value, word in words.items()
    ]
    return [(word, names) for word, names in grouped if names]


def connect_all(nodes: Iterable[NodeSpec], timeout: float = 15.0):
    return fan_out(nodes, lambda n: connect(n, timeout), key=lambda n: n.name)
