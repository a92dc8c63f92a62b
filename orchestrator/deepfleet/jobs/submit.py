"""Jobs: turn `train` / `infer` requests into launcher runs on the cluster.

Deciding (paths, launcher argv) is separate from doing (copying inputs, running), so
`--dry-run` prints exactly what would run.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from deepfleet import progress
from deepfleet.cluster.session import Session
from deepfleet.errors import DeepfleetError, InputError
from deepfleet.jobs import inputs, joblogs, launch
from deepfleet.jobs.jobrun import RunOptions, job_plan, ready_cluster, run_job
from deepfleet.layout import CHECKPOINTS, DATA, HF_HOME, MODELS, RUN_DIR
from deepfleet.machines import transfer
from deepfleet.machines.connect import by_outcome, fan_out
from deepfleet.machines.containers import exec_text
from deepfleet.machines.state import ClusterState
from deepfleet.planning import cost, inferplan, memory, trainplan

# Passed to the nodes' download step through the exec environment only: never in a file,
# an image, the launcher's command line or its logs.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Hub settings of the operator's that the download step honours too (mirrors, offline).
HUB_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER")
# What a model needs from its hub repo (transformers 5 keeps chat templates in .jinja).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja", "tokenizer*"]

DEMO_MODEL = f"{MODELS}/demo-tiny"
DEMO_DATA = f"{DATA}/demo"
DEMO = "demo"


@dataclass
class TrainRequest:
    model: str = DEMO  # "demo", a local directory, or a hub name
    data: str = DEMO  # "demo" or a local file/directory
    config: str = "zero2"  # a config name, "auto" (the cheapest that fits) or a path
    run: str = "demo"
    steps: int = 60
    seq_len: int = 64
    micro_batch: int = 4
    lr: float = 3e-3
    log_every: int = 0  # 0: the node picks (about 6 lines a run)
    save_every: int = 0
    resume: bool = False
    epochs: float | None = None
    global_batch: int | None = None
    balance: str = "speed"  # micro-batch per rank by measured speed, or "even"
    bridge: bool = False  # NVIDIA, AMD and CPU ranks in one data-parallel job over gloo
    slots: dict[str, int] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    options: RunOptions = field(default_factory=RunOptions)


@dataclass
class InferRequest:
    model: str = ""  # "" = the export of `run`; else a local dir or hub name
    run: str = "demo"
    prompts: list[str] = field(default_factory=list)
    prompts_file: str = ""
    max_new_tokens: int = 32
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    output: str = ""  # local JSONL; default ./outputs/<run>-<time>.jsonl
    slots: dict[str, int] = field(default_factory=dict)
    mode: str = "auto"
    extra: list[str] = field(default_factory=list)
    options: RunOptions = field(default_factory=RunOptions)


def is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def run_dir(run: str) -> str:
    if not run or "/" in run or run.startswith("."):
        raise DeepfleetError(f"bad run name {run!r}")
    return f"{CHECKPOINTS}/{run}"


def train_args(
    req: TrainRequest,
    model_path: str,
    data_path: str,
    precision: str = "auto",
    config: str | None = None,
    caps: tuple[int, ...] | None = None,
    predicted_step_s: float | None = None,
) -> list[str]:
    """The ranks' arguments (deepfleet_node.train's, the bridge's the same).
    predicted_step_s: the plan's predicted seconds per step (TrainPlan.step_seconds), which
    rank 0 prints against the measured figure; None when there is no prediction."""
    args = [
        "--model", model_path,
        "--data", data_path,
        *([] if req.bridge else ["--deepspeed-config", config or req.config]),
        "--output", run_dir(req.run),
        *(["--epochs", str(req.epochs)] if req.epochs else ["--steps", str(req.steps)]),
        "--seq-len", str(req.seq_len),
        "--micro-batch", str(req.micro_batch),
        "--lr", str(req.lr),
        "--log-every", str(req.log_every),
        "--precision", precision,
        "--balance", req.balance,
    ]  # fmt: skip
    if caps:
        args += ["--max-micro", ",".join(str(c) for c in caps)]
    if req.save_every:
        args += ["--save-every", str(req.save_every)]
    if req.global_batch:
        args += ["--global-batch", str(req.global_batch)]
    if req.resume:
        args.append("--resume")
    if predicted_step_s is not None:
        args += ["--predicted-step-s", f"{predicted_step_s:.6g}"]
    return args + list(req.extra)


def infer_args(
    req: InferRequest, model_path: str, prompts_path: str, out_path: str, mode: str = "replicas"
) -> list[str]:
    args = ["--model", model_path, "--prompts", prompts_path, "--output", out_path]
    args += ["--mode", mode]
    args += ["--max-new-tokens", str(req.max_new_tokens), "--seed", str(req.seed)]
    if req.greedy:
        args.append("--greedy")
    else:
        args += ["--temperature", str(req.temperature), "--top-p", str(req.top_p)]
    return args + list(req.extra)


def _local_path(local: str) -> Path:
    # absolute but not resolved: a symlinked file (the HF cache's) keeps its own name
    return Path(os.path.abspath(Path(local).expanduser()))


def _target_for(local: str, root: str) -> str:
    path = _local_path(local)
    name = path.stem if path.is_file() else path.name
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        name = path.parent.parent.name.removeprefix("models--")  # a snapshot: its repo's name
    return f"{root}/{name}"


def _in_container_path(local: str, root: str) -> str:
    """Where a pushed local file/dir lands: a file goes inside a directory of its stem."""
    path = _local_path(local)
    target = _target_for(local, root)
    return f"{target}/{path.name}" if path.is_file() else target


def _push_everywhere(session: Session, local: str, root: str, out) -> str:
    target = _target_for(local, root)
    board = progress.Board(out)

    def push(node):
        name = node.spec.name
        return transfer.push_local(
            session.container(name), Path(local).expanduser(), target, name, board
        )

    try:
        results, errors = fan_out(session.state.nodes, push, lambda n: n.spec.name)
    finally:
        board.close()
    if errors:
        raise next(iter(errors.values()))
    for outcome, names in by_outcome(results, {True: "copied to", False: "unchanged on"}):
        out.write(f"deepfleet: {target}: {outcome} {', '.join(names)}\n")
    return _in_container_path(local, root)


def replicate_from_master(session: Session, path: str, out) -> None:
    master = session.master
    src = session.container(master)
    others = [n for n in session.state.nodes if n.spec.name != master]

    board = progress.Board(out)

    def copy(node):
        name = node.spec.name
        return transfer.copy_between(src, session.container(name), path, master, name, board)

    try:
        results, errors = fan_out(others, copy, lambda n: n.spec.name)
    finally:
        board.close()
    if errors:
        raise next(iter(errors.values()))
    copied = {True: f"copied from {master} to", False: "unchanged on"}
    for outcome, names in by_outcome(results, copied):
        out.write(f"deepfleet: {path}: {outcome} {', '.join(names)}\n")


def _ensure_demo_assets(session: Session, out) -> None:
    """Build the tiny demo model and data on the master (no hub here), then replicate."""
    master = session.container(session.master)
    code, _ = master.exec_run(["test", "-f", f"{DEMO_MODEL}/config.json"])
    if code != 0:
        out.write(f"[{session.master}] building the demo model and data\n")
        exec_text(
            master,
            ["python", "-m", "deepfleet_node.tiny", "--out", DEMO_MODEL,
             "--data-out", f"{DEMO_DATA}/train.txt"],
            session.master,
        )  # fmt: skip
    replicate_from_master(session, DEMO_MODEL, out)
    replicate_from_master(session, DEMO_DATA, out)


def secrets_from(environ) -> dict[str, str]:
    return {k: environ[k] for k in SECRET_ENV if environ.get(k)}


def hub_settings(environ) -> dict[str, str]:
    return {k: environ[k] for k in HUB_ENV if environ.get(k)}


def prefetch_hub_model(session: Session, model: str, env: dict[str, str], out) -> None:
    """Download a hub model into every node's HF cache before the job starts.

    Ranks then load it with HF_HUB_OFFLINE=1, so the token never has to reach them.
    """
    # The hub's own message, first line only, on stderr: huggingface_hub's last line is
    # often just a link to its docs.
    script = (
        "import sys\n"
        "from huggingface_hub import snapshot_download\n"
        "try:\n"
        "    print(snapshot_download(sys.argv[1], allow_patterns=" + repr(HUB_FILES) + "))\n"
        "except Exception as exc:\n"
        "    text = (str(exc).strip().splitlines() or [''])[0]\n"
        "    sys.exit(f'error: {type(exc).__name__}: {text}')\n"
    )

    board = progress.Board(out)

    def fetch(node):
        name = node.spec.name
        container = session.container(name)
        # the download's own bars stay inside the container: the cache's growth is shown
        watch = transfer.GrowthWatch(container, HF_HOME, name, board.bar(f"[{name}] {model}", 0))
        try:
            exec_text(
                container, ["python", "-c", script, model], name,
                env={**env, "HF_HUB_DISABLE_TELEMETRY": "1"},
            )  # fmt: skip
        except DeepfleetError as exc:
            cause = getattr(exc, "cause", str(exc))
            raise DeepfleetError(f"cannot download {model}: {cause}", name) from exc
        finally:
            watch.stop()
        return True

    try:
        _, errors = fan_out(session.state.nodes, fetch, lambda n: n.spec.name)
    finally:
        board.close()
    if errors:
        raise next(iter(errors.values()))
    out.write(f"deepfleet: {model} is in every node's HF cache\n")


def resolve_model(session: Session, model: str, out, secrets: dict[str, str]) -> str:
    """A model argument as the ranks will see it: local dirs copied, hub names cached."""
    if is_local(model):
        # A hub cache folder (models--org--name) stands for its snapshot, which is copied.
        folder = inputs.check_model_dir(Path(model).expanduser())
        return _push_everywhere(session, str(folder), MODELS, out)
    prefetch_hub_model(session, model, {**hub_settings(os.environ), **secrets}, out)
    return model


def check_inputs(req: TrainRequest) -> None:
    """Both inputs, before anything is built or copied: a bad row or a folder without
    weights is one line here, not a transfer followed by a traceback per rank."""
    joblogs.job_name(req.run)  # the run names the job's logs too
    if req.data != DEMO:
        if not is_local(req.data):
            raise DeepfleetError(f"data {req.data!r} is not a file or directory on this machine")
        inputs.check_data(Path(req.data).expanduser())
    if req.model != DEMO and is_local(req.model):
        inputs.check_model_dir(Path(req.model).expanduser())


def model_shape(session: Session, model: str, local: bool):
    """The model's shape from its config alone, read on the master (which has torch):
    a folder on this machine (`local`) sends its config.json there by itself, before any
    weights are copied; otherwise `model` is a path in the master's container or a hub
    name already in its cache."""
    master = session.master
    where = model
    if local:
        folder = inputs.check_model_dir(Path(model).expanduser())
        where = f"{RUN_DIR}/shape/{folder.name}"
        config = (folder / "config.json").read_bytes()
        transfer.put_files(
            session.container(master), where, {"config.json": (config, 0o644)}, master
        )
    info, why = modelinfo(session, where, {"HF_HUB_OFFLINE": "1"})
    if info is None:
        raise DeepfleetError(f"cannot read the shape of {model}: {why}", master)
    name = Path(model).name if local or model.startswith("/") else model
    return memory.ModelShape.from_info(info, name=name)


def modelinfo(session: Session, model: str, env: dict | None = None) -> tuple[dict | None, str]:
    """`python -m deepfleet_node.modelinfo` on the master: (its JSON, "") or (None, why)."""
    code, output = session.container(session.master).exec_run(
        ["python", "-m", "deepfleet_node.modelinfo", "--model", model], demux=True,
        environment=env,
    )  # fmt: skip
    if code != 0:
        lines = (output[1] or b"").decode(errors="replace").strip().splitlines()
        return None, lines[-1] if lines else f"exit code {code}"
    try:
        return json.loads((output[0] or b"").decode()), ""
    except ValueError:
        return None, "modelinfo printed no JSON"


def train_module(req: TrainRequest) -> str:
    return "deepfleet_node.train.bridge" if req.bridge else "deepfleet_node.train"


def train_options(req: TrainRequest) -> RunOptions:
    # a bridge job's world spans every accelerator; the DeepSpeed engine needs one
    return replace(req.options, mixed=True) if req.bridge else req.options


def plan_train(
    session: Session, req: TrainRequest, model: str, local: bool, out
) -> trainplan.TrainPlan:
    """Memory fit and micro-batch per rank; a model that does not fit is refused here,
    naming the machine, before its weights are copied anywhere."""
    config = memory.BRIDGE if req.bridge else req.config
    shape = model_shape(session, model, local) if trainplan.memory_config(config) else None
    options = train_options(req)
    plan = job_plan(session, req.slots, options.backend, options.mixed)

    def replan(extra: dict[str, int]):
        return job_plan(session, {**req.slots, **extra}, options.backend, options.mixed)

    tp = trainplan.plan_training(
        plan, session.state.reports(), shape, config, req.seq_len, req.micro_batch, req.balance,
        replan, links=state_links(session.state),
    )  # fmt: skip
    out.write(trainplan.describe(tp) + "\n")
    return tp


def state_links(state: ClusterState) -> cost.Links:
    """The links the cluster state recorded (`deepfleet links`, `up`, a job's preflight
    when stale); none recorded: every pair is assumed 1 GbE, and the prediction says so."""
    return cost.Links.from_records(state.links)


def train(session: Session, req: TrainRequest, out=sys.stdout, environ=None) -> list[str]:
    secrets = secrets_from(environ if environ is not None else os.environ)
    check_inputs(req)
    options = train_options(req)
    ready_cluster(session, req.slots, options, out)
    if req.model == DEMO or req.data == DEMO:
        _ensure_demo_assets(session, out)
    local = req.model != DEMO and is_local(req.model)
    model = DEMO_MODEL if req.model == DEMO else req.model
    if req.model != DEMO and not local:  # a hub name: its config comes with the weights
        model = resolve_model(session, model, out, secrets)
    tp = plan_train(session, req, model, local, out)  # a local folder: config.json only
    if local:
        model = resolve_model(session, req.model, out, secrets)
    data = f"{DEMO_DATA}/train.txt"
    if req.data != DEMO:
        data = _push_everywhere(session, req.data, DATA, out)
    args = train_args(
        req, model, data, tp.cluster.precision, tp.config, tp.caps,
        predicted_step_s=tp.step_seconds(req.global_batch),
    )  # fmt: skip
    slots = {**req.slots, **tp.slots}  # with the machines the memory fit left out
    return run_job(
        session, train_module(req), args, out, slots, secrets, options, checked=True,
        job=joblogs.job_name(req.run),
    )  # fmt: skip


def train_dry_run(
    session_plan, req: TrainRequest, config: str | None = None, launcher: str | None = None
) -> str:
    model = (
        DEMO_MODEL
        if req.model == DEMO
        else (
            _in_container_path(str(inputs.check_model_dir(Path(req.model).expanduser())), MODELS)
            if is_local(req.model)
            else req.model
        )
    )
    data = f"{DEMO_DATA}/train.txt" if req.data == DEMO else _in_container_path(req.data, DATA)
    args = train_args(req, model, data, session_plan.precision, config)
    return launch.launch_spec(session_plan, train_module(req), args, launcher).shell()


def _prompt_records(req: InferRequest) -> bytes:
    if req.prompts_file:
        return inputs.prompt_records(Path(req.prompts_file).expanduser())
    # `make infer` without PROMPT passes --prompt "": that is no prompt, not an empty one.
    if not any(p.strip() for p in req.prompts):
        raise InputError("no prompt given (PROMPT=... or PROMPTS=file)")
    for number, prompt in enumerate(req.prompts, 1):
        if not prompt.strip():
            raise InputError(f"--prompt {number} of {len(req.prompts)} is empty")
    return "".join(json.dumps({"prompt": p}) + "\n" for p in req.prompts).encode()


def infer(
    session: Session, req: InferRequest, out=sys.stdout, environ=None
) -> tuple[Path, list[dict]]:
    secrets = secrets_from(environ if environ is not None else os.environ)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job = f"{run_dir(req.run)}/infer-{stamp}"
    log_job = joblogs.job_name(req.run, "infer")
    prompts = _prompt_records(req)  # checked before anything is copied
    ready_cluster(session, req.slots, replace(req.options, mixed=req.options.backend is None), out)
    if not req.model:
        model = f"{run_dir(req.run)}/final"
        replicate_from_master(session, model, out)
    else:
        model = resolve_model(session, req.model, out, secrets)
    for node in session.state.nodes:
        transfer.put_files(
            session.container(node.spec.name),
            job,
            {"prompts.jsonl": (prompts, 0o644)},
            node.spec.name,
        )
    result = f"{job}/results.jsonl"
    chosen, options = plan_inference(session, req, model, out)
    run_job(
        session, "deepfleet_node.infer",
        infer_args(req, model, f"{job}/prompts.jsonl", result, chosen.mode),
        out, chosen.slots, secrets, options, checked=True, job=log_job,
    )  # fmt: skip
    data = transfer.fetch_file(session.container(session.master), result, session.master)
    local = Path(req.output or f"outputs/{req.run}-{stamp}.jsonl")
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(data)
    records = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    out.write(f"deepfleet: {len(records)} results in {local}\n")
    return local, records


def model_bytes(session: Session, model: str) -> int | None:
    """Weights size from the model's config alone (read on the master, no weights loaded)."""
    info, _ = modelinfo(session, model)
    try:
        return int(info["weights_bytes"])
    except (KeyError, TypeError, ValueError):
        return None


def plan_inference(
    session: Session, req: InferRequest, model: str, out
) -> tuple[inferplan.InferencePlan, RunOptions]:
    """The mode and slots, and the run options that launch it: replicas run on every
    machine whatever its accelerator (one gloo world); tp and zero on one backend group."""
    reports = session.state.reports()
    size = model_bytes(session, model) if req.mode == "auto" else None
    options = req.options
    if req.mode in ("auto", "replicas") and options.backend is None:
        mixed = job_plan(session, req.slots, None, mixed=True)
        chosen = inferplan.choose(mixed, reports, size, req.mode, state_links(session.state))
        if chosen.mode == "replicas":
            out.write(f"deepfleet: inference mode replicas: {chosen.reason}\n")
            return chosen, replace(options, mixed=True)
    plan = job_plan(session, req.slots, options.backend)
    chosen = inferplan.choose(plan, reports, size, req.mode, state_links(session.state))
    out.write(f"deepfleet: inference mode {chosen.mode}: {chosen.reason}\n")
    return chosen, options


def fetch_model(session: Session, run: str, dest: Path, out=sys.stdout) -> Path:
    """Copy a run's HF export from the master to this machine."""
    source = f"{run_dir(run)}/final"
    master = session.master
    try:
        stream, _ = session.container(master).get_archive(source)
    except Exception as exc:
        raise DeepfleetError(f"no export at {source}: {exc}", master) from exc
    dest = dest.expanduser()
    if dest.exists() and any(dest.iterdir()):
        raise DeepfleetError(f"{dest} exists and is not empty; choose another --dest")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        members = []
        for member in tar.getmembers():
            # the archive's top folder is "final"; keep what is under it, nothing that escapes
            parts = Path(member.name).parts[1:]
            if not parts or ".." in parts or not (member.isfile() or member.isdir()):
                continue
            member.name = str(Path(*parts))
            members.append(member)
        tar.extractall(dest, members=members, filter="data")
    out.write(f"deepfleet: {len(members)} files from {master}:{source} in {dest}\n")
    return dest
