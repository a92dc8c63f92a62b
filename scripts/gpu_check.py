#!/usr/bin/env python3
"""Every GPU check in one run, on an NVIDIA GPU machine with no network and no Docker.

    scripts/gpu-check.sh            # the GPU checks (the device machine)
    scripts/gpu-check.sh --cpu      # the same checks on CPU, small: CI runs this in the cpu image

The node package runs straight from the tree (PYTHONPATH=images/node, no container). The
machine's python must have torch, transformers and accelerate; DeepSpeed and its small
dependencies come from the wheels in .whl/ (scripts/gpu-wheels.sh) when python lacks them.

Each check records ok or failed, a one-line cause and its numbers; a failed check does not
stop the others; each has a timeout, and the whole run a budget (default 450 s). The
results are one JSON object, printed last and written to $OUT/gpu-check.json (OUT set) or
gpu-check.json in a new temp dir (its path printed); each check's full output goes to
gpu-check-logs/ beside it. Exit status 1 when any check failed, 2 on bad arguments.

Checks, in order:
  detect  python -m deepfleet_node.detect --json: GPU count, names, memory (CPU mode: ok with
          whatever it finds)
  stack   DeepSpeed importable (installed from .whl/ when missing), its accelerator, torch's
          CUDA, whether FusedAdam is prebuilt
  train   a bf16 ZeRO-2 run of a ~1B Llama built from its config (deepfleet_node.tiny) by the
          node trainer in one process: tokens/s and MFU (CPU: a few-M-param Llama, fp32)
  bridge  the bridge trainer with one CUDA rank and one CPU rank over gloo (CPU: two CPU
          ranks): both exit 0, the loss is finite, the ranks' devices are as asked
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NODE_DIR = REPO / "images" / "node"
WHEEL_DIR = REPO / ".whl"
SCHEMA = 1
DEFAULT_BUDGET_S = 450.0  # the whole run stays under 8 minutes

# The bridge trainer is moving from deepfleet_node.bridge into the train package: the first
# module here that is importable runs. Precision per rank is a comma list in the new one.
BRIDGE_MODULES = ("deepfleet_node.train.bridge", "deepfleet_node.bridge")
BRIDGE_DEVICE_ENVS = ("DEVICE", "DEEPFLEET_BRIDGE_DEVICE")  # new name, old name

CHECKS = ("detect", "stack", "train", "bridge")
# Per check, seconds: (gpu mode, cpu mode). Each also stops at the run's budget.
TIMEOUTS = {"detect": (45, 45), "stack": (90, 90), "train": (270, 150), "bridge": (120, 120)}

# Dense bf16 peak FLOP/s by GPU name (lowercased substring, first match wins): datasheet
# figures without sparsity. MFU is null for a GPU not listed.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h800", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("rtx 4090", 165e12),
)

# Model shapes (deepfleet_node.tiny flags). GPU: ~1B Llama (TinyLlama's shape, full MHA);
# its real vocabulary is what BPE learns from the demo corpus, fewer than 32000.
GPU_MODEL = {
    "hidden-size": 2048,
    "layers": 16,
    "heads": 32,
    "kv-heads": 32,
    "intermediate-size": 5632,
    "vocab-size": 32000,
    "max-positions": 2048,
}
CPU_MODEL = {
    "hidden-size": 256,
    "layers": 4,
    "heads": 4,
    "kv-heads": 4,
    "intermediate-size": 688,
    "vocab-size": 512,
    "max-positions": 256,
}
BRIDGE_MODEL = {"hidden-size": 64, "layers": 2, "heads": 4, "kv-heads": 2, "max-positions": 128}

# Wheels: (module to import, distribution in .whl/). Only the missing ones are installed.
WHEEL_PACKAGES = (
    ("deepspeed", "deepspeed"),
    ("hjson", "hjson"),
    ("msgpack", "msgpack"),
    ("ninja", "ninja"),
    ("cpuinfo", "py-cpuinfo"),
    ("einops", "einops"),
    ("psutil", "psutil"),
    ("tqdm", "tqdm"),
    ("packaging", "packaging"),
    ("pydantic", "pydantic"),
    ("pydantic_core", "pydantic-core"),
    ("annotated_types", "annotated-types"),
    ("typing_inspection", "typing-inspection"),
    ("typing_extensions", "typing-extensions"),
    ("pynvml", "nvidia-ml-py"),
)
OPTIONAL_WHEELS = ("nvidia-ml-py", "ninja")  # DeepSpeed runs without them (no JIT, no NVML)

# `step N/M loss … lr … tok/s … samples/s … step_time …s eta …s` (deepfleet_node.train)
STEP_LINE = re.compile(
    r"step (?P<step>\d+)/(?P<total>\d+) loss (?P<loss>\S+) lr (?P<lr>\S+) "
    r"tok/s (?P<tokens_per_s>\S+) samples/s (?P<samples_per_s>\S+) "
    r"step_time (?P<step_time_s>[^\s]+?)s eta (?P<eta_s>[^\s]+?)s"
)
# the bridge's "..., ranks cuda/bf16, cpu/fp32, gloo, ..." (one device/precision per rank)
RANKS_LINE = re.compile(r"ranks ((?:[a-z0-9_]+/[a-z0-9_]+)(?:, [a-z0-9_]+/[a-z0-9_]+)*)")
ZERO_STAGE = re.compile(r"zero stage (\d+)")


# ---------------------------------------------------------------- pure parts


class CheckFailed(Exception):
    """A check's own verdict: the message is its one-line cause."""


def one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def peak_bf16_flops(gpu_name: str | None) -> tuple[float | None, str | None]:
    """(dense bf16 FLOP/s, the table key that matched) for a GPU name, or (None, None)."""
    name = (gpu_name or "").lower()
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops, key
    return None, None


def mfu(params: int, tokens_per_s: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: 6 x params x tokens/s over the peak (None when unknown)."""
    if not params or not tokens_per_s or not peak_flops:
        return None
    if not (math.isfinite(tokens_per_s) and tokens_per_s > 0):
        return None
    return 6.0 * params * tokens_per_s / peak_flops


def llama_param_count(cfg: dict) -> int:
    """Trainable parameters of a LlamaForCausalLM with this config.json (no bias terms)."""
    hidden = cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    inter = cfg["intermediate_size"]
    vocab = cfg["vocab_size"]
    bias = 1 if cfg.get("attention_bias") else 0
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    attn += bias * (heads * head_dim + 2 * kv_heads * head_dim + hidden)
    mlp = 3 * hidden * inter + ((2 * inter + hidden) if cfg.get("mlp_bias") else 0)
    per_layer = attn + mlp + 2 * hidden  # two RMSNorm weights
    embed = vocab * hidden
    head = 0 if cfg.get("tie_word_embeddings") else vocab * hidden
    return embed + layers * per_layer + hidden + head


def parse_step_line(line: str) -> dict | None:
    """The figures of one trainer progress line, or None for any other line."""
    m = STEP_LINE.search(line)
    if not m:
        return None
    out: dict[str, Any] = {"step": int(m["step"]), "total": int(m["total"])}
    for key in ("loss", "lr", "tokens_per_s", "samples_per_s", "step_time_s", "eta_s"):
        try:
            out[key] = float(m[key])
        except ValueError:
            out[key] = float("nan")
    return out


def parse_step_lines(text: str) -> list[dict]:
    return [rec for rec in map(parse_step_line, text.splitlines()) if rec is not None]


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows (a row that is not JSON is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def summarize_steps(rows: Sequence[dict], skip: int = 1) -> dict:
    """Throughput of the steps after the first `skip` (warm-up: allocation, autotuning), from
    per-step rows (log every step): tokens/s = all their tokens over all their seconds."""
    rows = sorted(rows, key=lambda r: r["step"])
    losses = [r.get("loss") for r in rows]
    measured = rows[skip:] if len(rows) > skip else rows
    seconds = sum(float(r.get("step_time_s") or 0.0) for r in measured)
    tokens = sum(
        float(r.get("tokens_per_s") or 0.0) * float(r.get("step_time_s") or 0.0) for r in measured
    )
    return {
        "steps": len(rows),
        "measured_steps": len(measured),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses_finite": bool(losses) and all(finite(x) for x in losses),
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "step_time_s": seconds / len(measured) if measured and seconds > 0 else None,
    }


def finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def failure_line(text: str) -> str:
    """The line that says why a process failed: the last exception line of a traceback,
    else the last line that says error, else the last line at all."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    exc = re.compile(r"^([\w.]+(Error|Exception|Exit|Interrupt)|[\w.]*OutOfMemory\w*)\b.*")
    for pattern in (exc, re.compile(r"(?i)\berror\b")):
        for line in reversed(lines):
            if pattern.search(line):
                return one_line(line)
    return one_line(lines[-1]) if lines else "(no output)"


def parse_ranks_line(text: str) -> list[tuple[str, str]] | None:
    """[(device, precision), ...] in rank order from the bridge's start line."""
    m = RANKS_LINE.search(text)
    if not m:
        return None
    return [tuple(part.split("/", 1)) for part in m.group(1).split(", ")]  # type: ignore[misc]


def check_record(name: str, timeout_s: float) -> dict:
    return {
        "name": name,
        "ok": False,
        "status": "failed",
        "cause": None,
        "seconds": None,
        "timeout_s": round(timeout_s, 1),
        "numbers": {},
    }


def report(mode: str, checks: dict[str, dict], started: float, seconds: float, **extra) -> dict:
    """The run's JSON: every check's record, and ok only when every one is."""
    failed = [name for name, rec in checks.items() if not rec["ok"]]
    return {
        "schema": SCHEMA,
        "tool": "gpu-check",
        "mode": mode,
        "ok": not failed and bool(checks),
        "failed": failed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(seconds, 1),
        **extra,
        "checks": checks,
    }


def shape_flags(shape: dict) -> list[str]:
    return [part for key, value in shape.items() for part in (f"--{key}", str(value))]


def flags(**values: object) -> list[str]:
    """--some-flag VALUE pairs from some_flag=VALUE, in order."""
    return shape_flags({key.replace("_", "-"): value for key, value in values.items()})


def corpus_copies(seq_len: int, micro_batch: int, tokens_per_copy: int = 1300) -> int:
    """Copies of the demo corpus (about 1300 tokens each, fewer with a bigger vocabulary)
    that fill four micro-batches of blocks at least."""
    return max(8, math.ceil(4 * seq_len * micro_batch / tokens_per_copy) + 1)


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def run_procs(
    specs: Sequence[tuple[list[str], dict, Path]],
    deadline: float,
    linger_s: float = 20.0,
    cwd: Path | None = None,
) -> list[tuple[int | None, str]]:
    """Run processes side by side, each in its own session with its output in its log.
    [(exit code or None when killed at the deadline, output)]. Once one fails, the others
    get linger_s to end by themselves (a peer waits for a dead rank in a collective)."""
    procs, handles = [], []
    try:
        for argv, env, log in specs:
            log.parent.mkdir(parents=True, exist_ok=True)
            fh = log.open("w")
            handles.append(fh)
            fh.write("$ " + " ".join(argv) + "\n")
            fh.flush()
            procs.append(
                subprocess.Popen(
                    argv,
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd=cwd,
                )
            )
        killed: set[int] = set()
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if any(c not in (None, 0) for c in codes):
                deadline = min(deadline, now + linger_s)
            if now >= deadline:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        killed.add(i)
                        _kill(p)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill(p)
        for fh in handles:
            fh.close()
    return [
        (None if i in killed else p.returncode, log.read_text(errors="replace"))
        for i, (p, (_, _, log)) in enumerate(zip(procs, specs, strict=True))
    ]


def run_one(
    argv: list[str], env: dict, log: Path, deadline: float, what: str, cwd: Path | None = None
) -> str:
    """Run one process to the end; its output, or CheckFailed with why it failed."""
    start = time.monotonic()
    ((code, text),) = run_procs([(argv, env, log)], deadline, cwd=cwd)
    if code is None:
        last = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise CheckFailed(
            f"{what} timed out after {time.monotonic() - start:.0f} s; last output: "
            f"{one_line(last[0], 200)}"
        )
    if code != 0:
        raise CheckFailed(f"{what} exited {code}: {failure_line(text)}")
    return text


class GpuSampler:
    """Peak memory used and utilisation on GPU 0 while a check runs (nvidia-smi every 2 s)."""

    def __init__(self):
        self.max_mib: float | None = None
        self.util: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self):
        argv = [
            "nvidia-smi",
            "-i",
            "0",
            "--query-gpu=memory.used,utilization.gpu",
            "--format=csv,noheader,nounits",
        ]
        while not self._stop.is_set():
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
                used, util = (float(x) for x in out.strip().splitlines()[0].split(","))
                self.max_mib = max(self.max_mib or 0.0, used)
                self.util.append(util)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(2.0)


# ---------------------------------------------------------------- the run


class Run:
    def __init__(self, args: argparse.Namespace, work: Path, logs: Path):
        self.args = args
        self.cpu = args.cpu
        self.work = work
        self.logs = logs
        self.python = sys.executable
        self.site: Path | None = None  # where .whl/ was installed, when it was
        self.info: dict[str, Any] = {}  # what earlier checks learnt (gpu name, fused adam)

    def env(self, **extra: str) -> dict:
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in (
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT",
                "DEEPFLEET_LOG_DIR",
                "DEEPFLEET_HEARTBEAT_DIR",
                "DEEPFLEET_BRIDGE_DEVICE",
                "DEVICE",
            )
        }
        path = [str(NODE_DIR)] + ([str(self.site)] if self.site else [])
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        cache = self.work / "cache"
        env.update(
            PYTHONPATH=os.pathsep.join(path),
            PYTHONDONTWRITEBYTECODE="1",
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_HOME=str(cache / "hf"),
            TMPDIR=str(self.work),
            TORCH_EXTENSIONS_DIR=str(cache / "torch_extensions"),
            TRITON_CACHE_DIR=str(cache / "triton"),
            MPLCONFIGDIR=str(cache / "mpl"),
            TOKENIZERS_PARALLELISM="false",
        )
        if self.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(extra)
        return env

    def py(self, *args: str) -> list[str]:
        return [self.python, *args]


def check_detect(run: Run, deadline: float, numbers: dict) -> None:
    text = run_one(
        run.py("-m", "deepfleet_node.detect", "--json"),
        run.env(),
        run.logs / "detect.log",
        deadline,
        "detect",
    )
    body = text[text.index("{") :] if "{" in text else ""
    try:
        rep = json.loads(body[: body.rindex("}") + 1])
    except ValueError as exc:
        raise CheckFailed(f"detect printed no JSON report ({exc})") from None
    gpus = rep.get("gpus") or []
    numbers.update(
        gpu_count=len(gpus),
        gpu_vendor=rep.get("gpu_vendor"),
        accelerator=rep.get("accelerator"),
        gpus=[
            {k: g.get(k) for k in ("index", "name", "memory_bytes", "compute_capability")}
            for g in gpus
        ],
        gpu_memory_gib=[
            round(g["memory_bytes"] / 2**30, 1) if g.get("memory_bytes") else None for g in gpus
        ],
        versions=rep.get("versions"),
        errors=[one_line(f"{e.get('tool')}: {e.get('error')}") for e in rep.get("errors") or []],
    )
    if gpus:
        run.info["gpu_name"] = gpus[0].get("name")
    if not run.cpu and not gpus:
        raise CheckFailed(
            "detect found no GPU" + (f" ({numbers['errors'][0]})" if numbers["errors"] else "")
        )


STACK_PROBE = r"""
import json, os, shutil
import torch
out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(),
       "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}
if out["cuda_available"]:
    out["device_name"] = torch.cuda.get_device_name(0)
    out["bf16_supported"] = torch.cuda.is_bf16_supported()
import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.git_version_info import installed_ops
out.update(deepspeed=deepspeed.__version__, deepspeed_file=deepspeed.__file__,
           accelerator=get_accelerator().device_name(),
           fused_adam_prebuilt=bool(installed_ops.get("fused_adam")))
try:
    from torch.utils.cpp_extension import CUDA_HOME
except Exception:
    CUDA_HOME = None
out["nvcc"] = bool(CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
for mod in ("transformers", "accelerate", "peft"):
    try:
        out[mod] = __import__(mod).__version__
    except Exception:
        out[mod] = None
print("STACK " + json.dumps(out))
"""


def wheel_dists(files: Iterable[Path]) -> set[str]:
    """The distributions (normalized names) a set of wheel files holds."""
    return {norm_dist(f.name.split("-", 1)[0]) for f in files if f.name.endswith(".whl")}


def norm_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def install_wheels(run: Run, deadline: float) -> list[str]:
    """When python cannot import deepspeed: install it and those of its dependencies that
    python lacks from .whl/ into a temp dir (on PYTHONPATH from here on). The names
    installed. GPU_CHECK_FORCE_WHEELS=1 installs every one .whl/ has (to test the wheels
    on a machine that has DeepSpeed: they then shadow its own)."""
    import importlib.util

    force = os.environ.get("GPU_CHECK_FORCE_WHEELS") == "1"
    if importlib.util.find_spec("deepspeed") is not None and not force:
        return []
    files = sorted(WHEEL_DIR.glob("*.whl")) if WHEEL_DIR.is_dir() else []
    if not files:
        raise CheckFailed(
            f"python has no deepspeed and {WHEEL_DIR} has no wheels "
            "(run scripts/gpu-wheels.sh here and carry .whl)"
        )
    have = wheel_dists(files)
    wanted = [
        dist for mod, dist in WHEEL_PACKAGES if force or importlib.util.find_spec(mod) is None
    ]
    missing = [d for d in wanted if norm_dist(d) in have]
    lacking = [d for d in wanted if norm_dist(d) not in have and d not in OPTIONAL_WHEELS]
    if lacking:
        raise CheckFailed(
            f"python lacks {', '.join(lacking)} and {WHEEL_DIR} has no wheel "
            "for it (scripts/gpu-wheels.sh)"
        )
    site = run.work / "site"
    site.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(run.py("-m", "pip", "--version"), capture_output=True, timeout=60)
    have_pip = probe.returncode == 0
    if have_pip and os.environ.get("GPU_CHECK_NO_PIP") != "1":
        argv = run.py(
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--disable-pip-version-check",
            "--find-links",
            str(WHEEL_DIR),
            "--target",
            str(site),
            *missing,
        )
        run_one(argv, run.env(), run.logs / "wheels.log", deadline, "pip install .whl")
    else:
        import zipfile

        for dist in missing:
            wheel = pick_wheel(files, dist)
            if wheel is None:
                raise CheckFailed(f"no wheel for {dist} in {WHEEL_DIR} fits this python")
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(site)
    run.site = site
    return missing


def pick_wheel(files: Iterable[Path], dist: str) -> Path | None:
    """The wheel for `dist` whose tags this interpreter supports (no pip needed)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import canonicalize_name, parse_wheel_filename
    except ImportError:
        return None
    supported = {str(t): i for i, t in enumerate(sys_tags())}
    best = None
    for f in files:
        try:
            name, _, _, tags = parse_wheel_filename(f.name)
        except ValueError:
            continue
        if name != canonicalize_name(dist):
            continue
        rank = min((supported[str(t)] for t in tags if str(t) in supported), default=None)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, f)
    return best[1] if best else None


def check_stack(run: Run, deadline: float, numbers: dict) -> None:
    installed = install_wheels(run, deadline)
    numbers["installed_from_wheels"] = installed
    text = run_one(
        run.py("-c", STACK_PROBE),
        run.env(),
        run.logs / "stack.log",
        deadline,
        "import torch + deepspeed",
    )
    line = next((ln for ln in text.splitlines() if ln.startswith("STACK ")), None)
    if line is None:
        raise CheckFailed("the probe printed no result")
    numbers.update(json.loads(line[len("STACK ") :]))
    run.info.update(
        fused_adam=numbers.get("fused_adam_prebuilt"), cuda_available=numbers.get("cuda_available")
    )
    if numbers.get("device_name") and not run.info.get("gpu_name"):
        run.info["gpu_name"] = numbers["device_name"]
    if not run.cpu:
        if not numbers.get("cuda_available"):
            raise CheckFailed(f"torch {numbers.get('torch')} sees no CUDA device")
        if numbers.get("accelerator") != "cuda":
            raise CheckFailed(f"DeepSpeed picked its {numbers.get('accelerator')} accelerator")


def build_tiny(run: Run, out: Path, shape: dict, repeat: int, deadline: float, log: str) -> Path:
    data = out.parent / f"{out.name}.txt"
    argv = run.py("-m", "deepfleet_node.tiny", *flags(out=out, data_out=data, data_repeat=repeat))
    run_one(
        argv + shape_flags(shape),
        run.env(),
        run.logs / log,
        deadline,
        "deepfleet_node.tiny",
        cwd=run.work,
    )
    return data


def zero2_config(run: Run, numbers: dict) -> str:
    """zero2, or (no prebuilt FusedAdam, whose JIT build wants nvcc and minutes) the same
    config with torch's AdamW."""
    choice = run.args.optimizer
    if choice == "auto":
        choice = "fused" if (run.cpu or run.info.get("fused_adam")) else "torch"
    if run.cpu:
        numbers["optimizer"] = "torch AdamW"
    else:
        numbers["optimizer"] = "DeepSpeed FusedAdam" if choice == "fused" else "torch AdamW"
    if choice == "fused" or run.cpu:  # train.py itself picks torch's AdamW on CPU
        return "zero2"
    cfg = json.loads((NODE_DIR / "deepfleet_node" / "configs" / "zero2.json").read_text())
    cfg["optimizer"]["params"]["torch_adam"] = True
    path = run.work / "zero2-torch-adam.json"
    path.write_text(json.dumps(cfg, indent=2))
    return str(path)


def check_train(run: Run, deadline: float, numbers: dict) -> None:
    a = run.args
    if not run.cpu and run.info.get("cuda_available") is False:
        raise CheckFailed("torch sees no CUDA device (see stack): no GPU to train on")
    shape = {**(CPU_MODEL if run.cpu else GPU_MODEL), **a.shape}
    seq, micro, steps = (128, 2, 3) if run.cpu else (a.seq_len, a.micro_batch, a.steps)
    precision = "fp32" if run.cpu else "bf16"
    model = run.work / "train-model"
    data = build_tiny(run, model, shape, corpus_copies(seq, micro), deadline, "train-build.log")
    cfg = json.loads((model / "config.json").read_text())
    params = llama_param_count(cfg)
    numbers.update(
        params=params,
        vocab=cfg["vocab_size"],
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        seq_len=seq,
        micro_batch=micro,
        steps_asked=steps,
        precision=precision,
        zero_stage=None,
        world=1,
    )
    config = zero2_config(run, numbers)
    out = run.work / "train-run"
    argv = run.py("-m", "deepfleet_node.train") + flags(
        model=model,
        data=data,
        output=out,
        deepspeed_config=config,
        precision=precision,
        steps=steps,
        seq_len=seq,
        micro_batch=micro,
        warmup_steps=1,
        log_every=1,
    )
    env = run.env(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    sampler = GpuSampler() if not run.cpu else None
    with sampler or _null():
        text = run_one(
            argv, env, run.logs / "train.log", deadline, "deepfleet_node.train", cwd=run.work
        )
    m = ZERO_STAGE.search(text)
    numbers["zero_stage"] = int(m.group(1)) if m else None
    rows = read_metrics(out / "metrics.jsonl") or parse_step_lines(text)
    summary = summarize_steps(rows, skip=1 if len(rows) > 1 else 0)
    numbers.update(summary)
    numbers["tokens_per_step"] = seq * micro
    if sampler is not None:
        numbers["gpu_memory_max_gib"] = (
            round(sampler.max_mib / 1024, 1) if sampler.max_mib is not None else None
        )
        numbers["gpu_util_mean_pct"] = (
            round(sum(sampler.util) / len(sampler.util), 1) if sampler.util else None
        )
    if run.cpu:
        numbers.update(mfu=None, peak_flops=None, peak_source=None, gpu_name=None)
    else:
        name = run.info.get("gpu_name")
        peak, key = peak_bf16_flops(name)
        numbers.update(
            gpu_name=name,
            peak_flops=peak,
            peak_source=f"dense bf16 table entry '{key}'" if key else None,
            mfu=(
                round(x, 4)
                if (x := mfu(params, summary["tokens_per_s"], peak)) is not None
                else None
            ),
        )
    if summary["steps"] != steps:
        raise CheckFailed(f"{summary['steps']} of {steps} steps logged")
    if not summary["losses_finite"]:
        raise CheckFailed(
            f"loss not finite: first {summary['first_loss']}, last {summary['last_loss']}"
        )
    if numbers["zero_stage"] != 2:
        raise CheckFailed(f"trainer ran ZeRO stage {numbers['zero_stage']}, not 2")
    if not (out / "final" / "config.json").is_file():
        raise CheckFailed("no final/ export after the run")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def bridge_module(run: Run, deadline: float) -> str:
    probe = (
        "import importlib.util, sys\n"
        "try:\n    ok = importlib.util.find_spec(sys.argv[1]) is not None\n"
        "except Exception:\n    ok = False\nsys.exit(0 if ok else 1)\n"
    )
    for module in BRIDGE_MODULES:
        left = max(1.0, deadline - time.monotonic())
        proc = subprocess.run(
            run.py("-c", probe, module), env=run.env(), capture_output=True, timeout=min(60.0, left)
        )
        if proc.returncode == 0:
            return module
    raise CheckFailed(f"none of {', '.join(BRIDGE_MODULES)} is importable")


def check_bridge(run: Run, deadline: float, numbers: dict) -> None:
    module = bridge_module(run, deadline)
    new = module == BRIDGE_MODULES[0]
    devices = ["cpu", "cpu"] if run.cpu else ["cuda", "cpu"]
    if run.cpu:
        precision = "fp32"
    else:
        precision = "bf16,fp32" if new else "auto"  # the old bridge: bf16 on cuda, fp32 on cpu
    numbers.update(module=module, precision_arg=precision, devices_asked=devices)
    model = run.work / "bridge-model"
    data = build_tiny(run, model, BRIDGE_MODEL, 4, deadline, "bridge-build.log")
    out = run.work / "bridge-run"
    steps = 4
    argv = run.py("-m", module) + flags(
        model=model,
        data=data,
        output=out,
        deepspeed_config="zero2",
        precision=precision,
        steps=steps,
        seq_len=64,
        micro_batch=2,
        warmup_steps=1,
        log_every=1,
    )
    port = str(free_port())
    specs = []
    for rank, device in enumerate(devices):
        dev_env = {name: device for name in BRIDGE_DEVICE_ENVS}
        env = run.env(
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            **dev_env,
        )
        specs.append((argv, env, run.logs / f"bridge-rank{rank}.log"))
    results = run_procs(specs, deadline, cwd=run.work)
    numbers["exit_codes"] = [code for code, _ in results]
    for rank, (code, text) in enumerate(results):
        if code is None:
            raise CheckFailed(f"rank {rank} ({devices[rank]}) timed out: {failure_line(text)}")
        if code != 0:
            raise CheckFailed(f"rank {rank} ({devices[rank]}) exited {code}: {failure_line(text)}")
    text0 = results[0][1]
    ranks = parse_ranks_line(text0)
    numbers["ranks"] = [f"{d}/{p}" for d, p in ranks] if ranks else None
    rows = read_metrics(out / "metrics.jsonl") or parse_step_lines(text0)
    summary = summarize_steps(rows, skip=0)
    numbers.update(
        steps=summary["steps"],
        first_loss=summary["first_loss"],
        last_loss=summary["last_loss"],
        tokens_per_s=summary["tokens_per_s"],
    )
    if ranks is None:
        raise CheckFailed("rank 0 printed no 'ranks device/precision, ...' line")
    if [d for d, _ in ranks] != devices:
        raise CheckFailed(f"ranks ran on {', '.join(numbers['ranks'])}, asked {', '.join(devices)}")
    if summary["steps"] != steps:
        raise CheckFailed(f"{summary['steps']} of {steps} steps logged")
    if not summary["losses_finite"]:
        raise CheckFailed(f"loss not finite: {[r.get('loss') for r in rows]}")


CHECK_FUNCS: dict[str, Callable[[Run, float, dict], None]] = {
    "detect": check_detect,
    "stack": check_stack,
    "train": check_train,
    "bridge": check_bridge,
}


def run_check(run: Run, name: str, budget_end: float) -> dict:
    own = TIMEOUTS[name][1 if run.cpu else 0]
    now = time.monotonic()
    timeout = max(0.0, min(own, budget_end - now))
    rec = check_record(name, timeout)
    say(f"{name} ... (timeout {timeout:.0f} s)")
    start = time.monotonic()
    try:
        if timeout < 5:
            raise CheckFailed("no time left in the run's budget")
        CHECK_FUNCS[name](run, start + timeout, rec["numbers"])
    except CheckFailed as exc:
        rec["cause"] = one_line(exc)
    except subprocess.TimeoutExpired as exc:
        rec["cause"] = one_line(f"timed out: {' '.join(map(str, exc.cmd))[:120]}")
    except Exception as exc:  # a bug or surprise in this script: that check fails, not the run
        rec["cause"] = one_line(f"{type(exc).__name__}: {exc}")
    else:
        rec.update(ok=True, status="ok")
    rec["seconds"] = round(time.monotonic() - start, 1)
    say(
        f"{name}: {rec['status']} in {rec['seconds']} s"
        + (f": {rec['cause']}" if rec["cause"] else "")
    )
    return rec


def say(line: str) -> None:
    print(f"gpu-check: {line}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu-check.sh",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--cpu", action="store_true", help="CPU mode: small models, no GPU needed")
    p.add_argument(
        "--checks",
        default=",".join(CHECKS),
        help=f"comma list, in the order run (default {','.join(CHECKS)})",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds for the whole run; each check also has its own timeout",
    )
    p.add_argument("--seq-len", type=int, default=2048, help="GPU train check (default 2048)")
    p.add_argument("--micro-batch", type=int, default=8, help="GPU train check (default 8)")
    p.add_argument("--steps", type=int, default=10, help="GPU train check (default 10)")
    p.add_argument(
        "--optimizer",
        choices=("auto", "fused", "torch"),
        default="auto",
        help="GPU train check: DeepSpeed's FusedAdam (auto: when prebuilt) or torch's AdamW",
    )
    p.add_argument(
        "--shape",
        type=shape_arg,
        default={},
        metavar="KEY=N,...",
        help="override the train check's model shape (deepfleet_node.tiny flags "
        "without --, e.g. layers=8,hidden-size=1024)",
    )
    p.add_argument("--json", dest="json_path", help="write the results here instead")
    p.add_argument(
        "--work-dir",
        help="where the models and checkpoints go (~20 GB in GPU mode; default: a new dir "
        "in $TMPDIR, removed at the end)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (models, checkpoints)")
    args = p.parse_args(argv)
    args.checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown or not args.checks:
        p.error(f"unknown check {', '.join(unknown) or '(none)'}; checks: {', '.join(CHECKS)}")
    return args


def shape_arg(text: str) -> dict:
    shape = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().removeprefix("--").replace("_", "-")
        if not sep or key not in GPU_MODEL or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"{part!r}: want KEY=N with KEY one of {', '.join(GPU_MODEL)}"
            )
        shape[key] = int(value)
    return shape


def result_path(args: argparse.Namespace) -> Path:
    if args.json_path:
        return Path(args.json_path)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu-check.json"
    return Path(tempfile.mkdtemp(prefix="gpu-check-")) / "gpu-check.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, t0 = time.time(), time.monotonic()
    budget_end = t0 + args.budget
    path = result_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    logs = path.parent / "gpu-check-logs"
    logs.mkdir(exist_ok=True)
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-", dir=args.work_dir))
    run = Run(args, work, logs)
    mode = "cpu" if args.cpu else "gpu"
    say(f"{mode} mode, python {sys.executable}, work dir {work}, logs {logs}")
    checks: dict[str, dict] = {}
    try:
        for name in args.checks:
            checks[name] = run_check(run, name, budget_end)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = report(
        mode,
        checks,
        started,
        time.monotonic() - t0,
        python=sys.executable,
        python_version=sys.version.split()[0],
        budget_s=args.budget,
        wheels_site=str(run.site) if run.site else None,
        logs=str(logs),
    )
    text = json.dumps(result, indent=2, default=str)
    path.write_text(text + "\n")
    print(text, flush=True)
    say(
        f"{'all ok' if result['ok'] else 'FAILED: ' + ', '.join(result['failed'])}; "
        f"{result['seconds']} s; results in {path}"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
