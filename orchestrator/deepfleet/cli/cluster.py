"""The commands that bring machines up and look after them: up, status, links, down,
doctor, logs, exec, shell, init."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from deepfleet.cli.common import (
    add_cluster_file,
    given,
    inventory_from,
    parse_slots,
)
from deepfleet.cluster import down as cluster_down
from deepfleet.cluster import up as cluster_up
from deepfleet.cluster.session import UpOptions, open_session
from deepfleet.errors import DeepfleetError
from deepfleet.health import doctor, status
from deepfleet.images import relay
from deepfleet.inventory import clusterfile
from deepfleet.inventory.nodes import Inventory
from deepfleet.jobs import joblogs
from deepfleet.jobs.jobrun import check_no_live_job
from deepfleet.jobs.watchdog import LivenessPolicy
from deepfleet.machines import interactive, links
from deepfleet.machines.state import StateStore
from deepfleet.planning import flavors


def cmd_up(args) -> int:
    inventory, opts = up_request(args)
    if args.dry_run:
        plan = cluster_up.dry_run(inventory, opts, out=sys.stderr if args.json else sys.stdout)
        print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.describe())
        return 0
    cluster_up.up(inventory, StateStore(args.state_dir), opts)
    return cmd_status(args)


def up_request(args) -> tuple[Inventory, UpOptions]:
    """The machines and options `up` was given, from NODES and flags or a cluster file."""
    inventory, cf = inventory_from(args)
    opts = UpOptions(
        image=args.image or (cf and cf.image),
        default_flavor=args.flavor or (cf and cf.flavor),
        compose_overrides=[
            *(cf.compose_overrides if cf else ()),
            *map(Path, args.compose_override),
        ],
        cpu_slots=given(args.cpu_slots, cf and cf.cpu_slots, 1),
        slots={**(cf.slots if cf else {}), **parse_slots(args.slots)},
        pull=args.pull,
        timeout=args.timeout,
        use_relay=args.use_relay,
        relay_port=given(args.relay_port, cf and cf.relay_port, relay.RELAY_PORT),
    )
    return inventory, opts


def cmd_status(args) -> int:
    state = StateStore(args.state_dir).load()
    current = status.gather(state, args.timeout)
    if getattr(args, "json", False):
        print(json.dumps(current, indent=2))
    else:
        print(status.render(current))
    return 0


def cmd_links(args) -> int:
    """Measure every link now, record it, print the table (and what doctor would mark)."""
    store = StateStore(args.state_dir)
    session = open_session(store, args.timeout)
    try:
        # a job's traffic and the measurement's would each slow the other
        check_no_live_job(session, LivenessPolicy())
        state = session.state
        measured = links.measure(state, session.clients, operator=not args.no_operator)
        state.record_links(measured.links, measured.failures, measured.measured_at)
        store.save(state)
    finally:
        session.close()
    verdicts = links.assess(measured.links)
    if args.json:
        table = links.as_json(measured.links, measured.failures, measured.measured_at, 0.0)
        table["verdicts"] = [vars(v) for v in verdicts]
        print(json.dumps(table, indent=2))
    else:
        print(links.render(measured.links, measured.failures, 0.0))
        for v in verdicts:
            print(f"slow: {v.detail}\n  fix: {v.fix}")
        print(f"deepfleet: {measured.summary()}")
    for line in measured.failures:
        print(f"deepfleet: {line}", file=sys.stderr)
    return 1 if measured.failures else 0


def cmd_down(args) -> int:
    warnings = cluster_down.down(
        StateStore(args.state_dir), volumes=args.volumes, timeout=args.timeout
    )
    for line in warnings:
        print(f"deepfleet: warning: {line}", file=sys.stderr)
    if warnings:
        print("deepfleet: cluster partly removed; what is left stays in the state")
        return 1
    print("deepfleet: cluster removed")
    return 0


def _machines(session, wanted: list[str]) -> list[str]:
    names = [n.spec.name for n in session.state.nodes]
    for name in wanted:
        if name not in names:
            raise DeepfleetError(f"no machine {name!r} in this cluster ({', '.join(names)})")
    return wanted or names


def cmd_logs(args) -> int:
    store = StateStore(args.state_dir)
    session = open_session(store, args.timeout)
    try:
        machines = _machines(session, [args.machine] if args.machine else [])
        master = session.master
        job = args.job or joblogs.current_job(
            session.clients[master], session.node_state(master).container_id
        )
        if not job:
            raise DeepfleetError("no job has run on this cluster yet (or give --job RUN)")
        sources = [
            joblogs.Source(m, session.clients[m], session.node_state(m).container_id)
            for m in machines
        ]
        missing = joblogs.stream(sources, job, args.follow, args.lines)
    finally:
        session.close()
    if missing and len(missing) == len(sources):
        raise DeepfleetError(f"no logs of job {job!r} on {', '.join(missing)}")
    for name in missing:
        print(f"deepfleet: [{name}] holds no log of job {job} (it ran no rank)", file=sys.stderr)
    return 0


def cmd_exec(args) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise DeepfleetError("exec: give a command after the machine: exec lab1 -- nvidia-smi")
    session = open_session(StateStore(args.state_dir), args.timeout)
    try:
        return interactive.run(session, args.machine, command)
    finally:
        session.close()


def cmd_shell(args) -> int:
    state = StateStore(args.state_dir).load()
    argv = interactive.shell_argv(state, args.machine, args.command)
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # ssh owns the terminal from here; its exit status is ours


def cmd_doctor(args) -> int:
    import docker

    store = StateStore(args.state_dir)
    if args.nodes or args.cluster_file:
        nodes = list(inventory_from(args)[0].nodes)
        cluster_up = False
    else:
        nodes = list(store.load().inventory.nodes)
        cluster_up = True
    try:
        local = docker.from_env()
        local.ping()
    except Exception:
        local = None
    checks = [] if local is not None else [doctor.no_local_engine()]
    checks += doctor.run(nodes, local, args.image, cluster_up, args.timeout)
    if cluster_up:  # the same network checks a job's launch runs first
        checks += doctor.cluster_network_checks(store, args.timeout)
        checks += doctor.cluster_links_checks(store, args.timeout)
    print(doctor.render(checks, ascii=doctor.wants_ascii(sys.stdout)))
    print(doctor.summary(checks))
    if doctor.blocks_up(checks):
        print("doctor: `up` would fail until the failed rows above are fixed", file=sys.stderr)
    # a FAIL that does not stop `up` (a blocked port between machines) still stops a job
    return 1 if any(c.level == "FAIL" for c in checks) else 0


def cmd_init(args) -> int:
    """A commented cluster file from NODES, or from the cluster that is up."""
    if args.nodes:
        inventory, _ = inventory_from(args)
        image, slots, overrides = args.image, parse_slots(args.slots), list(args.compose_override)
    else:
        state = StateStore(args.state_dir).load()
        inventory, image, slots, overrides = (
            state.inventory, args.image or state.image or None, dict(state.slots),
            list(state.compose_overrides),
        )  # fmt: skip
    out = Path(args.out)
    if out.exists() and not args.force:
        raise DeepfleetError(f"{out} exists; --force to replace it")
    text = clusterfile.render_init(
        inventory, image=image, slots=slots, compose_overrides=[Path(p) for p in overrides],
        ssh_config=args.ssh_config, name=out.name,
    )  # fmt: skip
    out.write_text(text)
    machines = len(inventory.nodes)
    print(f"deepfleet: wrote {out} ({machines} machines): deepfleet up --cluster-file {out}")
    return 0


def add_up(sub) -> None:
    up = sub.add_parser("up", help="start one container per node and plan the cluster")
    up.add_argument("nodes", nargs="*", help="[user@]host[:port][=flavor] or SSH config alias")
    add_cluster_file(up)
    up.add_argument("--ssh-config", default=os.environ.get("DEEPFLEET_SSH_CONFIG"))
    up.add_argument(
        "--image",
        default=None,
        help="node image (default deepfleet/<flavor>:latest); REGISTRY/REPO@sha256:... to pull "
        "by digest; 'published': the newest pushed image of images/versions.env",
    )
    up.add_argument("--flavor", default=None, choices=flavors.NAMES, help="default: per machine")
    up.add_argument("--compose-override", action="append", default=[], metavar="FILE")
    up.add_argument(
        "--cpu-slots", type=int, default=None, help="processes per CPU-only node (default 1)"
    )
    up.add_argument("--slots", action="append", default=[], metavar="NODE=N")
    up.add_argument("--pull", choices=("auto", "always", "never"), default="auto")
    up.add_argument(
        "--no-relay", dest="use_relay", action="store_false",
        help="stream the image from here to each machine instead of machine to machine",
    )  # fmt: skip
    up.add_argument(
        "--relay-port", type=int, default=None,
        help=f"the port each machine listens on for the image from the one before it "
        f"(default {relay.RELAY_PORT})",
    )  # fmt: skip
    up.add_argument(
        "--dry-run", action="store_true",
        help="probe the machines and print what up would do on each (its exact container "
        "request), changing nothing",
    )  # fmt: skip
    up.add_argument(
        "--json", action="store_true", help="as JSON: the plan with --dry-run, else the status"
    )
    up.set_defaults(func=cmd_up)


def add_status(sub) -> None:
    st = sub.add_parser("status", help="nodes, containers, GPUs and versions")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)


def add_links(sub) -> None:
    lk = sub.add_parser(
        "links", help="measure every link now: bandwidth each way and round-trip time"
    )
    lk.add_argument("--json", action="store_true", help="the table, failures and verdicts")
    lk.add_argument(
        "--no-operator", action="store_true",
        help="only the links between the machines, not this machine's link to each",
    )  # fmt: skip
    lk.set_defaults(func=cmd_links)


def add_down(sub) -> None:
    dn = sub.add_parser("down", help="remove every container, key and state made by up")
    dn.add_argument("--volumes", action="store_true", help="also remove models/data/checkpoints")
    dn.set_defaults(func=cmd_down)


def add_doctor(sub) -> None:
    dr = sub.add_parser("doctor", help="check the machines and say how to fix what is wrong")
    dr.add_argument("nodes", nargs="*", help="default: the nodes of the cluster that is up")
    add_cluster_file(dr)
    dr.add_argument("--ssh-config", default=os.environ.get("DEEPFLEET_SSH_CONFIG"))
    dr.add_argument("--image", default=None)
    dr.set_defaults(func=cmd_doctor)


def add_logs(sub) -> None:
    lg = sub.add_parser("logs", help="a job's logs from every machine, each line labelled")
    lg.add_argument("machine", nargs="?", help="one machine only (default: all)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing as they grow")
    lg.add_argument("--job", default=None, metavar="RUN", help="default: the latest job")
    lg.add_argument("-n", "--lines", type=int, default=None, help="the last N lines of each")
    lg.set_defaults(func=cmd_logs)


def add_exec(sub) -> None:
    ex = sub.add_parser("exec", help="run a command in a machine's node container")
    ex.add_argument("machine")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    ex.set_defaults(func=cmd_exec)


def add_shell(sub) -> None:
    sh = sub.add_parser("shell", help="an interactive shell in a machine's node container")
    sh.add_argument("machine")
    sh.add_argument("command", nargs="?", default="bash", help="default bash")
    sh.set_defaults(func=cmd_shell)


def add_init(sub) -> None:
    it = sub.add_parser("init", help="write a commented cluster.yaml from NODES or the cluster")
    it.add_argument("nodes", nargs="*", help="as up's; default: the cluster that is up")
    it.add_argument("--ssh-config", default=os.environ.get("DEEPFLEET_SSH_CONFIG"))
    it.add_argument("--image", default=None)
    it.add_argument("--slots", action="append", default=[], metavar="NODE=N")
    it.add_argument("--compose-override", action="append", default=[], metavar="FILE")
    it.add_argument("--out", default="cluster.yaml")
    it.add_argument("--force", action="store_true", help="replace the file if it exists")
    it.set_defaults(func=cmd_init)
