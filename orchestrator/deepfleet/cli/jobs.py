"""The commands that plan and run jobs on the cluster: train, infer, plan, stop, fetch-model."""

from __future__ import annotations

import json
from pathlib import Path

from deepfleet.cli.common import (
    add_backend,
    add_balance,
    add_run_options,
    add_train_job,
    parse_slots,
    run_options,
    train_request,
)
from deepfleet.cluster.session import Session, open_session
from deepfleet.errors import DeepfleetError
from deepfleet.inventory.nodes import Inventory, NodeSpec
from deepfleet.jobs import jobrun, launch, submit
from deepfleet.machines.state import StateStore
from deepfleet.planning import cost, memory, reports, trainplan
from deepfleet.planning.plan import describe, plan_cluster, plan_dict


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
                slots={**parse_slots(args.slots), **extra}, backend=args.backend,
            )  # fmt: skip

        links = cost.Links()  # no cluster: every pair assumed 1 GbE unless --links says

    else:
        session = Session(StateStore(args.state_dir).load(), {})
        reports_ = session.state.reports()
        links = submit.state_links(session.state)

        def replan(extra):
            return jobrun.job_plan(session, {**parse_slots(args.slots), **extra}, args.backend)

    if args.links:
        links = _links_file(Path(args.links))
    plan = replan({})
    shape = None
    if args.model_info:
        shape = _model_info(Path(args.model_info))
    tp = trainplan.plan_training(
        plan, reports_, shape, args.config, args.seq_len, args.micro_batch, args.balance, replan,
        links=links,
    )  # fmt: skip
    if args.json:
        print(json.dumps({**plan_dict(tp.cluster), "train": trainplan.as_dict(tp)}, indent=2))
    else:
        print(describe(tp.cluster))
        print(trainplan.describe(tp))
        for line in trainplan.candidate_lines(tp):
            print(line)
    return 0


def _links_file(path: Path) -> cost.Links:
    """Links as `deepfleet links --json` lists them, or the state's records: a JSON list
    of {"a", "b", "a_to_b_bps", "b_to_a_bps", "rtt_s", "measured_at"} (or {"links": [...]})."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DeepfleetError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise DeepfleetError(f"{path} is not JSON ({exc})") from exc
    records = data.get("links") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise DeepfleetError(f"{path}: expected a list of links")
    return cost.Links.from_records(r for r in records if isinstance(r, dict))


def _model_info(path: Path) -> memory.ModelShape:
    """A model's shape as `python -m deepfleet_node.modelinfo --model M` prints it."""
    try:
        return memory.ModelShape.from_info(json.loads(path.read_text()), name=path.stem)
    except OSError as exc:
        raise DeepfleetError(f"cannot read {path}: {exc.strerror}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise DeepfleetError(f"{path} is not modelinfo's JSON (missing {exc})") from exc


def cmd_stop(args) -> int:
    session = open_session(StateStore(args.state_dir), args.timeout)
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
    session = open_session(StateStore(args.state_dir), args.timeout, heal=True)
    try:
        submit.fetch_model(session, args.run, Path(args.dest or f"models/{args.run}"))
    finally:
        session.close()
    return 0


def cmd_train(args) -> int:
    req = train_request(args)
    store = StateStore(args.state_dir)
    if args.dry_run:
        state = store.load()
        session = Session(state, {})
        options = submit.train_options(req)
        plan = jobrun.job_plan(session, req.slots, options.backend, options.mixed)
        config = memory.BRIDGE if req.bridge else req.config
        # the model's shape is read on the master at launch; a dry run connects nowhere,
        # so it judges memory and predicts step times only from --model-info
        shape = _model_info(Path(args.model_info)) if args.model_info else None

        def replan(extra):
            return jobrun.job_plan(session, {**req.slots, **extra}, options.backend, options.mixed)

        tp = trainplan.plan_training(
            plan, state.reports(), shape, config, req.seq_len, req.micro_batch, req.balance,
            replan, links=submit.state_links(state),
        )  # fmt: skip
        plan = tp.cluster
        print(describe(plan))
        print(trainplan.describe(tp))
        for line in trainplan.candidate_lines(tp):
            print(line)
        if trainplan.memory_config(config) and shape is None:
            print("memory: checked at launch from the model's shape, which may refuse the "
                  "job, pick CONFIG=auto's setting (shown: the cheapest) and add --max-micro "
                  "caps for speed balancing; --model-info FILE judges it here, with every "
                  "config's predicted time per step")  # fmt: skip
        print(submit.train_dry_run(plan, req, tp.config, session.master))
        return 0
    session = open_session(store, args.timeout, heal=True, refresh=True)
    try:
        submit.train(session, req)
    finally:
        session.close()
    return 0


def cmd_infer(args) -> int:
    req = submit.InferRequest(
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
        slots=parse_slots(args.slots),
        mode=args.mode,
        extra=args.extra,
        options=run_options(args),
    )
    session = open_session(StateStore(args.state_dir), args.timeout, heal=True, refresh=True)
    try:
        submit.infer(session, req)  # rank 0 prints each completion as the results merge
    finally:
        session.close()
    return 0


def add_train(sub) -> None:
    tr = sub.add_parser("train", help="train with the DeepSpeed launcher on the cluster")
    add_train_job(tr)
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
    tr.add_argument(
        "--model-info", metavar="FILE",
        help="with --dry-run: modelinfo JSON, for the memory fit and every config's predicted "
        "time per step",
    )  # fmt: skip
    add_run_options(tr)
    tr.add_argument("extra", nargs="*", help="passed to train.py after --")
    tr.set_defaults(func=cmd_train)


def add_infer(sub) -> None:
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
    add_run_options(inf)
    inf.add_argument("extra", nargs="*", help="passed to infer.py after --")
    inf.set_defaults(func=cmd_infer)


def add_plan(sub) -> None:
    pl = sub.add_parser("plan", help="which machines and GPUs a job would run on, and why")
    pl.add_argument("--reports", nargs="+", metavar="FILE", help="detect --json files, no cluster")
    pl.add_argument("--slots", action="append", default=[], metavar="NODE=N")
    pl.add_argument("--cpu-slots", type=int, default=1, help="with --reports: per CPU machine")
    pl.add_argument("--json", action="store_true")
    pl.add_argument(
        "--model-info", metavar="FILE",
        help="modelinfo JSON (python -m deepfleet_node.modelinfo --model M): adds the memory fit",
    )  # fmt: skip
    pl.add_argument(
        "--links", metavar="FILE",
        help="links JSON (deepfleet links --json) instead of the cluster's (default: "
        "the measured ones; none: 1 GbE assumed)",
    )  # fmt: skip
    pl.add_argument(
        "--config", default="zero2", help="as train's --config (auto: fastest predicted fit)"
    )
    pl.add_argument("--seq-len", type=int, default=64)
    pl.add_argument("--micro-batch", type=int, default=4)
    add_balance(pl)
    add_backend(pl)
    pl.set_defaults(func=cmd_plan)


def add_stop(sub) -> None:
    sp = sub.add_parser("stop", help="stop every job process (launcher, ranks) on every node")
    sp.set_defaults(func=cmd_stop)


def add_fetch_model(sub) -> None:
    fm = sub.add_parser("fetch-model", help="copy a run's HF export to this machine")
    fm.add_argument("--run", default="demo")
    fm.add_argument("--dest", default="", help="default models/<run>")
    fm.set_defaults(func=cmd_fetch_model)
