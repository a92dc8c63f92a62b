"""Jobs: turn `train` / `infer` requests into launcher runs on the cluster.

Deciding (paths, launcher argv) is separate from doing (copying inputs, running), so
`--dry-run` prints exactly what would run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import launch, transfer
from .cluster import Session
from .connect import fan_out
from .containers import exec_text
from .errors import DeepfleetError, JobError

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
    extra: list[str] = field(default_factory=list)


def is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or Path(path).expanduser().exists()


def run_dir(run: str) -> str:
    if not run or "/" in run or run.startswith("."):
        raise DeepfleetError(f"bad run name {run!r}")
    return f"{CHECKPOINTS}/{run}"


def train_args(req: TrainRequest, model_path: str, data_path: str) -> list[str]:
    args = [
        "--model", model_path,
        "--data", data_path,
        "--deepspeed-config", req.config,
        "--output", run_dir(req.run),
        "--steps", str(req.steps),
        "--seq-len", str(req.seq_len),
        "--micro-batch", str(req.micro_batch),
        "--lr", str(req.lr),
        "--log-every", str(req.log_every),
    ]  # fmt: skip
    if req.save_every:
        args += ["--save-every", str(req.save_every)]
    if req.resume:
        args.append("--resume")
    return args + list(req.extra)


def infer_args(req: InferRequest, model_path: str, prompts_path: str, out_path: str) -> list[str]:
    args = ["--model", model_path, "--prompts", prompts_path, "--output", out_path]
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


def prepare_train(session: Session, req: TrainRequest, out) -> tuple[str, str]:
    if req.model == DEMO or req.data == DEMO:
        _ensure_demo_assets(session, out)
    model = DEMO_MODEL if req.model == DEMO else req.model
    if req.model != DEMO and is_local(req.model):
        model = _push_everywhere(session, req.model, MODELS, out)
    data = f"{DEMO_DATA}/train.txt" if req.data == DEMO else req.data
    if req.data != DEMO:
        if not is_local(req.data):
            raise DeepfleetError(f"data {req.data!r} is not a file or directory on this machine")
        data = _push_everywhere(session, req.data, DATA, out)
    return model, data


def _run_launcher(session: Session, module: str, args: list[str], out) -> list[str]:
    plan = session.plan()
    spec = launch.launch_spec(plan, module, args)
    out.write(f"deepfleet: {spec.shell()}\n")
    master = session.master
    node = session.node_state(master)
    containers = {n.spec.name: n.container_id for n in session.state.nodes}
    try:
        code, lines = launch.run(session.clients[master], node.container_id, plan, spec, out)
    except KeyboardInterrupt:
        out.write("deepfleet: interrupted; stopping every rank\n")
        launch.stop_all(session.clients, containers)
        raise
    if code != 0:
        raise JobError(f"{module} exited with code {code}", code, master)
    return lines


def train(session: Session, req: TrainRequest, out=sys.stdout) -> list[str]:
    model, data = prepare_train(session, req, out)
    return _run_launcher(session, "deepfleet_node.train", train_args(req, model, data), out)


def train_dry_run(session_plan, req: TrainRequest) -> str:
    model = (
        DEMO_MODEL
        if req.model == DEMO
        else (_in_container_path(req.model, MODELS) if is_local(req.model) else req.model)
    )
    data = f"{DEMO_DATA}/train.txt" if req.data == DEMO else _in_container_path(req.data, DATA)
    return launch.launch_spec(
        session_plan, "deepfleet_node.train", train_args(req, model, data)
    ).shell()


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


def infer(session: Session, req: InferRequest, out=sys.stdout) -> tuple[Path, list[dict]]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job = f"{run_dir(req.run)}/infer-{stamp}"
    if not req.model:
        model = f"{run_dir(req.run)}/final"
        _replicate_from_master(session, model, out)
    elif is_local(req.model):
        model = _push_everywhere(session, req.model, MODELS, out)
    else:
        model = req.model
    prompts = _prompt_records(req)
    for node in session.state.nodes:
        transfer.put_files(
            session.container(node.spec.name),
            job,
            {"prompts.jsonl": (prompts, 0o644)},
            node.spec.name,
        )
    result = f"{job}/results.jsonl"
    _run_launcher(
        session, "deepfleet_node.infer", infer_args(req, model, f"{job}/prompts.jsonl", result), out
    )
    data = transfer.fetch_file(session.container(session.master), result, session.master)
    local = Path(req.output or f"outputs/{req.run}-{stamp}.jsonl")
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(data)
    records = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    out.write(f"deepfleet: {len(records)} results in {local}\n")
    return local, records
