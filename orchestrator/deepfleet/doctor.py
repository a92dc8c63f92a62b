"""doctor: check every machine before (or while) a cluster runs, and say how to fix it.

Each check is one line per node: `ok`, `warn` or `FAIL`, with the cause and the fix.
Nothing is changed on any machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import hostprobe, images, preflight
from .cluster import open_session
from .connect import connect, fan_out, run_host
from .errors import DeepfleetError
from .inventory import NodeSpec
from .plan import ClusterPlan

PORTS = (2222, 29500)


@dataclass(frozen=True)
class Check:
    node: str
    name: str
    level: str  # ok | warn | FAIL
    detail: str

    def line(self) -> str:
        return f"[{self.node}] {self.level:<4} {self.name}: {self.detail}"


def _ports_in_use(text: str) -> set[int]:
    used = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            port = parts[3].rsplit(":", 1)[-1]
            if port.isdigit():
                used.add(int(port))
    return used


def check_node(node: NodeSpec, local, image: str | None, cluster_up: bool, timeout: float):
    checks: list[Check] = []
    add = lambda name, level, detail: checks.append(Check(node.name, name, level, detail))  # noqa: E731
    try:
        client = connect(node, timeout)
    except DeepfleetError as exc:
        add("ssh+docker", "FAIL", str(exc))
        return checks
    try:
        version = client.version()
        add("ssh+docker", "ok", f"{node.docker_url}, engine {version.get('Version')}")
        facts = hostprobe.probe(client, node.name, run_host)
        flavor = hostprobe.choose_flavor(facts, node.flavor)
        gpus = f"{facts.nvidia_gpus} NVIDIA" if facts.nvidia_gpus else (
            "AMD (/dev/kfd)" if facts.has_amd else "none"
        )  # fmt: skip
        if facts.nvidia_driver:
            gpus += f", driver {facts.nvidia_driver}"
        add("gpus", "ok", f"{gpus}; flavor {flavor}")
        ref = image or f"deepfleet/{flavor}:latest"
        labels = images.local_labels(local, ref)
        for problem in hostprobe.problems(facts, flavor, ref, labels.get(images.CUDA_LABEL)):
            add("gpu passthrough", "FAIL", problem)
        want = images.local_image_id(local, ref) if local is not None else None
        try:
            have = client.images.get(ref).id
        except Exception:
            have = None
        if have and (want is None or have == want):
            add("image", "ok", f"{ref} present")
        elif want:
            add("image", "ok", f"{ref} will be streamed from this machine at `up`")
        elif images.names_registry(ref):
            add("image", "warn", f"{ref} will be pulled at `up`")
        else:
            add("image", "FAIL", f"{ref} is not built here: run `make images FLAVOR={flavor}`")
        code, out, _ = run_host(client, "ss -ltnH 2>/dev/null || netstat -ltn 2>/dev/null")
        if code == 0 and out.strip():
            busy = sorted(_ports_in_use(out) & set(PORTS))
            if busy and not cluster_up:
                add("ports", "FAIL", f"port(s) {busy} already in use on the host network")
            else:
                add(
                    "ports",
                    "ok",
                    f"{', '.join(map(str, PORTS))} " + ("in use by deepfleet" if busy else "free"),
                )
        else:
            add("ports", "warn", "could not list listening ports (no ss/netstat)")
    except DeepfleetError as exc:
        add("probe", "FAIL", exc.one_line())
    finally:
        client.close()
    return checks


def run(nodes: list[NodeSpec], local, image: str | None, cluster_up: bool, timeout: float):
    results, errors = fan_out(
        nodes, lambda n: check_node(n, local, image, cluster_up, timeout), lambda n: n.name
    )
    checks = [c for n in nodes for c in results.get(n.name, [])]
    checks += [Check(name, "doctor", "FAIL", e.one_line()) for name, e in errors.items()]
    return checks


def network_checks(session, plan: ClusterPlan | None = None, timeout: float = 5.0) -> list[Check]:
    """The launch preflight, listing every path that fails (a launch stops at the first)."""
    try:
        plan = plan or session.plan()
        started = time.monotonic()
        checked, findings = preflight.check(session, plan, timeout)
    except DeepfleetError as exc:  # e.g. the saved reports no longer make a plan
        return [Check(exc.node or "cluster", "network", "FAIL", exc.one_line())]
    if findings:
        return [Check(f.node, "network", "FAIL", f.line) for f in findings]
    took = time.monotonic() - started
    detail = f"{preflight.summary(plan, checked)} ({took:.1f} s)"
    return [Check(plan.master.name, "network", "ok", detail)]


def cluster_network_checks(store, timeout: float = 15.0, probe_timeout: float = 5.0):
    """network_checks for the cluster that is up; a node that cannot be reached is a warning
    here, because its own ssh+docker line already says why."""
    try:
        session = open_session(store, timeout)
    except DeepfleetError as exc:
        return [Check("cluster", "network", "warn", f"not checked: {exc.one_line()}")]
    try:
        return network_checks(session, timeout=probe_timeout)
    finally:
        session.close()
