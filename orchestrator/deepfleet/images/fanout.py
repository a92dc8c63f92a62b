"""Fan-out: how the node image reaches every machine, decided first, then carried out.

`plan_images` is pure: from what each machine holds and what this machine has, which
machines already have their image, which pull it from a registry, which take it through a
relay chain (one per image, when two or more machines need it streamed) and which are
streamed to directly, with the reason. `put_images` runs that plan; a chain that cannot be
formed or that fails for a machine falls back to streaming to that machine directly, and
says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import paramiko
from docker.errors import DockerException

from deepfleet.errors import DeepfleetError, ImageError
from deepfleet.images import delivery, relay
from deepfleet.machines.connect import fan_out, stall_timeout


@dataclass(frozen=True)
class ImagePlan:
    refs: Mapping[str, str]  # node -> the image it runs
    present: tuple[str, ...] = ()
    pull: tuple[str, ...] = ()
    chains: tuple[relay.Chain, ...] = ()
    direct: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # why a machine is streamed to directly

    def describe(self) -> str:
        lines = [f"image: {', '.join(self.present)} already have it"] if self.present else []
        if self.pull:
            lines.append(f"image: {', '.join(self.pull)} pull it")
        for chain in self.chains:
            ref = self.refs[chain.nodes[0]]
            lines.append(f"image: {ref} relayed once, {chain.describe()}")
        if self.direct:
            lines.append(f"image: streamed from here to {', '.join(self.direct)}")
        return "\n".join(lines + list(self.notes))


def plan_images(
    refs: Mapping[str, str],
    want: Mapping[str, str | None],  # ref -> this machine's image ID (None: not here)
    have: Mapping[str, str | None],  # node -> the ID its engine holds under that ref
    addresses: Mapping[str, str],
    pull: str = "auto",
    relay_ready: bool = True,  # this machine holds RELAY_IMAGE
    use_relay: bool = True,
    port: int = relay.RELAY_PORT,
) -> ImagePlan:
    present, pulls, stream = [], [], []
    for node, ref in refs.items():
        wanted = want.get(ref)
        if have.get(node) and (wanted is None or have[node] == wanted):
            present.append(node)
        elif pull == "always" or (pull == "auto" and delivery.names_registry(ref)):
            pulls.append(node)  # a failed pull still falls back to streaming
        else:
            stream.append(node)
    chains, direct, notes = [], [], []
    by_ref: dict[str, list[str]] = {}
    for node in stream:
        by_ref.setdefault(refs[node], []).append(node)
    for ref, nodes in by_ref.items():
        if len(nodes) < 2 or want.get(ref) is None or not use_relay:
            direct += nodes
        elif not relay_ready:
            direct += nodes
            notes.append(
                f"image: no relay here ({relay.RELAY_IMAGE} is not built: `make images`), "
                f"so {ref} goes from here to each of {', '.join(nodes)}"
            )
        else:
            chains.append(relay.Chain(tuple(nodes), dict(addresses), port))
    return ImagePlan(dict(refs), tuple(present), tuple(pulls), tuple(chains), tuple(direct),
                     tuple(notes))  # fmt: skip


@dataclass
class Outcome:
    results: dict[str, delivery.ImageResult] = field(default_factory=dict)
    errors: dict[str, DeepfleetError] = field(default_factory=dict)
    sent_here: int = 0  # bytes that left this machine for the images


def put_images(local, clients, plan: ImagePlan, log: Callable[[str], None], board=None) -> Outcome:
    outcome = Outcome()
    for node in plan.present:
        image_id = delivery.node_image_id(clients[node], plan.refs[node])
        outcome.results[node] = delivery.ImageResult(node, "present", image_id or "", 0.0)
    direct = [*plan.pull, *plan.direct]
    for chain in plan.chains:
        ref = plan.refs[chain.nodes[0]]
        try:
            direct += _relay(local, clients, ref, chain, outcome, log, board)
        except (DockerException, OSError, paramiko.SSHException) as exc:
            # an engine or SSH failure outside the hops: every machine of the chain not yet
            # served gets the stream, whose own errors name the machine
            why = "an engine refused" if isinstance(exc, DockerException) else "SSH failed"
            log(f"relay {chain.describe()} failed ({why}); streaming from here instead")
            direct += [n for n in chain.nodes if n not in outcome.results]

    def put(node: str):
        mode = "always" if node in plan.pull else "never"  # a failed pull then streams
        say = None if board is not None else log  # a board's lines do not tear its bars
        return delivery.ensure_image(local, clients[node], plan.refs[node], node, mode, board, say)

    results, errors = fan_out(direct, put, lambda n: n)
    outcome.results.update(results)
    outcome.errors.update(errors)
    outcome.sent_here += sum(r.bytes_sent for r in results.values())
    return outcome


def _relay(local, clients, ref: str, chain: relay.Chain, outcome: Outcome, log, board):
    """Relay `ref` along the chain; returns the machines still to stream to directly."""
    _, errors = fan_out(
        chain.nodes,
        lambda n: delivery.ensure_image(local, clients[n], relay.RELAY_IMAGE, n, "never"),
        lambda n: n,
    )
    direct = []
    for node, exc in errors.items():
        log(f"[{node}] no relay ({exc}); its image goes straight from here")
        chain, direct = chain.without(node), direct + [node]
    want = delivery.local_image_id(local, ref)
    archive = delivery.saved_image(local, ref, want)
    held = None
    for node in chain.nodes:
        chains = delivery.node_chains(clients[node])
        held = chains if held is None else held & chains
    skip = delivery.held_layers(archive, held or set())
    payload = delivery.delta_archive(archive, skip) if skip else archive
    stall = stall_timeout()
    try:
        while len(chain.nodes) >= 2:
            began = time.monotonic()
            try:
                say = board.line if board is not None else log
                sent, problems = relay.run_chain(chain, clients, payload, stall, board, say)
            except relay.ChainBroken as exc:
                log(f"[{exc.drop}] relay: {exc}; its image goes straight from here")
                chain, direct = chain.without(exc.drop), direct + [exc.drop]
                continue
            outcome.sent_here += sent
            for node in chain.nodes:
                got = delivery.node_image_id(clients[node], ref)
                problem = problems.get(node) or (
                    "" if got == want else f"after the relay, {ref} is {got} there, not {want}"
                )
                if problem:
                    log(f"[{node}] relay failed ({problem}); its image goes straight from here")
                    direct.append(node)
                    continue
                first = node == chain.nodes[0]
                outcome.results[node] = delivery.ImageResult(
                    node, "relayed", got, time.monotonic() - began, sent if first else 0,
                    payload.stat().st_size, chain.describe(),
                )  # fmt: skip
            return direct
        return direct + list(chain.nodes)  # one machine left: a chain of one is a stream
    except ImageError as exc:
        log(f"relay {chain.describe()} failed ({exc}); streaming from here instead")
        done = set(outcome.results)
        return direct + [n for n in chain.nodes if n not in done]
    finally:
        if payload != archive:
            payload.unlink(missing_ok=True)
