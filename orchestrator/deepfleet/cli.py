"""deepfleet's command line. Every DeepfleetError becomes one line on stderr and exit 1."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from . import (
    cluster,
    clusterfile,
    doctor,
    flavors,
    joblogs,
    jobrun,
    jobs,
    launch,
    machine_exec,
    memfit,
    relay,
    reports,
    serveplan,
    slurm,
    status,
    trainplan,
)
from .build import BuildRequest, build, build_relay
from .connect import DEFAULT_STALL, STALL_ENV, first_line
from .errors import DeepfleetError, Interrupted, JobError, raise_interrupted
from .inventory import DEFAULT_SSH_CONFIG, Inventory, NodeSpec, resolve
from .jobrun import RunOptions
from .plan import describe, plan_cluster, plan_dict
from .state import StateStore
from .watchdog import LivenessPolicy


def _split_nodes(values: list[str]) -> list[str]:
    return [word for value in values for word in value.split()]


def _slots(values: list[str]) -> dict[str, int]:
    slots = {}
    for value in values:
        for item in value.replace(",", " ").split():
            name, sep, count = item.rpartition("=")
            if not sep or not count.isdigit():
                raise DeepfleetError(f"--slots expects NODE=N, got {item!r}")
            slots[name] = int(count)
    return slots


def _inventory(args) -> tuple[Inventory, clusterfile.ClusterFile | None]:
    """The machines from NODES words or from a cluster file, never both."""
    if getattr(args, "cluster_file", None):
        if args.nodes:
            raise DeepfleetError("give the machines as NODES or in --cluster-file, not both")
        loaded = clusterfile.load(args.cluster_file)
        return loaded.inventory(), loaded
    ssh_config = Path(args.ssh_config) if args.ssh_config else DEFAULT_SSH_CONFIG
    return resolve(_split_nodes(args.nodes), ssh_config), None


def _given(flag, from_file, default):
    """A flag typed on the command line wins over the cluster file, which wins over the default."""
    return next((v for v in (flag, from_file) if v is not None), default)


def cmd_up(args) -> int:
    inventory, opts = up_request(args)
    if args.dry_run:
        plan = cluster.dry_run(inventory, opts, out=sys.stderr if args.json else sys.stdout)
        print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.describe())
        return 0
    cluster.up(inventory, StateStore(args.state_dir), opts)
    return cmd_status(args)


def up_request(args) -> tuple[Inventory, cluster.UpOptions]:
    """The machines and options `up` was given, from NODES and flags or a cluster file."""
    inventory, cf = _inventory(args)
    opts = cluster.UpOptions(
        image=args.image or (cf and cf.image),
        default_flavor=args.flavor or (cf and cf.flavor),
        compose_overrides=[
            *(cf.compose_overrides if cf else ()),
            *map(Path, args.compose_override),
        ],
        cpu_slots=_given(args.cpu_slots, cf and cf.cpu_slots, 1),
        slots={**(cf.slots if cf else {}), **_slots(args.slots)},
        pull=args.pull,
        timeout=args.timeout,
        use_relay=args.use_relay,
        relay_port=_given(args.relay_port, cf and cf.relay_port, relay.RELAY_PORT),
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


def cmd_down(args) -> int:
    warnings = cluster.down(StateStore(args.state_dir), volumes=args.volumes, timeout=args.timeout)
    for line in warnings:
        print(f"deepfleet: warning: {line}", file=sys.stderr)
    if warnings:
        print("deepfleet: cluster partly removed; what is left stays in the state")
        return 1
    print("deepfleet: cluster removed")
    return 0


def _train_request(args) -> jobs.TrainRequest:
    return replace(
        _train_job(args),
        bridge=args.bridge,
        slots=_slots(args.slots),
        options=_run_options(args),
    )


def _train_job(args) -> jobs.TrainRequest:
    """The job's own settings (_add_train_job's), whoever runs it."""
    return jobs.TrainRequest(
        model=args.model,
        data=args.data,
        config=args.config,
        run=args.run,
        steps=args.steps,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        lr=args.lr,
        log_every=args.log_every,
        save_every=args.save_every,
        resume=args.resume,
        epochs=args.epochs,
        global_batch=args.global_batch,
        balance=args.balance,
        extra=args.extra,
    )


def _run_options(args) -> RunOptions:
    return RunOptions(
        liveness=LivenessPolicy(
            interval=min(10.0, max(1.0, args.liveness_timeout / 6)), timeout=args.liveness_timeout
        ),
        collective_timeout=args.collective_timeout,
        preflight_timeout=args.preflight_timeout,
        backend=args.backend,
        verbose=args.verbose,
    )


def _add_cluster_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster-file", metavar="FILE", default=None,
        help="machines and options from a cluster.yaml (`deepfleet init` writes one)",
    )  # fmt: skip


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend", choices=("cuda", "rocm", "cpu"), default=None,
        help="run on these machines only (default: the group with the most GPU memory)",
    )  # fmt: skip


def _add_run_options(p: argparse.ArgumentParser) -> None:
    _add_backend(p)
    p.add_argument(
        "--liveness-timeout", type=float, default=LivenessPolicy().timeout, metavar="S",
        help="end the job when a machine or rank shows no sign of life for this long",
    )  # fmt: skip
    p.add_argument(
        "--collective-timeout", type=float, default=RunOptions().collective_timeout,
        metavar="S", help="a collective waiting on a peer gives up after this (torch: 1800)",
    )  # fmt: skip
    p.add_argument(
        "--preflight-timeout", type=float, default=RunOptions().preflight_timeout, metavar="S",
        help="how long each network check waits for an answer",
    )  # fmt: skip


def _add_balance(p) -> None:
    p.add_argument(
        "--balance", default="speed", choices=trainplan.BALANCES,
        help="speed: each rank's micro-batch follows its measured speed (default); even",
    )  # fmt: skip


def _add_train_job(tr: argparse.ArgumentParser) -> None:
    """The training job itself: what `train` runs and `export slurm` writes."""
    tr.add_argument("--model", default=jobs.DEMO, help="demo, a local dir, or a hub name")
    tr.add_argument("--data", default=jobs.DEMO, help="demo, or a local .txt/.jsonl file or dir")
    tr.add_argument(
        "--config", default="zero2",
        help="zero1|zero2|zero3|zero3-offload, auto (the cheapest that fits), or a path",
    )  # fmt: skip
    tr.add_argument("--run", default="demo", help="run name: checkpoints/<run> on every node")
    tr.add_argument("--steps", type=int, default=60)
    tr.add_argument("--epochs", type=float, default=None, help="instead of --steps")
    tr.add_argument("--global-batch", type=int, default=None, help="sets gradient accumulation")
    tr.add_argument("--seq-len", type=int, default=64)
    tr.add_argument("--micro-batch", type=int, default=4)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument(
        "--log-every", type=int, default=0, help="a progress line every N steps (0: about 6 a run)"
    )
    tr.add_argument("--save-every", type=int, default=0)
    tr.add_argument("--resume", action="store_true")
    _add_balance(tr)


def cmd_plan(args) -> int:
    """The plan from the saved cluster, or from detect reports given as files."""
    if args.reports:
        paths = [Path(p) for p in args.reports]
        reports_ = {}
        for path in paths:
            try:
                reports_[path.stem] = reports.parse(path.read_bytes(), path.stem)
            except OSError as exc:
                raise DeepfleetError(f"cannot read report {path}: {exc.strerror}") from exc
        inventory = Inventory(
            tuple(
                NodeSpec(name, (r.ips or (name,))[0], "root", 22, None, "/dev/null")
                for name, r in reports_.items()
            ),
            None,
        )

        def replan(extra):
            return plan_cluster(
                inventory, reports_, cpu_slots=args.cpu_slots,
                slots={**_slots(args.slots), **extra}, backend=args.backend,
            )  # fmt: skip

    else:
        session = cluster.Session(StateStore(args.state_dir).load(), {})
        reports_ = session.state.reports()

        def replan(extra):
            return jobrun.job_plan(session, {**_slots(args.slots), **extra}, args.backend)

    plan = replan({})
    shape = None
    if args.model_info:
        shape = _model_info(Path(args.model_info))
    tp = trainplan.plan_training(
        plan, reports_, shape, args.config, args.seq_len, args.micro_batch, args.balance, replan
    )
    if args.json:
        print(json.dumps({**plan_dict(tp.cluster), "train": trainplan.as_dict(tp)}, indent=2))
    else:
        print(describe(tp.cluster))
        print(trainplan.describe(tp))
    return 0


def _model_info(path: Path) -> memfit.ModelShape:
    """A model's shape as `python -m deepfleet_node.modelinfo --model M` prints it."""
    try:
        return memfit.ModelShape.from_info(json.loads(path.read_text()), name=path.stem)
    except OSError as exc:
        raise DeepfleetError(f"cannot read {path}: {exc.strerror}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise DeepfleetError(f"{path} is not modelinfo's JSON (missing {exc})") from exc


def cmd_stop(args) -> int:
    session = cluster.open_session(StateStore(args.state_dir), args.timeout)
    try:
        left = launch.stop_all(session.clients, session.container_ids())
        jobrun.release_lease(session)
    finally:
        session.close()
    for name in left:
        print(f"deepfleet: warning: {name}: did not answer; its ranks may still run")
    print("deepfleet: every job process on the cluster stopped")
    return 1 if left else 0


def cmd_fetch_model(args) -> int:
    session = cluster.open_session(StateStore(args.state_dir), args.timeout, heal=True)
    try:
        jobs.fetch_model(session, args.run, Path(args.dest or f"models/{args.run}"))
    finally:
        session.close()
    return 0


def cmd_train(args) -> int:
    req = _train_request(args)
    store = StateStore(args.state_dir)
    if args.dry_run:
        state = store.load()
        session = cluster.Session(state, {})
        options = jobs.train_options(req)
        plan = jobrun.job_plan(session, req.slots, options.backend, options.mixed)
        config = memfit.BRIDGE if req.bridge else req.config
        tp = trainplan.plan_training(
            plan, state.reports(), None, config, req.seq_len, req.micro_batch, req.balance
        )
        print(describe(plan))
        print(trainplan.describe(tp))
        if trainplan.memory_config(config):
            # the model's shape is read on the master at launch; a dry run connects nowhere
            print("memory: checked at launch from the model's shape, which may refuse the "
                  "job, pick CONFIG=auto's setting (shown: the cheapest) and add --max-micro "
                  "caps for speed balancing")  # fmt: skip
        print(jobs.train_dry_run(plan, req, tp.config, session.master))
        return 0
    session = cluster.open_session(store, args.timeout, heal=True, refresh=True)
    try:
        jobs.train(session, req)
    finally:
        session.close()
    return 0


def cmd_infer(args) -> int:
    req = jobs.InferRequest(
        model=args.model,
        run=args.run,
        prompts=args.prompt,
        prompts_file=args.prompts,
        max_new_tokens=args.max_new_tokens,
        greedy=not args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        output=args.output,
        slots=_slots(args.slots),
        mode=args.mode,
        extra=args.extra,
        options=_run_options(args),
    )
    session = cluster.open_session(
        StateStore(args.state_dir), args.timeout, heal=True, refresh=True
    )
    try:
        jobs.infer(session, req)  # rank 0 prints each completion as the results merge
    finally:
        session.close()
    return 0


def cmd_serve(args) -> int:
    from . import servejob  # the HTTP stack, only for the command that uses it

    store = StateStore(args.state_dir)
    if args.dry_run:
        session = cluster.Session(store.load(), {})
        req = _serve_request(args)
        servejob.check_listen(req.host, req.port, req.api_key)
        print(serveplan.describe(servejob.plan_replicas(session, req, None)))
        print(f"gateway: {servejob.Listen(req.host, req.port, req.api_key).url} (the model's "
              "size is read at start; a machine it does not fit then sits out)")  # fmt: skip
        return 0
    req = _serve_request(args)
    if not args.stop:  # before connecting anywhere: a refused --listen costs nothing
        servejob.check_listen(req.host, req.port, req.api_key)
    session = cluster.open_session(store, args.timeout, heal=not args.stop, refresh=not args.stop)
    try:
        if args.stop:
            return servejob.stop_service(session, sys.stdout)
        try:
            servejob.serve(session, req)
        except (KeyboardInterrupt, Interrupted):
            pass  # Ctrl-C is how a service ends; serve() has stopped every replica
    finally:
        session.close()
    return 0


def _serve_request(args):
    from .servejob import ServeRequest

    return ServeRequest(
        model=args.model,
        run=args.run,
        host=args.listen,
        port=args.port,
        api_key=args.api_key or os.environ.get(serveplan.API_KEY_ENV) or None,
        max_tokens_limit=args.max_tokens_limit,
        slots=_slots(args.slots),
        verbose=args.verbose,
    )


def _machines(session, wanted: list[str]) -> list[str]:
    names = [n.spec.name for n in session.state.nodes]
    for name in wanted:
        if name not in names:
            raise DeepfleetError(f"no machine {name!r} in this cluster ({', '.join(names)})")
    return wanted or names


def cmd_logs(args) -> int:
    store = StateStore(args.state_dir)
    session = cluster.open_session(store, args.timeout)
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
    session = cluster.open_session(StateStore(args.state_dir), args.timeout)
    try:
        return machine_exec.run(session, args.machine, command)
    finally:
        session.close()


def cmd_shell(args) -> int:
    state = StateStore(args.state_dir).load()
    argv = machine_exec.shell_argv(state, args.machine, args.command)
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # ssh owns the terminal from here; its exit status is ours


def cmd_doctor(args) -> int:
    import docker

    store = StateStore(args.state_dir)
    if args.nodes or args.cluster_file:
        nodes = list(_inventory(args)[0].nodes)
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
    print(doctor.render(checks, ascii=doctor.wants_ascii(sys.stdout)))
    print(doctor.summary(checks))
    if doctor.blocks_up(checks):
        print("doctor: `up` would fail until the failed rows above are fixed", file=sys.stderr)
    # a FAIL that does not stop `up` (a blocked port between machines) still stops a job
    return 1 if any(c.level == "FAIL" for c in checks) else 0


def cmd_init(args) -> int:
    """A commented cluster file from NODES, or from the cluster that is up."""
    if args.nodes:
        inventory, _ = _inventory(args)
        image, slots, overrides = args.image, _slots(args.slots), list(args.compose_override)
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


def cmd_build(args) -> int:
    import docker

    req = BuildRequest(
        flavor=args.flavor,
        base_image=args.base_image,
        ca_dir=Path(args.ca_dir) if args.ca_dir else None,
        wheelhouse=Path(args.wheelhouse) if args.wheelhouse else None,
        torch_index_url=args.torch_index_url,
        tag=args.tag,
    )
    client = docker.from_env(timeout=3600)
    image_id = build(client, req, verbose=args.verbose)
    print(f"deepfleet: built {req.resolved_tag()} ({image_id[:19]})")
    relay_id = build_relay(client, args.base_image, verbose=args.verbose)
    print(f"deepfleet: built {relay.RELAY_IMAGE} ({relay_id[:19]}), the image relay")
    return 0


def _env_pairs(values: list[str]) -> dict[str, str]:
    found = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep:
            raise DeepfleetError(f"--env {value}: give NAME=VALUE")
        found[name] = text
    return found


def cmd_export_slurm(args) -> int:
    req = slurm.SlurmRequest(
        train=_train_job(args),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpu_slots=args.cpu_slots,
        flavor=args.flavor or "",
        runtime=args.runtime,
        image=args.image or "",
        workdir=args.workdir,
        partition=args.partition or "",
        time_limit=args.time or "",
        account=args.account or "",
        sbatch=tuple(args.sbatch),
        env=_env_pairs(args.env),
        compose_overrides=tuple(Path(f) for f in args.compose_override),
    )
    sys.stdout.write(slurm.render(req))
    return 0


def cmd_push_image(args) -> int:
    import docker

    from . import published, registry
    from .manifest import read_manifest

    manifest = read_manifest()
    local = docker.from_env(timeout=600)
    try:
        for flavor in args.flavor or ["cpu"]:
            source = flavors.get(flavor).image
            print(f"deepfleet: pushing {source} to {args.registry} (skopeo)", flush=True)
            entry = registry.push(
                local, source, args.registry, flavor, manifest,
                Path(args.cert_dir) if args.cert_dir else None, not args.no_tls_verify,
            )  # fmt: skip
            where = published.record(entry)
            print(f"deepfleet: pushed {entry['tag']}")
            print(f"deepfleet: up --image {entry['ref']}  (recorded in {where})")
    finally:
        local.close()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepfleet", description=__doc__)
    p.add_argument("--state-dir", type=Path, default=None, help="default ./.deepfleet")
    p.add_argument("--timeout", type=float, default=15.0, help="SSH connect timeout (s)")
    p.add_argument(
        "--stall-timeout", type=float, default=None, metavar="S",
        help=f"fail a transfer that makes no progress this long (default {DEFAULT_STALL:.0f})",
    )  # fmt: skip
    p.add_argument(
        "-v", "--verbose", action="store_true",
        help="show the libraries' chatter too (it always goes to the job logs)",
    )  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start one container per node and plan the cluster")
    up.add_argument("nodes", nargs="*", help="[user@]host[:port][=flavor] or SSH config alias")
    _add_cluster_file(up)
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

    st = sub.add_parser("status", help="nodes, containers, GPUs and versions")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    dn = sub.add_parser("down", help="remove every container, key and state made by up")
    dn.add_argument("--volumes", action="store_true", help="also remove models/data/checkpoints")
    dn.set_defaults(func=cmd_down)

    tr = sub.add_parser("train", help="train with the DeepSpeed launcher on the cluster")
    _add_train_job(tr)
    tr.add_argument(
        "--slots",
        action="append",
        default=[],
        metavar="NODE=N",
        help="processes on a node for this job (default: its GPUs, or --cpu-slots)",
    )
    tr.add_argument(
        "--bridge", action="store_true",
        help="one job over every machine's accelerator (NVIDIA, AMD, CPU), gradients over gloo",
    )  # fmt: skip
    tr.add_argument("--dry-run", action="store_true", help="print the launcher command only")
    _add_run_options(tr)
    tr.add_argument("extra", nargs="*", help="passed to train.py after --")
    tr.set_defaults(func=cmd_train)

    inf = sub.add_parser("infer", help="generate text with a trained or given model")
    inf.add_argument("--model", default="", help="default: the export of --run")
    inf.add_argument("--run", default="demo")
    inf.add_argument("--prompt", action="append", default=[])
    inf.add_argument("--prompts", default="", help="a .jsonl (prompt field) or .txt file")
    inf.add_argument("--max-new-tokens", type=int, default=32)
    inf.add_argument("--sample", action="store_true", help="sample instead of greedy")
    inf.add_argument("--temperature", type=float, default=1.0)
    inf.add_argument("--top-p", type=float, default=1.0)
    inf.add_argument("--seed", type=int, default=0)
    inf.add_argument(
        "--output", default="", help="local JSONL (default outputs/<run>-<time>.jsonl)"
    )
    inf.add_argument("--slots", action="append", default=[], metavar="NODE=N")
    inf.add_argument(
        "--mode", default="auto", choices=("auto", "replicas", "tp", "zero"),
        help="auto: replicas when the model fits one device, else tp in a node, else ZeRO-3",
    )  # fmt: skip
    _add_run_options(inf)
    inf.add_argument("extra", nargs="*", help="passed to infer.py after --")
    inf.set_defaults(func=cmd_infer)

    pl = sub.add_parser("plan", help="which machines and GPUs a job would run on, and why")
    pl.add_argument("--reports", nargs="+", metavar="FILE", help="detect --json files, no cluster")
    pl.add_argument("--slots", action="append", default=[], metavar="NODE=N")
    pl.add_argument("--cpu-slots", type=int, default=1, help="with --reports: per CPU machine")
    pl.add_argument("--json", action="store_true")
    pl.add_argument(
        "--model-info", metavar="FILE",
        help="modelinfo JSON (python -m deepfleet_node.modelinfo --model M): adds the memory fit",
    )  # fmt: skip
    pl.add_argument("--config", default="zero2", help="as train's --config (auto: cheapest fit)")
    pl.add_argument("--seq-len", type=int, default=64)
    pl.add_argument("--micro-batch", type=int, default=4)
    _add_balance(pl)
    _add_backend(pl)
    pl.set_defaults(func=cmd_plan)

    sv = sub.add_parser(
        "serve", help="an OpenAI-compatible endpoint in front of replicas on every machine"
    )
    sv.add_argument("--model", default="", help="default: the export of --run")
    sv.add_argument("--run", default="demo")
    sv.add_argument(
        "--listen", default="127.0.0.1", metavar="ADDR",
        help="the address to listen on (beyond loopback it needs --api-key)",
    )  # fmt: skip
    sv.add_argument("--port", type=int, default=serveplan.GATEWAY_PORT)
    sv.add_argument(
        "--api-key", default=None, metavar="KEY",
        help=f"requests must carry it (Bearer KEY); default ${serveplan.API_KEY_ENV}",
    )  # fmt: skip
    sv.add_argument(
        "--max-tokens-limit", type=int, default=serveplan.MAX_TOKENS_LIMIT, metavar="N",
        help="the most tokens one request may ask for",
    )  # fmt: skip
    sv.add_argument("--slots", action="append", default=[], metavar="NODE=N")
    sv.add_argument("--stop", action="store_true", help="stop the running service, from anywhere")
    sv.add_argument("--dry-run", action="store_true", help="print the replicas, start nothing")
    sv.set_defaults(func=cmd_serve)

    sp = sub.add_parser("stop", help="stop every job process (launcher, ranks) on every node")
    sp.set_defaults(func=cmd_stop)

    dr = sub.add_parser("doctor", help="check the machines and say how to fix what is wrong")
    dr.add_argument("nodes", nargs="*", help="default: the nodes of the cluster that is up")
    _add_cluster_file(dr)
    dr.add_argument("--ssh-config", default=os.environ.get("DEEPFLEET_SSH_CONFIG"))
    dr.add_argument("--image", default=None)
    dr.set_defaults(func=cmd_doctor)

    lg = sub.add_parser("logs", help="a job's logs from every machine, each line labelled")
    lg.add_argument("machine", nargs="?", help="one machine only (default: all)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing as they grow")
    lg.add_argument("--job", default=None, metavar="RUN", help="default: the latest job")
    lg.add_argument("-n", "--lines", type=int, default=None, help="the last N lines of each")
    lg.set_defaults(func=cmd_logs)

    ex = sub.add_parser("exec", help="run a command in a machine's node container")
    ex.add_argument("machine")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    ex.set_defaults(func=cmd_exec)

    sh = sub.add_parser("shell", help="an interactive shell in a machine's node container")
    sh.add_argument("machine")
    sh.add_argument("command", nargs="?", default="bash", help="default bash")
    sh.set_defaults(func=cmd_shell)

    fm = sub.add_parser("fetch-model", help="copy a run's HF export to this machine")
    fm.add_argument("--run", default="demo")
    fm.add_argument("--dest", default="", help="default models/<run>")
    fm.set_defaults(func=cmd_fetch_model)

    it = sub.add_parser("init", help="write a commented cluster.yaml from NODES or the cluster")
    it.add_argument("nodes", nargs="*", help="as up's; default: the cluster that is up")
    it.add_argument("--ssh-config", default=os.environ.get("DEEPFLEET_SSH_CONFIG"))
    it.add_argument("--image", default=None)
    it.add_argument("--slots", action="append", default=[], metavar="NODE=N")
    it.add_argument("--compose-override", action="append", default=[], metavar="FILE")
    it.add_argument("--out", default="cluster.yaml")
    it.add_argument("--force", action="store_true", help="replace the file if it exists")
    it.set_defaults(func=cmd_init)

    bd = sub.add_parser("build-image", help="build a node image from images/")
    bd.add_argument("--flavor", default="cpu", choices=flavors.NAMES)
    bd.add_argument(
        "--base-image",
        default="local",
        help="'local' (default): a debootstrap Debian base (cpu, cuda); "
        "'vendor': the Dockerfile's public base (nvidia/cuda, rocm/dev-ubuntu); or an image name",
    )
    bd.add_argument("--ca-dir", default="/usr/local/share/ca-certificates")
    bd.add_argument("--wheelhouse", default="/opt/wheels" if Path("/opt/wheels").is_dir() else "")
    bd.add_argument("--torch-index-url", default="")
    bd.add_argument("--tag", default="")
    bd.set_defaults(func=cmd_build)

    ph = sub.add_parser(
        "push-image", help="push the node images to a registry and record their digests"
    )
    ph.add_argument("registry", help="host[:port] of the registry")
    ph.add_argument("--flavor", action="append", choices=flavors.NAMES, help="default: cpu")
    ph.add_argument("--cert-dir", help="the registry's CA certificate(s), for a private CA")
    ph.add_argument("--no-tls-verify", action="store_true", help="a plain-HTTP registry")
    ph.set_defaults(func=cmd_push_image)

    xp = sub.add_parser("export", help="the same job for another scheduler")
    xsub = xp.add_subparsers(dest="target", required=True)
    xs = xsub.add_parser(
        "slurm", help="a training job as an sbatch script: deepfleet export slurm > job.sbatch"
    )
    xs.add_argument("--nodes", type=int, default=2, help="nodes to allocate (default 2)")
    xs.add_argument(
        "--gpus-per-node", type=int, default=0, metavar="G",
        help="ranks per node, one per GPU (default 0: CPU ranks, --cpu-slots of them)",
    )  # fmt: skip
    xs.add_argument("--cpu-slots", type=int, default=1, help="CPU ranks per node (default 1)")
    xs.add_argument(
        "--flavor", choices=slurm.FLAVORS, default=None,
        help="node image flavor (default: cuda with --gpus-per-node, else cpu)",
    )  # fmt: skip
    xs.add_argument(
        "--runtime", choices=tuple(slurm.RUNTIMES), default="docker",
        help="how the nodes run containers: docker, apptainer, or enroot (through pyxis)",
    )  # fmt: skip
    xs.add_argument(
        "--image", default=None,
        help="default deepfleet/<flavor>:latest; a REGISTRY/REPO@sha256:... the nodes pull, "
        "or a .sif file for apptainer",
    )  # fmt: skip
    xs.add_argument(
        "--workdir", default=slurm.SlurmRequest.workdir,
        help="the job's /workspace, on the cluster's shared filesystem "
        "(default $SLURM_SUBMIT_DIR/deepfleet; $DEEPFLEET_WORKDIR at submit time wins)",
    )  # fmt: skip
    xs.add_argument("--partition", default=None)
    xs.add_argument("--time", default=None, help="the job's time limit (sbatch --time)")
    xs.add_argument("--account", default=None)
    xs.add_argument(
        "--sbatch", action="append", default=[], metavar="OPTION",
        help="another #SBATCH line, e.g. --sbatch=--qos=high",
    )  # fmt: skip
    xs.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE",
        help="set for every rank (never put tokens here: the script is a file)",
    )  # fmt: skip
    xs.add_argument(
        "--compose-override", action="append", default=[], metavar="FILE",
        help="as up's: the node service's environment, limits and mounts",
    )  # fmt: skip
    _add_train_job(xs)
    xs.add_argument("extra", nargs="*", help="passed to train.py after --")
    xs.set_defaults(func=cmd_export_slurm)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.stall_timeout is not None:
        os.environ[STALL_ENV] = str(args.stall_timeout)
    # a closed terminal, `timeout` or a service stop must undo and stop as Ctrl-C does
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupted)
    try:
        return args.func(args)
    except JobError as exc:
        print(f"deepfleet: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code or 1
    except cluster.ClusterErrors as exc:
        for line in exc.lines():
            print(f"deepfleet: {line}", file=sys.stderr)
        return 1
    except DeepfleetError as exc:
        print(f"deepfleet: {exc.one_line()}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"deepfleet: stopped by {exc.name}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("deepfleet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen failure: still one line, no traceback
        if os.environ.get("DEEPFLEET_DEBUG"):
            raise
        print(f"deepfleet: unexpected {type(exc).__name__}: {first_line(exc)} "
              "(DEEPFLEET_DEBUG=1 shows where)", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
