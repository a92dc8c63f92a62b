"""Links: bandwidth each way and round-trip time of every link a job uses.

On a LAN the network, not the GPUs, often decides how long a step takes, so every pair of
machines is measured between their node containers (host networking: the path the ranks
use), and this machine (the operator) to each of them, which is the path models and
images take. Each node container runs a listener (deepfleet_node.links serve) that answers
only this measurement's secret; the pairs are measured in rounds of a round-robin
tournament, so in each round every machine is in one pair at most and the pairs of a round
run at once: about (machines) rounds of about a second each.

Every exec and socket is bounded; a link that cannot be measured is one line naming both
ends, never a hang. The result is recorded in the cluster state with its time
(ClusterState.record_links) as records {"a", "b", "a_to_b_bps", "b_to_a_bps", "rtt_s",
"measured_at"} (bytes/s, seconds, Unix time), the form the cost model reads.

`schedule`, `parse_record`, `assess` and `render` are pure and unit-tested.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import sys
import time
from dataclasses import dataclass

from deepfleet.errors import DeepfleetError
from deepfleet.machines.connect import fan_out
from deepfleet.machines.containers import exec_text
from deepfleet.machines.preflight import _close, reason, start_helper
from deepfleet_node import links as node_links

NODE_MODULE = "deepfleet_node.links"
SERVE = ("python", "-m", NODE_MODULE, "serve")
PROBE = ("python", "-m", NODE_MODULE, "probe")
OPERATOR = "operator"  # this machine, as a link's end in the records
SECONDS = 0.5  # per direction of a link
MAX_BYTES = 128 * 2**20  # per direction of a link
TIMEOUT = 3.0  # a connect, or a silence inside a measurement
# a link far slower than the others: under this fraction of the median machine's best link
SLOW_FACTOR = 4.0
HIGH_RTT_S = 0.005  # a wired LAN answers well under a millisecond
MAX_AGE_ENV = "DEEPFLEET_LINKS_MAX_AGE"
DEFAULT_MAX_AGE = 3600.0  # a job's preflight measures again when the table is older
MB = 1e6
FIELDS = ("a", "b", "a_to_b_bps", "b_to_a_bps", "rtt_s", "measured_at")
FIX = (
    "a cable instead of Wi-Fi, a 1 Gbit port and cable (`ethtool <interface>` on the "
    "machine shows the speed it negotiated: 100Mb/s is a bad cable or an old port/switch)"
)
RTT_FIX = (
    "a wired LAN answers in well under a millisecond: Wi-Fi, a VPN or a routed path between "
    "them? put them on one switch"
)


def max_age() -> float:
    try:
        return max(0.0, float(os.environ.get(MAX_AGE_ENV, DEFAULT_MAX_AGE)))
    except ValueError:
        return DEFAULT_MAX_AGE


def who(name: str) -> str:
    return "this machine (the operator)" if name == OPERATOR else name


# ---------------------------------------------------------------- pure


def schedule(names: list[str]) -> list[list[tuple[str, str]]]:
    """Every pair once, in rounds where no name appears twice (the circle method).

    The first name stays put and is always a pair's first end: the operator, which has no
    listener, is put first so that it always probes.
    """
    players: list[str | None] = list(names)
    if len(players) % 2:
        players.append(None)  # a bye
    n = len(players)
    rounds = []
    for _ in range(n - 1):
        pairs = [(players[i], players[n - 1 - i]) for i in range(n // 2)]
        real = [(a, b) for a, b in pairs if a is not None and b is not None]
        if real:
            rounds.append(real)
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def parse_record(result: dict, a: str, b: str, now: float) -> dict | None:
    """A probe's JSON as a link record; None unless both directions were measured."""
    try:
        if not result.get("ok"):
            return None
        record = {
            "a": a,
            "b": b,
            "a_to_b_bps": float(result["a_to_b_bps"]),
            "b_to_a_bps": float(result["b_to_a_bps"]),
            "rtt_s": float(result["rtt_s"]),
            "measured_at": now,
        }
    except (KeyError, TypeError, ValueError):
        return None
    if min(record["a_to_b_bps"], record["b_to_a_bps"]) <= 0 or record["rtt_s"] < 0:
        return None
    return record


def in_order(records: list[dict], names: list[str]) -> list[dict]:
    """The records as a table reads best: each link from the end listed first in `names`
    (the operator first), sorted by its ends' places there."""
    place = {name: i for i, name in enumerate(names)}
    out = []
    for r in records:
        if place.get(r["a"], len(place)) > place.get(r["b"], len(place)):
            r = {**r, "a": r["b"], "b": r["a"], "a_to_b_bps": r["b_to_a_bps"],
                 "b_to_a_bps": r["a_to_b_bps"]}  # fmt: skip
        out.append({k: r[k] for k in FIELDS})
    return sorted(out, key=lambda r: (place.get(r["a"], len(place)), place.get(r["b"], 0)))


def failure_line(a: str, b: str, target: str, error: str, timeout: float = TIMEOUT) -> str:
    return f"{who(a)} cannot measure the link to {b} ({target}): {reason(error, timeout)}"


def rate(record: dict) -> float:
    """A link's speed for comparing: its slower direction."""
    return min(record["a_to_b_bps"], record["b_to_a_bps"])


@dataclass(frozen=True)
class Verdict:
    """A link or machine doctor marks: the machine to look at, one line, the fix."""

    node: str
    detail: str
    fix: str


def _mbs(bps: float) -> str:
    return f"{bps / MB:.1f} MB/s"


def link_name(record: dict) -> str:
    return f"{record['a']} <-> {record['b']}"


def assess(records: list[dict]) -> list[Verdict]:
    """The links far slower than the others, and those with a high round-trip time.

    A machine with a slow port (Wi-Fi, 100 Mbit) makes all its links slow: each machine's
    best link is compared with the median of the machines' best links, so the machine is
    named rather than every link it is on. A link slow while both its ends have fast links
    elsewhere is named itself (a bad cable or port on the way).
    """
    if not records:
        return []
    best: dict[str, float] = {}
    for r in records:
        for end in (r["a"], r["b"]):
            best[end] = max(best.get(end, 0.0), rate(r))
    reference = statistics.median(best.values())
    slow = {m for m, v in best.items() if v * SLOW_FACTOR < reference}
    verdicts = []
    for machine in sorted(slow, key=list(best).index):
        mine = [r for r in records if machine in (r["a"], r["b"])]
        shown = ", ".join(f"{link_name(r)} {_mbs(rate(r))}" for r in mine[:4])
        verdicts.append(
            Verdict(
                machine,
                f"every link of {who(machine)} is slow: {_mbs(best[machine])} at best against "
                f"{_mbs(reference)} for the others ({shown})",
                f"check {who(machine)}'s connection: {FIX}",
            )
        )
    for r in records:
        if r["a"] in slow or r["b"] in slow:
            continue
        ends = min(best[r["a"]], best[r["b"]])
        if rate(r) * SLOW_FACTOR < ends:
            verdicts.append(
                Verdict(
                    r["b"] if r["a"] == OPERATOR else r["a"],
                    f"link {link_name(r)} is slow: {_mbs(rate(r))} while both ends reach "
                    f"{_mbs(ends)} elsewhere",
                    f"check the path between {who(r['a'])} and {r['b']}: {FIX}",
                )
            )
    for r in records:
        if r["rtt_s"] > HIGH_RTT_S:
            verdicts.append(
                Verdict(
                    r["b"] if r["a"] == OPERATOR else r["a"],
                    f"link {link_name(r)} has a round-trip time of {r['rtt_s'] * 1e3:.1f} ms",
                    RTT_FIX,
                )
            )
    return verdicts


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "never measured"
    seconds = int(seconds)
    if seconds < 2:
        return "measured just now"
    if seconds < 120:
        return f"measured {seconds} s ago"
    if seconds < 7200:
        return f"measured {seconds // 60} min ago"
    if seconds < 172800:
        return f"measured {seconds // 3600} h ago"
    return f"measured {seconds // 86400} days ago"


def render(records: list[dict], failures: list[str], age: float | None) -> str:
    """The link table: a->b and b->a in MB/s, RTT in ms; then the links not measured."""
    if not records and not failures:
        return f"links: {age_text(age)} (`deepfleet links` measures them)"
    lines = [f"links ({age_text(age)}):"]
    width = max([len(link_name(r)) for r in records] + [4])
    lines.append(f"  {'LINK':<{width}} {'A->B MB/s':>10} {'B->A MB/s':>10} {'RTT ms':>7}")
    for r in records:
        lines.append(
            f"  {link_name(r):<{width}} {r['a_to_b_bps'] / MB:>10.1f} "
            f"{r['b_to_a_bps'] / MB:>10.1f} {r['rtt_s'] * 1e3:>7.2f}"
        )
    lines += [f"  not measured: {line}" for line in failures]
    return "\n".join(lines)


def as_json(records: list[dict], failures: list[str], measured_at, age) -> dict:
    return {"measured_at": measured_at, "age_s": None if age is None else round(age, 1),
            "links": records, "failures": failures}  # fmt: skip


# ---------------------------------------------------------------- on the machines


@dataclass
class Measurement:
    links: list[dict]
    failures: list[str]
    measured_at: float
    seconds: float

    def summary(self) -> str:
        done = f"{len(self.links)} links measured in {self.seconds:.1f} s"
        if self.failures:
            done += f", {len(self.failures)} not"
        return done


@dataclass
class _Listener:
    port: int
    pid: int | None
    stream: object


def _listen(client, container_id: str, node: str, secret: str, seconds: float) -> _Listener:
    argv = [*SERVE, "--seconds", f"{seconds:g}"]
    answer, stream = start_helper(
        client, container_id, node, argv, "link listener", NODE_MODULE,
        env={node_links.SECRET_ENV: secret},
    )  # fmt: skip
    if "port" not in answer:
        _close(stream)
        raise DeepfleetError(f"cannot listen for the link measurement: {answer.get('error')}", node)
    return _Listener(int(answer["port"]), answer.get("pid"), stream)


def _probe_argv(target: str, seconds: float, max_bytes: int, timeout: float) -> list[str]:
    return [*PROBE, target, "--seconds", f"{seconds:g}", "--bytes", str(max_bytes),
            "--timeout", f"{timeout:g}"]  # fmt: skip


def _last_json(text: str) -> dict:
    lines = text.strip().splitlines()
    answer = json.loads(lines[-1]) if lines else {}
    if not isinstance(answer, dict):
        raise ValueError("not an object")
    return answer


def measure(
    state,
    clients: dict,
    operator: bool = True,
    seconds: float = SECONDS,
    max_bytes: int = MAX_BYTES,
    timeout: float = TIMEOUT,
) -> Measurement:
    """Every pair of the state's machines, and this machine to each (with `operator`)."""
    started = time.monotonic()
    secret = secrets.token_hex(16)
    nodes = {n.spec.name: n for n in state.nodes}
    rounds = schedule([OPERATOR, *nodes] if operator else list(nodes))
    # each pair: 2 x seconds, connects and pings; the listeners exit by themselves after
    per_pair = 2 * seconds + 3 * timeout
    listen_s = len(rounds) * per_pair + 30
    listeners, errors = fan_out(
        nodes.values(),
        lambda n: _listen(clients[n.spec.name], n.container_id, n.spec.name, secret, listen_s),
        lambda n: n.spec.name,
    )
    down = {name: exc.one_line() for name, exc in errors.items()}
    failures = [f"{line} (its links are not measured)" for line in down.values()]
    records: list[dict] = []

    def pair(item: tuple[str, str]) -> dict | str:
        a, b = item
        target = f"{nodes[b].spec.host}:{listeners[b].port}"
        try:
            if a == OPERATOR:
                result = node_links.probe(target, secret, seconds, max_bytes, timeout=timeout)
            else:
                container = clients[a].containers.get(nodes[a].container_id)
                text = exec_text(
                    container, _probe_argv(target, seconds, max_bytes, timeout), a,
                    env={node_links.SECRET_ENV: secret},
                )  # fmt: skip
                result = _last_json(text)
        except DeepfleetError as exc:
            return f"{who(a)} cannot measure the link to {b} ({target}): {exc.one_line()}"
        except Exception as exc:  # a probe that printed nonsense, an engine that went away
            return failure_line(a, b, target, f"{type(exc).__name__}: {exc}"[:160], timeout)
        record = parse_record(result, a, b, time.time())
        if record is None:
            return failure_line(a, b, target, str(result.get("error") or "no result"), timeout)
        return record

    try:
        for pairs in rounds:
            todo = [(a, b) for a, b in pairs if a not in down and b not in down]
            results, errs = fan_out(todo, pair, lambda p: f"{p[0]} <-> {p[1]}")
            for a, b in todo:
                key = f"{a} <-> {b}"
                got = results.get(key)
                if isinstance(got, dict):
                    records.append(got)
                elif got is not None:
                    failures.append(got)
                else:
                    failures.append(f"{who(a)} cannot measure the link to {b}: {errs[key]}")
    finally:
        _stop(clients, nodes, listeners)
    records = in_order(records, [OPERATOR, *nodes])
    return Measurement(records, failures, time.time(), time.monotonic() - started)


def _stop(clients: dict, nodes: dict, listeners: dict[str, _Listener]) -> None:
    """Leave nothing listening (each listener also exits by itself)."""

    def stop(name: str) -> None:
        listener = listeners[name]
        try:
            if listener.pid:
                container = clients[name].containers.get(nodes[name].container_id)
                container.exec_run(["kill", str(int(listener.pid))])
        except Exception:
            pass  # best effort
        _close(listener.stream)

    fan_out(list(listeners), stop, lambda name: name)


def refresh(state, clients, store=None, out=sys.stdout, why: str = "") -> Measurement | None:
    """Measure, record in the state (saved when a store is given) and say so in one line;
    a failure to measure at all is a warning line, never an error."""
    try:
        measurement = measure(state, clients)
    except DeepfleetError as exc:
        out.write(f"deepfleet: warning: links not measured: {exc.one_line()}\n")
        out.flush()
        return None
    state.record_links(measurement.links, measurement.failures, measurement.measured_at)
    if store is not None:
        store.save(state)
    out.write(f"deepfleet: links{why}: {measurement.summary()}")
    slowest = sorted(measurement.links, key=rate)[:1]
    if slowest:
        out.write(f"; slowest {link_name(slowest[0])} {_mbs(rate(slowest[0]))}")
    out.write("\n")
    for line in measurement.failures:
        out.write(f"deepfleet: warning: {line}\n")
    for verdict in assess(measurement.links):
        out.write(f"deepfleet: warning: {verdict.detail}\n")
    out.flush()
    return measurement


def stale(state, now: float, limit: float | None = None) -> bool:
    age = state.links_age(now)
    return age is None or age > (max_age() if limit is None else limit)
