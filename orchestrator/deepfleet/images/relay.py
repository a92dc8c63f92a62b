"""Relay: an image crosses each link once, from machine to machine.

Streaming from here sends the image N times over this machine's own link for N machines.
A relay sends it once, into the first machine, which loads it and passes every byte on to
the next as it arrives (here -> m1 -> m2 -> ...): N fresh machines take about as long as
one, and the bytes leaving here are about one image.

Each machine of a chain runs images/relay/relay.sh in a 2 MB busybox container
(RELAY_IMAGE, itself streamed to the machine directly) on the host's network, and the
host pipes the container's stdout into its own `docker load`. No registry, no engine
setting changed; the containers end with the transfer and are removed whatever happens.

A listening machine takes only a connection that opens with its secret: random, made here
for each hop of each transfer, and given to the hops over their SSH channels (never on a
command line). Anything else connecting to its port is closed before a byte reaches its
`docker load`, and named here ("refused ADDR: no secret"); the hop waits on for its
neighbour, and stops listening once the neighbour is in.

`Chain` is the plan (pure, printable); `run_chain` carries one out.
"""

from __future__ import annotations

import secrets
import shlex
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from docker.errors import DockerException, NotFound

from deepfleet.errors import ImageError
from deepfleet.images import delivery
from deepfleet.images.build import RELAY_TAG
from deepfleet.layout import RELAY_PORT
from deepfleet.machines.connect import host_channel
from deepfleet.progress import Counted

RELAY_IMAGE = RELAY_TAG
RELAY_CONTAINER = "deepfleet-relay"
# a machine's relay container starting, opening its port and reaching the next machine
READY_TIMEOUT = 60.0
SHOW_REFUSED = 3  # lines for connections a hop refused: a flood of them is not a log


class ChainBroken(ImageError):
    """A hop could not start: `drop` is the machine to take out of the chain and stream to
    directly (the one that cannot be reached, or the one whose relay failed)."""

    def __init__(self, message: str, node: str, drop: str):
        super().__init__(message, node)
        self.drop = drop


@dataclass(frozen=True)
class Hop:
    node: str
    listen: int | None  # the port the machine before it connects to; None: fed from here
    next_address: str = ""
    next_port: int = 0

    def command(self) -> str:
        """The shell command the node's host runs for its part of the relay.

        The relay container reads and writes fifos in a host directory, not its attach
        stream: the bytes go here -> `cat` -> fifo -> relay -> fifo -> `docker load`.
        The first two lines of its stdin are the hop's secrets (`secret_lines`): what the
        machine before must send, what to send the next; they reach the container in its
        environment (`-e NAME` passes the value without writing it on the command line)."""
        first = self.listen is None
        run = ["docker", "run", "--rm", "-a", "stderr", "--network", "host",
               "--log-driver", "none", "--name", RELAY_CONTAINER, "-v", '"$d":/io',
               "-e", "RELAY_SECRET", "-e", "RELAY_NEXT_SECRET",
               "-e", "RELAY_OUT=/io/out", *(["-e", "RELAY_IN=/io/in"] if first else []),
               RELAY_IMAGE, "-" if first else str(self.listen)]  # fmt: skip
        if self.next_address:
            run += [shlex.quote(self.next_address), str(self.next_port)]
        fifos = ['"$d/out"', *(['"$d/in"'] if first else [])]
        lines = [
            # read byte by byte: the first hop's image follows on the same stdin
            "IFS= read -r RELAY_SECRET && IFS= read -r RELAY_NEXT_SECRET || exit 1",
            "export RELAY_SECRET RELAY_NEXT_SECRET",
            "d=$(mktemp -d) || exit 1",
            "trap 'rm -rf \"$d\"' EXIT",
            f"mkfifo {' '.join(fifos)} || exit 1",
            # when the relay ends, however, a load or cat still waiting to open its fifo
            # is let go (a read-write open never waits)
            "(" + " ".join(run) + "; " + "; ".join(f": <>{f}" for f in fifos) + ") &",
        ]
        if first:  # the load in the background: the foreground cat has the SSH stdin
            lines += ['docker load -i "$d/out" & load=$!', 'cat > "$d/in"', "wait $load"]
        else:
            lines += ['docker load -i "$d/out"']
        lines += ["status=$?", "wait", "exit $status"]
        script = "\n".join(lines)
        return "sh -c " + shlex.quote(script)


@dataclass(frozen=True)
class Chain:
    """Machines the image passes through in order, fed once from here."""

    nodes: tuple[str, ...]
    addresses: Mapping[str, str] = field(default_factory=dict)  # what the machines dial
    port: int = RELAY_PORT

    def hops(self) -> list[Hop]:
        hops = []
        for i, node in enumerate(self.nodes):
            nxt = self.nodes[i + 1] if i + 1 < len(self.nodes) else ""
            hops.append(
                Hop(
                    node,
                    None if i == 0 else self.port,
                    self.addresses[nxt] if nxt else "",
                    self.port if nxt else 0,
                )
            )
        return hops

    def without(self, node: str) -> Chain:
        return Chain(tuple(n for n in self.nodes if n != node), self.addresses, self.port)

    def describe(self) -> str:
        return " -> ".join(("here", *self.nodes))


def make_secrets(hops: list[Hop]) -> dict[str, tuple[str, str]]:
    """{node: (the secret its neighbour must send, the one it sends the next)}: one fresh
    random secret per listening hop, so a secret seen on one link opens no other."""
    made = [secrets.token_hex(16) if hop.listen is not None else "" for hop in hops]
    return {
        hop.node: (made[i], made[i + 1] if i + 1 < len(hops) else "") for i, hop in enumerate(hops)
    }


def secret_lines(expect: str, forward: str) -> bytes:
    """What a hop's command reads first from its stdin."""
    return f"{expect}\n{forward}\n".encode()


class _HopRun:
    """One hop's SSH channel, read by a thread: readiness, bytes passed, the end."""

    def __init__(
        self,
        hop: Hop,
        client,
        bar,
        stall: float,
        keys: tuple[str, str] = ("", ""),
        say: Callable[[str], None] | None = None,
    ):
        self.hop = hop
        self.bar = bar
        self.stall = stall
        self.say = say
        self.refused: list[str] = []  # the address of each connection not let in
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.failure = ""  # the relay's own "fail ..." line
        self.other: list[str] = []  # anything else on stderr: docker's own errors
        self.exit_code: int | None = None
        self.received = 0
        self.moved_at = time.monotonic()
        self.channel = host_channel(client, hop.command())
        self.channel.settimeout(stall)
        self.channel.sendall(secret_lines(*keys))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for raw in self.channel.makefile_stderr("rb"):
                self._line(raw.decode(errors="replace").strip())
            self.exit_code = self.channel.recv_exit_status()
        except (OSError, paramiko.SSHException):
            self.other.append(f"no word from the machine for {self.stall:.0f} s")
        finally:
            self.ended.set()
            self.ready.set()  # a hop that ended is not going to become ready

    def _line(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "ready":
            self.ready.set()
        elif word == "bytes" and rest.isdigit():
            if int(rest) > self.received:
                self.received = int(rest)
                self.moved_at = time.monotonic()
                if self.bar is not None:
                    self.bar.update_to(self.received)
        elif word == "fail":
            self.failure = rest
        elif word == "refused":
            addr, _, why = rest.partition(": ")
            self.refused.append(addr)
            shown = len(self.refused)
            if self.say is not None and shown <= SHOW_REFUSED:
                more = ", further ones not shown" if shown == SHOW_REFUSED else ""
                self.say(
                    f"[{self.hop.node}] relay: refused a connection from {addr} ({why}): "
                    f"not this transfer's neighbour, nothing of it loaded{more}"
                )
        elif word == "end":
            self.moved_at = time.monotonic()
        elif line:
            self.other.append(line)

    def problem(self) -> str:
        """ "" when this machine loaded the image (a next machine that broke off is its own
        problem, not this one's)."""
        if self.failure:
            return self.failure
        if self.exit_code == 0:
            return ""
        text = "; ".join(self.other[-3:]) or "the transfer ended early"
        if self.exit_code is None:
            return text
        return f"docker load exited {self.exit_code}: {text}"

    def close(self) -> None:
        try:
            self.channel.close()
        except (OSError, paramiko.SSHException):
            pass


def clear(client) -> None:
    """Remove a relay container an earlier, interrupted transfer left behind."""
    try:
        client.containers.get(RELAY_CONTAINER).remove(force=True)
    except NotFound:
        pass
    except DockerException:
        pass  # the machine not answering shows up when its hop starts


def _start(chain: Chain, clients, board, size: int, stall: float, runs: dict, say=None) -> None:
    """Start every hop from the tail: each listener is up before the one before it dials."""
    hops = chain.hops()
    keys = make_secrets(hops)
    for i in reversed(range(len(hops))):
        hop = hops[i]
        bar = board.bar(f"[{hop.node}] image (relay)", size) if board is not None else None
        try:
            run = _HopRun(hop, clients[hop.node], bar, stall, keys[hop.node], say)
        except (OSError, paramiko.SSHException) as exc:
            raise ChainBroken(
                f"{hop.node}: no SSH channel for its relay", hop.node, hop.node
            ) from exc
        runs[hop.node] = run
        if not run.ready.wait(READY_TIMEOUT) or run.ended.is_set():
            problem = run.problem() or f"its relay did not start in {READY_TIMEOUT:.0f} s"
            if run.failure.startswith("cannot reach"):
                nxt = hops[i + 1].node
                raise ChainBroken(f"{hop.node} {problem}", hop.node, drop=nxt)
            raise ChainBroken(f"{hop.node}: {problem}", hop.node, drop=hop.node)


def _send(run: _HopRun, archive: Path) -> int:
    sent = Counted(delivery._file_chunks(archive), run.bar)
    try:
        for chunk in sent:
            run.channel.sendall(chunk)
        run.channel.shutdown_write()
    except (OSError, paramiko.SSHException) as exc:
        raise ImageError(
            f"the relay took no more of the image for {run.stall:.0f} s, "
            f"after {sent.done / 1e6:.0f} MB",
            run.hop.node,
        ) from exc
    return sent.done


def _wait(runs: dict[str, _HopRun], stall: float) -> None:
    while not all(r.ended.is_set() for r in runs.values()):
        now = time.monotonic()
        for run in runs.values():
            if not run.ended.is_set() and now - run.moved_at > stall:
                run.other.append(f"no progress for {stall:.0f} s")
                run.close()
        time.sleep(0.2)


def run_chain(
    chain: Chain,
    clients,
    archive: Path,
    stall: float,
    board=None,
    say: Callable[[str], None] | None = None,
) -> tuple[int, dict]:
    """Carry the chain out: (bytes sent from here, {node: problem or ""}). `say` gets a
    line for each connection a hop refused (a stranger on its port).

    ChainBroken when a hop cannot start: nothing has been sent yet, and the caller takes
    `drop` out of the chain and tries again."""
    for node in chain.nodes:
        clear(clients[node])
    runs: dict[str, _HopRun] = {}
    try:
        _start(chain, clients, board, archive.stat().st_size, stall, runs, say)
        sent = _send(runs[chain.nodes[0]], archive)
        _wait(runs, stall)
        return sent, {node: run.problem() for node, run in runs.items()}
    finally:
        for run in runs.values():
            run.close()
            if run.bar is not None:
                run.bar.close()
        for node in chain.nodes:
            clear(clients[node])
