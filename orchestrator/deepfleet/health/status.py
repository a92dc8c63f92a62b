"""`deepfleet status`: each machine's container and GPUs as they are now, the job, and the
link table as last measured (with its age; `deepfleet links` measures it now).

Every machine is asked at once; one that does not answer is a row saying why, never a
failed command. The JSON form follows schemas/status.schema.json (checked by a test).
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from importlib import resources

from deepfleet.errors import DeepfleetError
from deepfleet.jobs import joblogs
from deepfleet.jobs.watchdog import LEASE_READ_SH, LivenessPolicy, live_lease
from deepfleet.machines import links
from deepfleet.machines.connect import connect, fan_out, first_line
from deepfleet.machines.containers import exec_text
from deepfleet.machines.state import ClusterState, NodeState
from deepfleet.planning.serveplan import SERVICE_READ_SH

# rank 0's progress line (deepfleet_node/train/metrics.py `log_line`)
STEP_LINE = re.compile(
    r"^step (?P<step>\d+)/(?P<steps>\d+) loss (?P<loss>[\d.]+|nan|inf)"
    r"(?:.*? tok/s (?P<tok>[\d.]+))?(?:.*? eta (?P<eta>[\d.]+)s)?"
)
SAMPLE_ARGV = ["python", "-m", "deepfleet_node.gpusample"]


def schema() -> dict:
    text = resources.files("deepfleet").joinpath("schemas/status.schema.json").read_text()
    return json.loads(text)


def _uptime(attrs: dict, now: float) -> float | None:
    started = (attrs.get("State") or {}).get("StartedAt") or ""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z$", started)
    if not match:
        return None
    begun = datetime.fromisoformat(match.group(1) + "+00:00").timestamp()
    return round(max(0.0, now - begun), 1)


def _gpus(container, report, name: str) -> tuple[list[dict], str | None]:
    if report is None or not report.gpus:
        return [], None  # nothing to sample: a CPU machine
    try:
        sample = json.loads(exec_text(container, SAMPLE_ARGV, name))
    except DeepfleetError as exc:
        return [], f"GPU sample failed: {exc.one_line()}"
    except ValueError:
        return [], "GPU sample printed no JSON"
    return sample.get("gpus", []), sample.get("error")


def _number(match: re.Match, key: str) -> float | None:
    return float(match.group(key)) if match.group(key) else None


def parse_step(text: str) -> dict:
    """The last step line of rank 0's log tail as the job's progress fields."""
    fields = {"step": None, "steps": None, "loss": None, "tokens_per_s": None, "eta_s": None}
    for line in reversed(text.splitlines()):
        match = STEP_LINE.match(line.strip())
        if match:
            fields.update(
                step=int(match.group("step")),
                steps=int(match.group("steps")),
                loss=_number(match, "loss"),
                tokens_per_s=_number(match, "tok"),
                eta_s=_number(match, "eta"),
            )
            break
    return fields


def _rank0_tail(job: str) -> list[str]:
    log = joblogs.log_file(job, 0)
    return ["sh", "-c", f"tail -n 400 {log} 2>/dev/null | grep '^step ' | tail -n 1; true"]


def _shell(container, script: str, name: str) -> str:
    return exec_text(container, ["sh", "-c", script], name)


def gather(state: ClusterState, timeout: float, policy: LivenessPolicy | None = None) -> dict:
    policy = policy or LivenessPolicy()
    now = time.time()
    job_name: list[str | None] = [None]
    lease: list[str | None] = [None]
    record: list[str] = [""]

    def ask(node: NodeState) -> dict:
        name = node.spec.name
        report = node.parsed_report() if node.report else None
        row = {
            "node": name,
            "address": node.spec.host,
            "container": node.container_name,
            "state": "unreachable",
            "uptime_s": None,
            "flavor": node.flavor,
            "cpus": report.cpu_count if report else None,
            "versions": dict(report.versions) if report else {},
            "gpu_summary": report.gpu_summary if report else "?",
            "gpus": [],
            "error": None,
        }
        try:
            client = connect(node.spec, timeout)
        except DeepfleetError as exc:
            row["error"] = exc.one_line()
            return row
        try:
            try:
                container = client.containers.get(node.container_name)
            except Exception:
                row["state"] = "missing"
                return row
            row["state"] = container.status
            if container.status != "running":
                return row
            row["uptime_s"] = _uptime(container.attrs, now)
            row["gpus"], row["error"] = _gpus(container, report, name)
            if name == state.nodes[0].spec.name:
                current = _shell(container, f"cat {joblogs.CURRENT} 2>/dev/null; true", name)
                job_name[0] = current.strip() or None
                lease[0] = live_lease(_shell(container, LEASE_READ_SH, name), policy)
                record[0] = _shell(container, SERVICE_READ_SH, name)
        finally:
            client.close()
        return row

    rows, errors = fan_out(state.nodes, ask, lambda n: n.spec.name)
    for name, exc in errors.items():
        why = exc.one_line() if isinstance(exc, DeepfleetError) else first_line(exc)
        rows[name] = {**_blank(state, name), "error": f"{name}: {why}"}
    return {
        "cluster": state.cluster,
        "image": state.image,
        "nodes": [rows[n.spec.name] for n in state.nodes],
        "job": _job(state, job_name[0], lease[0], rows, timeout),
        "service": service(record[0], lease[0]),
        "links": stored_links(state, now),
    }


def stored_links(state: ClusterState, now: float) -> dict:
    """The recorded link table and its age (measured by up, a job or `deepfleet links`)."""
    return links.as_json(
        state.links, state.link_failures, state.links_measured_at, state.links_age(now)
    )


def service(record_text: str, holder: str | None) -> dict | None:
    """The running `deepfleet serve`, from its record on the master; None unless the
    service that wrote it still holds the lease (a killed one's record is stale)."""
    try:
        record = json.loads(record_text)
    except ValueError:
        return None
    if not isinstance(record, dict) or holder is None or record.get("held_by") != holder:
        return None
    replicas = [
        {k: r.get(k) for k in ("name", "machine", "state", "outstanding", "served", "failed",
                               "restarts", "tokens_per_s")}
        for r in record.get("replicas", []) if isinstance(r, dict)
    ]  # fmt: skip
    return {
        "url": str(record.get("url", "")),
        "model": str(record.get("model", "")),
        "held_by": holder,
        "started": record.get("started"),
        "replicas": replicas,
    }


def _blank(state: ClusterState, name: str) -> dict:
    node = next(n for n in state.nodes if n.spec.name == name)
    return {
        "node": name, "address": node.spec.host, "container": node.container_name,
        "state": "unreachable", "uptime_s": None, "flavor": node.flavor, "cpus": None,
        "versions": {}, "gpu_summary": "?", "gpus": [],
    }  # fmt: skip


def _job(state: ClusterState, job: str | None, holder, rows: dict, timeout: float):
    if not job:
        return None
    found: dict[str, dict] = {}

    def tail(node: NodeState) -> None:
        client = connect(node.spec, timeout)
        try:
            container = client.containers.get(node.container_name)
            text = exec_text(container, _rank0_tail(job), node.spec.name)
            if text.strip():
                found[node.spec.name] = parse_step(text)
        finally:
            client.close()

    running = [n for n in state.nodes if rows[n.spec.name]["state"] == "running"]
    fan_out(running, tail, lambda n: n.spec.name)
    where = next((n.spec.name for n in state.nodes if n.spec.name in found), None)
    progress = found.get(where) or parse_step("")
    return {"name": job, "running": holder is not None, "held_by": holder, **progress,
            "log_on": where}  # fmt: skip


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def render(status: dict) -> str:
    lines = [f"cluster {status['cluster']}"]
    lines.append(
        f"{'NODE':<12} {'ADDRESS':<16} {'STATE':<11} {'UPTIME':>7} {'FLAVOR':<6} {'CPUS':>4}  "
        f"{'GPUS':<24} VERSIONS"
    )
    for r in status["nodes"]:
        v = r["versions"]
        versions = " ".join(f"{k}={v.get(k)}" for k in ("torch", "deepspeed", "transformers"))
        lines.append(
            f"{r['node']:<12} {r['address']:<16} {r['state']:<11} {_duration(r['uptime_s']):>7} "
            f"{r['flavor']:<6} {r['cpus'] or '?':>4}  {r['gpu_summary']:<24} {versions}"
        )
        for g in r["gpus"]:
            util = "?" if g["utilization_pct"] is None else f"{g['utilization_pct']:.0f}%"
            lines.append(
                f"  gpu {g['index']} {g['name'] or '?'}: memory {_gib(g['memory_used_bytes'])}"
                f"/{_gib(g['memory_total_bytes'])} GiB, utilisation {util}"
            )
        if r.get("error"):
            lines.append(f"  {r['error']}")
    job = status["job"]
    if job is None:
        lines.append("job: none has run on this cluster")
    else:
        state = f"running (from {job['held_by']})" if job["running"] else "not running"
        lines.append(f"job {job['name']}: {state}")
        if job["step"] is not None:
            loss = f"loss {job['loss']:.4f}" if job["loss"] is not None else "loss ?"
            rate = f", {job['tokens_per_s']:.0f} tok/s" if job["tokens_per_s"] else ""
            eta = f", eta {_duration(job['eta_s'])}" if job["running"] and job["eta_s"] else ""
            lines.append(f"  step {job['step']}/{job['steps']} {loss}{rate}{eta}")
    lines += _render_service(status.get("service"))
    table = status.get("links")
    if table is not None:
        lines.append(links.render(table["links"], table["failures"], table["age_s"]))
    return "\n".join(lines)


def _render_service(svc: dict | None) -> list[str]:
    if svc is None:
        return []
    served = sum(r["served"] or 0 for r in svc["replicas"])
    lines = [f"service {svc['model']!r} at {svc['url']} (from {svc['held_by']}): "
             f"{len(svc['replicas'])} replicas, {served} requests answered"]  # fmt: skip
    for r in svc["replicas"]:
        lines.append(
            f"  {r['name']:<12} {r['state']:<9} served {r['served']}, in flight "
            f"{r['outstanding']}, failed {r['failed']}, restarts {r['restarts']}, "
            f"{r['tokens_per_s'] or 0:.1f} tokens/s"
        )
    return lines
