"""Running one launch on the cluster and ending it: whatever happens, nothing keeps running.

Before: the launch files, a clean slate (heartbeats, processes an earlier job left) and
the network preflight. During: the launcher's labelled output and the watchdog. After a
rank dies, a node is lost, or the operator is interrupted (Ctrl-C, SIGTERM, SIGHUP):
every rank on every node is stopped and the job ends with one line naming the node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import docker
import requests

from deepfleet.cluster.session import Session
from deepfleet.errors import ContainerError, JobError, ignoring_interrupts
from deepfleet.jobs import joblogs, launch
from deepfleet.jobs.watchdog import (
    HEARTBEAT_DIR,
    LEASE,
    LEASE_READ_SH,
    LivenessPolicy,
    Watchdog,
    lease_text,
    live_lease,
)
from deepfleet.layout import CLUSTER_KEY, RUN_DIR, SSH_DIR
from deepfleet.machines import links, preflight, transfer
from deepfleet.machines.connect import docker_cause
from deepfleet.planning import hostfile
from deepfleet.planning.plan import ClusterPlan, describe
from deepfleet_node.heartbeat import DIR_ENV as HEARTBEAT_ENV
from deepfleet_node.ranksetup import PG_TIMEOUT_ENV


@dataclass(frozen=True)
class RunOptions:
    liveness: LivenessPolicy = LivenessPolicy()
    collective_timeout: float = 600.0  # a collective waiting on a peer gives up after this
    preflight_timeout: float = 5.0
    backend: str | None = None  # cuda | rocm | cpu; None: the group with the most capacity
    mixed: bool = False  # every backend group in one gloo world (replicas, --bridge)
    verbose: bool = False  # the libraries' chatter on the terminal too, not only in the logs


def job_env(options: RunOptions, job: str) -> dict[str, str]:
    """A job's own settings for its ranks, over the plan's (see slurm.py too)."""
    return {
        "HF_HUB_OFFLINE": "1",
        PG_TIMEOUT_ENV: f"{options.collective_timeout:.0f}",
        HEARTBEAT_ENV: HEARTBEAT_DIR,
        **joblogs.launch_env(job),
    }


def launch_env(plan: ClusterPlan, options: RunOptions, job: str) -> dict[str, str]:
    return {**plan.env, **job_env(options, job)}


def write_launch_files(session: Session, plan: ClusterPlan, options: RunOptions, job: str) -> None:
    """The master's hostfile, .deepspeed_env and ssh config for this launch, and the
    job its logs go under."""
    master = session.master
    container = session.container(master)
    run_on(session, master, joblogs.mark_current_argv(job))
    env = hostfile.render_deepspeed_env(launch_env(plan, options, job)).encode()
    ssh_config = hostfile.render_ssh_config(plan, CLUSTER_KEY, f"{SSH_DIR}/known_hosts").encode()
    transfer.put_files(
        container, RUN_DIR, {"hostfile": (hostfile.render_hostfile(plan).encode(), 0o644)}, master
    )
    transfer.put_files(container, "/root", {".deepspeed_env": (env, 0o644)}, master)
    transfer.put_files(container, SSH_DIR, {"config": (ssh_config, 0o600)}, master)


def run_on(session: Session, name: str, argv: list[str]) -> str:
    """A short command in a node's container; an engine refusal is one line naming the node."""
    node = session.node_state(name)
    api = session.clients[name].api
    try:
        return api.exec_start(api.exec_create(node.container_id, argv)["Id"]).decode(
            errors="replace"
        )
    except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
        raise ContainerError(docker_cause(exc, node.container_name), name) from exc


def check_no_live_job(session: Session, policy: LivenessPolicy) -> None:
    """Refuse while another operator's job runs here: its watchdog renews the master's lease."""
    master = session.master
    holder = live_lease(run_on(session, master, ["sh", "-c", LEASE_READ_SH]), policy)
    if holder:
        raise JobError(
            f"a job started from {holder} is running on this cluster; wait for it, or end it "
            "with Ctrl-C there or `deepfleet stop`",
            1,
            master,
        )


def release_lease(session: Session) -> None:
    """`deepfleet stop`: the job is over, whoever started it."""
    run_on(session, session.master, ["rm", "-f", LEASE])


def clean_slate(session: Session, containers: dict[str, str], out) -> None:
    """No stamps or processes from an earlier job (one whose operator was killed): its
    ranks would hold the ports and the rendezvous."""
    for name, count in launch.stop_counted(session.clients, containers).items():
        if count is None:
            out.write(f"[{name}] could not check for an earlier job's processes\n")
        elif count:
            what = "process" if count == 1 else "processes"
            out.write(f"[{name}] stopped {count} {what} an earlier job left behind\n")
    for name in containers:
        run_on(session, name, ["rm", "-rf", HEARTBEAT_DIR])


def run_job(
    session: Session,
    module: str,
    args: list[str],
    out,
    slots: dict | None = None,
    secrets: dict | None = None,
    options: RunOptions | None = None,
    checked: bool = False,
    job: str = "job",
) -> list[str]:
    """Launch `module` on the plan; `checked`: ready_cluster already ran for this job;
    `job`: the name its logs go under on every machine (joblogs)."""
    options = options or RunOptions()
    if not checked:
        ready_cluster(session, slots, options, out)
    plan = job_plan(session, slots, options.backend, options.mixed)
    out.write(describe(plan, detail=options.verbose) + "\n")
    master = session.master
    every = session.container_ids()
    # the planned nodes, and the master: the launcher runs there even when it has no slot
    containers = {name: every[name] for name in [master, *(n.name for n in plan.nodes)]}
    write_launch_files(session, plan, options, job)
    spec = launch.launch_spec(plan, module, args, master)
    if options.verbose:
        out.write(f"deepfleet: {spec.shell()}\n")
    out.write(f"deepfleet: job {job}: every rank's output in {joblogs.job_dir(job)} on its "
              f"machine (`deepfleet logs --job {job}`)\n")  # fmt: skip

    stopped: list[str] = []  # the first fault stops the job; what it sets off is its echo

    def stop_everything(reason: str) -> None:
        if stopped:
            return
        stopped.append(reason)
        out.write(f"deepfleet: {reason}; stopping every rank\n")
        out.flush()
        launch.stop_all(session.clients, every)

    def rank_failed(name: str, code: int) -> None:
        if code == -1:
            stop_everything(f"{name} dropped the launcher's ssh session")
        else:
            stop_everything(f"a rank on {name} exited with code {code}")

    def lost(name: str, cause: str) -> None:
        stop_everything(f"{name}: {cause}")

    watchdog = Watchdog(
        session.clients, containers, options.liveness, lost, lease=(master, lease_text())
    )
    try:
        result = launch.run(
            session.clients[master], containers[master], plan, spec, out,
            redact=list((secrets or {}).values()), on_rank_failed=rank_failed, watchdog=watchdog,
            verbose=options.verbose,
        )  # fmt: skip
    except KeyboardInterrupt as exc:  # Ctrl-C, and SIGTERM/SIGHUP (see cli.main)
        watchdog.stop()
        with ignoring_interrupts():  # a second Ctrl-C must not cut the stop short
            stop_everything(f"interrupted ({getattr(exc, 'name', 'SIGINT')})")
        raise
    return _outcome(module, master, result)


def _outcome(module: str, master: str, result: launch.LaunchResult) -> list[str]:
    if result.lost:
        name, cause = result.lost
        raise JobError(f"{cause}; the ranks on the other nodes were stopped", 1, name)
    if result.failed:
        name, code = result.failed
        why = result.errors.get(name)
        if why is None and code < 0:
            why = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
        raise JobError(
            f"{module}: a rank exited with code {code}: {why or 'no error line'}; "
            "the ranks on every node were stopped",
            code if 0 < code < 256 else 1,  # a signal (-9) is no exit status
            name,
        )
    if result.code != 0:
        why = result.errors.get(master)
        raise JobError(
            f"{module} exited with code {result.code}" + (f": {why}" if why else ""),
            result.code,
            master,
        )
    return result.lines


def job_plan(
    session: Session, slots: dict | None, backend: str | None = None, mixed: bool = False
) -> ClusterPlan:
    """The plan a job runs: the cluster's slots with the job's own over them."""
    return session.plan(
        slots={**session.state.slots, **(slots or {})}, backend=backend, mixed=mixed
    )


def ready_cluster(session: Session, slots: dict | None, options: RunOptions, out) -> None:
    """Before anything is copied: no other job running, nothing left of a dead one (its
    ranks would hold the ports), and every path the job uses answers."""
    check_no_live_job(session, options.liveness)
    clean_slate(session, session.container_ids(), out)
    check_network(session, slots, options, out)


def check_network(session: Session, slots: dict | None, options: RunOptions, out) -> None:
    """The preflight, before anything is copied: a blocked port fails in seconds. Then the
    links are measured again when the recorded ones are older than `--links-max-age`
    (about a second per machine; a failure there is a warning, not a failed job)."""
    plan = job_plan(session, slots, options.backend, options.mixed)
    preflight.run(session, plan, timeout=options.preflight_timeout, out=out)
    if links.stale(session.state, time.time()):
        age = session.state.links_age(time.time())
        why = " (none recorded)" if age is None else f" ({links.age_text(age)})"
        links.refresh(session.state, session.clients, session.store, out, why=why)
