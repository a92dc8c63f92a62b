"""Preflight: before a launch, every path the job will use answers, or one line says which not.

A blocked port otherwise shows only as ranks hanging in the rendezvous or in gloo/NCCL's
connectFullMesh until their 30-minute timeout. Nothing listens on those ports before a job,
so each node container opens them itself (deepfleet_node.preflight listen): the master the
rendezvous port, every node an ephemeral port bound the way gloo binds its own. Then every
node connects to every other's ports at once (deepfleet_node.preflight probe), so a healthy
cluster is checked in about a second and a firewall that drops packets costs one timeout.

`probes` is pure (which paths to try); `check` runs them and returns every problem (doctor
lists them all); `run` raises the first as one line (train and infer stop before launching).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import docker

from deepfleet.errors import DeepfleetError, PreflightError
from deepfleet.machines.connect import fan_out
from deepfleet.planning.plan import ClusterPlan

NODE_MODULE = "deepfleet_node.preflight"
LISTEN = ("python", "-m", NODE_MODULE, "listen")
PROBE = ("python", "-m", NODE_MODULE, "probe")
KILL = ("pkill", "-f", f"{NODE_MODULE} listen")
EPHEMERAL = 0
RENDEZVOUS = "the rendezvous port"
MESH = "an ephemeral port gloo/NCCL connect on"

# what each probe error from the node module means to the user; {timeout} is filled in
REASONS = {
    "timeout": "no answer in {timeout} s (a firewall dropping it?)",
    "refused": "connection refused (a firewall rejecting it?)",
    "unreachable": "no route to host (a firewall rejecting it, or a wrong address?)",
    "reset": "the connection was reset (a firewall rejecting it?)",
    "unresolvable": "the address does not resolve there",
    "closed": "the connection closed before the listener answered",
    "unexpected answer": "another program answered, not deepfleet's listener",
}


@dataclass(frozen=True)
class Probe:
    src: str  # the machine that connects
    dst: str  # the machine that listens
    address: str  # dst's address as the job dials it
    port: int
    purpose: str  # RENDEZVOUS or MESH

    @property
    def target(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Finding:
    """One problem: the machine to look at and one line naming it."""

    node: str
    line: str
    path: bool = False  # a probe that failed, rather than a node that could not take part


# ---------------------------------------------------------------- pure


def listen_ports(plan: ClusterPlan) -> dict[str, list[int]]:
    """What each node opens: the master the rendezvous port, each node one ephemeral port."""
    wanted = {node.name: [EPHEMERAL] for node in plan.nodes}
    if len(plan.nodes) == 1:  # no peers: only whether the rendezvous port is free
        wanted[plan.master.name] = []
    wanted[plan.master.name].insert(0, plan.master_port)
    return wanted


def probes(plan: ClusterPlan, listen_ports: Mapping[str, Iterable[int]]) -> list[Probe]:
    """The paths to try, given the ports each node really bound; rendezvous ones first.

    Every node but the master dials the rendezvous port; every node dials every other node's
    ephemeral ports, as each rank of the full mesh does.
    """
    master = plan.master
    bound = {name: list(ports) for name, ports in listen_ports.items()}
    rendezvous = [
        Probe(src.name, master.name, master.address, plan.master_port, RENDEZVOUS)
        for src in plan.nodes[1:]
        if plan.master_port in bound.get(master.name, [])
    ]
    mesh = [
        Probe(src.name, dst.name, dst.address, port, MESH)
        for src in plan.nodes
        for dst in plan.nodes
        if dst.name != src.name
        for port in bound.get(dst.name, [])
        if not (dst.name == master.name and port == plan.master_port)
    ]
    return rendezvous + mesh


def reason(error: str, timeout: float) -> str:
    template = REASONS.get(error)
    return template.format(timeout=f"{timeout:g}") if template else error


def path_line(probe: Probe, error: str, timeout: float) -> str:
    return (
        f"{probe.src} cannot reach {probe.dst} ({probe.address}) on port {probe.port}, "
        f"{probe.purpose}: {reason(error, timeout)}"
    )


def in_use_line(plan: ClusterPlan) -> str:
    master = plan.master
    return (
        f"port {plan.master_port}, {RENDEZVOUS}, is already in use on {master.name} "
        f"({master.address}): a job still running there, or one left behind?"
    )


def first_line(findings: list[Finding]) -> str:
    """The first problem, and how many more there are (doctor lists them all)."""
    first, rest = findings[0], findings[1:]
    if not rest:
        return first.line
    what = "path" if all(f.path for f in rest) else "problem"
    plural = "s" if len(rest) > 1 else ""
    verb = "failed" if what == "path" else "found"
    return (
        f"{first.line}; {len(rest)} other {what}{plural} {verb} too (`deepfleet doctor` lists them)"
    )


def summary(plan: ClusterPlan, checked: list[Probe]) -> str:
    if len(plan.nodes) == 1:
        return f"port {plan.master_port} is free on {plan.master.name}"
    return (
        f"{len(checked)} paths between {len(plan.nodes)} machines answer "
        f"(rendezvous port {plan.master_port} and gloo/NCCL's ephemeral ports)"
    )


# ---------------------------------------------------------------- on the nodes


@dataclass
class _Listener:
    node: str
    ports: list[int]
    stream: object | None = None  # kept open while the listener runs; closed by _stop
    error: str | None = None  # the node's bind error, e.g. "port 29500 is in use"


def _docker_cause(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.NotFound):
        return "its deepfleet container is gone (`deepfleet down`, then `deepfleet up`)"
    if isinstance(exc, docker.errors.APIError):
        text = str(exc.explanation or "").strip().splitlines()
        return text[0] if text else f"the Docker engine answered {exc.status_code}"
    return "its Docker engine stopped answering over SSH"


def _read_first_line(stream) -> tuple[bytes | None, bytes]:
    """The listener's first stdout line (None if it exited first), and its stderr so far."""
    out, err = b"", b""
    for stdout, stderr in stream:
        err += stderr or b""
        out += stdout or b""
        if b"\n" in out:
            return out.split(b"\n", 1)[0], err
    return None, err


def _exited_line(node: str, what: str, code, stderr: bytes, module: str = NODE_MODULE) -> str:
    """One line for a node helper that exited with nothing to say on stdout."""
    text = stderr.decode(errors="replace")
    if f"No module named {module}" in text:
        feature = module.rsplit(".", 1)[-1]
        return (
            f"{node}: its node image has no {feature} (built before this deepfleet): "
            "rebuild it (`make images`) and `deepfleet up` again"
        )
    lines = text.strip().splitlines()
    return f"{node}: the {what} exited {code}: {lines[-1] if lines else 'no output'}"


def _close(stream) -> None:
    try:
        stream.close()
    except Exception:
        pass  # the transport may already be gone; the listener dies by itself


def start_helper(
    client, container_id: str, node: str, argv, what: str, module: str = NODE_MODULE, env=None
) -> tuple[dict, object]:
    """Run a node helper that prints one JSON object as its first line and keeps running (a
    listener): that object, and the exec's stream, kept open until `_close`.

    Only the first line is waited for; if the node never answers, the read still ends when
    the helper exits by itself (every listener is given its seconds).
    """
    try:
        api = client.api
        exec_id = api.exec_create(
            container_id, list(argv), stdout=True, stderr=True, environment=env
        )["Id"]
        stream = api.exec_start(exec_id, stream=True, demux=True)
        line, stderr = _read_first_line(stream)
        code = api.exec_inspect(exec_id).get("ExitCode") if line is None else None
    except Exception as exc:
        raise PreflightError(
            f"{node}: cannot start the {what}: {_docker_cause(exc)}", node
        ) from exc
    if line is None:
        _close(stream)
        raise PreflightError(_exited_line(node, what, code, stderr, module), node)
    try:
        answer = json.loads(line)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        _close(stream)
        text = line.decode(errors="replace")[:120]
        raise PreflightError(f"{node}: the {what} said {text!r}", node) from exc
    return answer, stream


def start_listener(session, node: str, ports: list[int], seconds: float) -> _Listener:
    """Run `listen` in the node's container and wait only for its first line; the exec
    stays attached so the ports stay open."""
    argv = [*LISTEN, *(a for p in ports for a in ("--port", str(p))), "--seconds", f"{seconds:g}"]
    client = session.clients[node]
    try:
        container_id = session.container(node).id
    except Exception as exc:
        raise PreflightError(
            f"{node}: cannot start the preflight listener: {_docker_cause(exc)}", node
        ) from exc
    answer, stream = start_helper(client, container_id, node, argv, "preflight listener")
    try:
        if "error" in answer:
            _close(stream)
            return _Listener(node, [], error=str(answer["error"]))
        return _Listener(node, [int(p) for p in answer["ports"]], stream)
    except (ValueError, KeyError, TypeError) as exc:
        _close(stream)
        text = json.dumps(answer)[:120]
        raise PreflightError(f"{node}: the preflight listener said {text!r}", node) from exc


def _start_all(session, plan: ClusterPlan, seconds: float):
    wanted = listen_ports(plan)
    listeners, errors = fan_out(
        plan.nodes, lambda n: start_listener(session, n.name, wanted[n.name], seconds),
        lambda n: n.name,
    )  # fmt: skip
    findings = [Finding(n.name, errors[n.name].one_line()) for n in plan.nodes if n.name in errors]
    for name, listener in list(listeners.items()):
        if listener.error is None:
            continue
        if name != plan.master.name or "in use" not in listener.error:
            findings.append(
                Finding(name, f"{name}: cannot listen for the preflight: {listener.error}")
            )
            continue
        findings.insert(0, Finding(name, in_use_line(plan)))
        if len(plan.nodes) > 1:  # the mesh is still worth checking: one run names every problem
            try:
                listeners[name] = start_listener(session, name, [EPHEMERAL], seconds)
            except DeepfleetError as exc:
                findings.append(Finding(name, exc.one_line()))
    return listeners, findings


def _results(text: str, count: int) -> list[dict]:
    lines = text.strip().splitlines()
    results = json.loads(lines[-1])["results"] if lines else []
    if len(results) != count:
        raise ValueError(f"{len(results)} results for {count} targets")
    return results


def probe_from(session, src: str, batch: list[Probe], timeout: float) -> list[dict]:
    """Run `probe` in src's container on batch's targets; one result dict per probe."""
    argv = [*PROBE, "--timeout", f"{timeout:g}", *(p.target for p in batch)]
    try:
        container = session.container(src)
        code, (stdout, stderr) = container.exec_run(argv, demux=True)
    except Exception as exc:
        cause = _docker_cause(exc)
        raise PreflightError(f"{src}: cannot run the preflight probe: {cause}", src) from exc
    if code != 0:
        raise PreflightError(_exited_line(src, "preflight probe", code, stderr or b""), src)
    try:
        return _results((stdout or b"").decode(errors="replace"), len(batch))
    except (ValueError, KeyError, TypeError) as exc:
        raise PreflightError(f"{src}: the preflight probe printed no results", src) from exc


def _run_probes(session, todo: list[Probe], timeout: float) -> list[Finding]:
    by_src: dict[str, list[Probe]] = {}
    for probe in todo:
        by_src.setdefault(probe.src, []).append(probe)
    results, errors = fan_out(
        by_src.items(), lambda item: probe_from(session, item[0], item[1], timeout),
        lambda item: item[0],
    )  # fmt: skip
    findings = [Finding(name, exc.one_line()) for name, exc in errors.items()]
    outcome = {
        probe: result for src, batch in by_src.items() for probe, result in
        zip(batch, results.get(src, []), strict=False)
    }  # fmt: skip
    for probe in todo:  # in probes() order: the rendezvous port's failures first
        result = outcome.get(probe)
        if result is not None and not result.get("ok"):
            line = path_line(probe, str(result.get("error") or "no answer"), timeout)
            findings.append(Finding(probe.src, line, path=True))
    return findings


def _stop(session, names: list[str], listeners: dict[str, _Listener]) -> None:
    """Leave nothing listening: a job launched next needs the rendezvous port."""

    def stop(name: str) -> None:
        try:
            session.container(name).exec_run(list(KILL))
        except Exception:
            pass  # best effort: each listener also exits by itself
        listener = listeners.get(name)
        if listener is not None and listener.stream is not None:
            _close(listener.stream)

    fan_out(names, stop, lambda name: name)


def check(session, plan: ClusterPlan, timeout: float = 5.0) -> tuple[list[Probe], list[Finding]]:
    """Every planned path, tried; returns the probes that ran and every problem found."""
    seconds = timeout * 3 + 10  # outlives the probes; dies by itself if we are cut off
    listeners: dict[str, _Listener] = {}
    try:
        listeners, findings = _start_all(session, plan, seconds)
        bound = {name: lsn.ports for name, lsn in listeners.items()}
        # a node whose listener could not start is reported already; its probes would fail too
        todo = [p for p in probes(plan, bound) if p.src in listeners]
        findings += _run_probes(session, todo, timeout)
        return todo, findings
    finally:
        _stop(session, [n.name for n in plan.nodes], listeners)


def run(session, plan: ClusterPlan, timeout: float = 5.0, out=sys.stdout) -> list[Probe]:
    """Check before a launch; raises PreflightError with one line for the first problem."""
    started = time.monotonic()
    checked, findings = check(session, plan, timeout)
    if findings:
        raise PreflightError(first_line(findings), findings[0].node)
    out.write(
        f"deepfleet: preflight: {summary(plan, checked)} ({time.monotonic() - started:.1f} s)\n"
    )
    out.flush()
    return checked
