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
from dataclasses import dataclass, field
from pathlib import Path

from . import hostfile, inferplan, launch, transfer
from .cluster import Session
from .connect import fan_out
from .containers import exec_text
from .errors import DeepfleetError, JobError
from .plan import RUN_DIR, ClusterPlan

# Passed to the nodes' download step through the exec environment only: never in a file,
# an image, the launcher's command line or its logs.
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Hub settings of the operator's that the download step honours too (mirrors, offline).
HUB_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER")

MODELS = "/workspace/models"
DATA = "/workspace/data"
CHECKPOINTS = "/workspace/checkpoints"
DEMO_MODEL = f"{MODELS}/demo-tiny"
DEMO_DATA = f"{DATA}/demo"
DEMO = "demo"


@dataclass
class TrainRequest:
    model: str = DEMO  # "demo", a local directory, or a hub name
    data: str = DEMO  # "demo" or a local file/directory
    config: str = "zero2"
    run: str = "demo"
    steps: int = 60
    seq_len: int = 64
    micro_batch: int = 4
    lr: float = 3e-3
    log_every: int = 5
    save_every: int = 0
    resume: bool = False
    epochs: float | None = None
    global_batch: int | None = None
    slots: dict[str, int] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)


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


def is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def run_dir(run: str) -> str:
    if not run or "/" in run or run.startswith("."):
        raise DeepfleetError(f"bad run name {run!r}")
    return f"{CHECKPOINTS}/{run}"


def train_args(
    req: TrainRequest, model_path: str, data_path: str, precision: str = "auto"
) -> list[str]:
    args = [
        "--model", model_path,
        "--data", data_path,
        "--deepspeed-config", req.config,
        "--output", run_dir(req.run),
        *(["--epochs", str(req.epochs)] if req.epochs else ["--steps", str(req.steps)]),
        "--seq-len", str(req.seq_len),
        "--micro-batch", str(req.micro_batch),
        "--lr", str(req.lr),
        "--log-every", str(req.log_every),
        "--precision", precision,
    ]  # fmt: skip
    if req.save_every:
        args += ["--save-every", str(req.save_every)]
    if req.global_batch:
        args += ["--global-batch", str(req.global_batch)]
    if req.resume:
        args.append("--resume")
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


def _target_for(local: str, root: str) -> str:
    path = Path(local).expanduser().resolve()
    return f"{root}/{path.stem if path.is_file() else path.name}"


def _in_container_path(local: str, root: str) -> str:
    """Where a pushed local file/dir lands: a file goes inside a directory of its stem."""
    path = Path(local).expanduser().resolve()
    target = _target_for(local, root)
    return f"{target}/{path.name}" if path.is_file() else target


def _push_everywhere(session: Session, local: str, root: str, out) -> str:
    target = _target_for(local, root)

    def push(node):
        name = node.spec.name
        return transfer.push_local(session.container(name), Path(local).expanduser(), target, name)

    results, errors = fan_out(session.state.nodes, push, lambda n: n.spec.name)
    if errors:
        raise next(iter(errors.values()))
    for name, copied in results.items():
        out.write(f"[{name}] {target}: {'copied' if copied else 'unchanged'}\n")
    return _in_container_path(local, root)


def _replicate_from_master(session: Session, path: str, out) -> None:
    master = session.master
    src = session.container(master)
    others = [n for n in session.state.nodes if n.spec.name != master]

    def copy(node):
        name = node.spec.name
        return transfer.copy_between(src, session.container(name), path, master, name)

    results, errors = fan_out(others, copy, lambda n: n.spec.name)
    if errors:
        raise next(iter(errors.values()))
    for name, copied in results.items():
        out.write(f"[{name}] {path}: {'copied from ' + master if copied else 'unchanged'}\n")


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
    _replicate_from_master(session, DEMO_MODEL, out)
    _replicate_from_master(session, DEMO_DATA, out)


def secrets_from(environ) -> dict[str, str]:
    return {k: environ[k] for k in SECRET_ENV if environ.get(k)}


def hub_settings(environ) -> dict[str, str]:
    return {k: environ[k] for k in HUB_ENV if environ.get(k)}


def prefetch_hub_model(session: Session, model: str, env: dict[str, str], out) -> None:
    """Download a hub model into every node's HF cache before the job starts.

    Ranks then load it with HF_HUB_OFFLINE=1, so the token never has to reach them.
    """
    script = (
        "import sys; from huggingface_hub import snapshot_download; "
        "print(snapshot_download(sys.argv[1], allow_patterns=['*.json', '*.safetensors', "
        "'*.model', '*.txt', '*.py', 'tokenizer*']))"
    )

    def fetch(node):
        name = node.spec.name
        try:
            exec_text(session.container(name), ["python", "-c", script, model], name, env=env)
        except DeepfleetError as exc:
            cause = getattr(exc, "cause", str(exc))
            raise DeepfleetError(f"cannot download {model}: {cause}", name) from exc
        return True

    _, errors = fan_out(session.state.nodes, fetch, lambda n: n.spec.name)
    if errors:
        raise next(iter(errors.values()))
    out.write(f"deepfleet: {model} is in every node's HF cache\n")


def resolve_model(session: Session, model: str, out, secrets: dict[str, str]) -> str:
    """A model argument as the ranks will see it: local dirs copied, hub names cached."""
    if is_local(model):
        return _push_everywhere(session, model, MODELS, out)
    prefetch_hub_model(session, model, {**hub_settings(os.environ), **secrets}, out)
    return model


def prepare_train(session: Session, req: TrainRequest, out, secrets=None) -> tuple[str, str]:
    if req.model == DEMO or req.data == DEMO:
        _ensure_demo_assets(session, out)
    model = DEMO_MODEL
    if req.model != DEMO:
        model = resolve_model(session, req.model, out, secrets or {})
    data = f"{DEMO_DATA}/train.txt" if req.data == DEMO else req.data
    if req.data != DEMO:
        if not is_local(req.data):
            raise DeepfleetError(f"data {req.data!r} is not a file or directory on this machine")
        data = _push_everywhere(session, req.data, DATA, out)
    return model, data


def write_launch_files(session: Session, plan: ClusterPlan) -> None:
    """The master's hostfile and .deepspeed_env for this launch (slots may differ per job)."""
    master = session.master
    env = {**plan.env, "HF_HUB_OFFLINE": "1"}
    transfer.put_files(
        session.container(master),
        RUN_DIR,
        {"hostfile": (hostfile.render_hostfile(plan).encode(), 0o644)},
        master,
    )
    transfer.put_files(
        session.container(master),
        "/root",
        {".deepspeed_env": (hostfile.render_deepspeed_env(env).encode(), 0o644)},
        master,
    )


def _run_launcher(
    session: Session, module: str, args: list[str], out, slots: dict | None = None,
    secrets: dict | None = None,
) -> list[str]:  # fmt: skip
    plan = session.plan(**({"slots": {**session.state.slots, **slots}} if slots else {}))
    write_launch_files(session, plan)
    spec = launch.launch_spec(plan, module, args)
    out.write(f"deepfleet: {spec.shell()}\n")
    master = session.master
    node = session.node_state(master)
    containers = {n.spec.name: n.container_id for n in session.state.nodes}

    def rank_failed(name: str, code: int) -> None:
        out.write(f"deepfleet: a rank on {name} exited with code {code}; stopping every rank\n")
        launch.stop_all(session.clients, containers)

    try:
        result = launch.run(
            session.clients[master], node.container_id, plan, spec, out,
            redact=list((secrets or {}).values()), on_rank_failed=rank_failed,
        )  # fmt: skip
    except KeyboardInterrupt:
        out.write("deepfleet: interrupted; stopping every rank\n")
        launch.stop_all(session.clients, containers)
        raise
    if result.failed:
        name, code = result.failed
        raise JobError(
            f"{module}: a rank exited with code {code}; the ranks on every node were stopped "
            "(its lines above say why)",
            code if 0 < code < 256 else 1,  # a signal (-9) is no exit status
            name,
        )
    if result.code != 0:
        raise JobError(f"{module} exited with code {result.code}", result.code, master)
    return result.lines


def train(session: Session, req: TrainRequest, out=sys.stdout, environ=None) -> list[str]:
    secrets = secrets_from(environ if environ is not None else os.environ)
    model, data = prepare_train(session, req, out, secrets)
    precision = session.plan().precision
    return _run_launcher(
        session, "deepfleet_node.train", train_args(req, model, data, precision), out, req.slots,
        secrets,
    )  # fmt: skip


def train_dry_run(session_plan, req: TrainRequest) -> str:
    model = (
        DEMO_MODEL
        if req.model == DEMO
        else (_in_container_path(req.model, MODELS) if is_local(req.model) else req.model)
    )
    data = f"{DEMO_DATA}/train.txt" if req.data == DEMO else _in_container_path(req.data, DATA)
    args = train_args(req, model, data, session_plan.precision)
    return launch.launch_spec(session_plan, "deepfleet_node.train", args).shell()


def _prompt_records(req: InferRequest) -> bytes:
    if req.prompts_file:
        path = Path(req.prompts_file).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise DeepfleetError(f"cannot read prompts file {path}: {exc.strerror}") from exc
        if path.suffix == ".jsonl":
            return text.encode()
        return "".join(
            json.dumps({"prompt": line}) + "\n" for line in text.splitlines() if line.strip()
        ).encode()
    if not req.prompts:
        raise DeepfleetError("no prompt given (PROMPT=... or PROMPTS=file)")
    return "".join(json.dumps({"prompt": p}) + "\n" for p in req.prompts).encode()


def infer(
    session: Session, req: InferRequest, out=sys.stdout, environ=None
) -> tuple[Path, list[dict]]:
    secrets = secrets_from(environ if environ is not None else os.environ)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job = f"{run_dir(req.run)}/infer-{stamp}"
    if not req.model:
        model = f"{run_dir(req.run)}/final"
        _replicate_from_master(session, model, out)
    else:
        model = resolve_model(session, req.model, out, secrets)
    prompts = _prompt_records(req)
    for node in session.state.nodes:
        transfer.put_files(
            session.container(node.spec.name),
            job,
            {"prompts.jsonl": (prompts, 0o644)},
            node.spec.name,
        )
    result = f"{job}/results.jsonl"
    chosen = plan_inference(session, req, model, out)
    _run_launcher(
        session, "deepfleet_node.infer",
        infer_args(req, model, f"{job}/prompts.jsonl", result, chosen.mode),
        out, chosen.slots, secrets,
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
    master = session.master
    code, output = session.container(master).exec_run(
        ["python", "-m", "deepfleet_node.modelinfo", "--model", model], demux=True
    )
    if code != 0:
        return None
    try:
        return int(json.loads(output[0].decode())["weights_bytes"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def plan_inference(session: Session, req: InferRequest, model: str, out) -> inferplan.InferencePlan:
    plan = session.plan(**({"slots": {**session.state.slots, **req.slots}} if req.slots else {}))
    size = model_bytes(session, model) if req.mode == "auto" else None
    chosen = inferplan.choose(plan, session.state.reports(), size, req.mode)
    out.write(f"deepfleet: inference mode {chosen.mode}: {chosen.reason}\n")
    return chosen


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
