"""Helpers for the node-workload tests (a uniquely named module: tests/unit and
tests/integration have their own conftest, and `from conftest import` would be ambiguous
when several test folders run in one session)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parents[2] / "images" / "node"

SUBPROCESS_TIMEOUT_S = 300

# Set by scripts/test-node.sh: the run is inside a node image, which must have every
# package these tests use (see require) and may skip only for the reasons conftest.py's
# EXPECTED_SKIPS lists.
IN_IMAGE = os.environ.get("DEEPFLEET_IN_IMAGE") == "1"


def require(module: str):
    """The module, imported. Outside a node image a missing one skips (the test, or the
    whole file at module level); inside one (DEEPFLEET_IN_IMAGE=1) the image must have
    it, so the import runs for real and a broken install fails the run instead."""
    if IN_IMAGE:
        return importlib.import_module(module)
    return pytest.importorskip(module)


# Five prompts of different lengths: 3 ranks get 2/2/1 of them and 2 ranks 3/2, so uneven
# splits (a rank idling through a round) are exercised too.
PROMPTS = ["The keeper", "The red boat", "Every morning the", "One day", "Nobody knows"]
NEW_TOKENS = 12


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(rank: int = 0, world: int = 1, port: int | None = None) -> dict[str, str]:
    """Env for one rank of a process group formed without the DeepSpeed launcher."""
    env = dict(os.environ)
    if NODE_DIR.is_dir():  # a checkout; inside the image the package is installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NODE_DIR), env.get("PYTHONPATH")]))
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port or free_port()),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `python -m deepfleet_node.<module>` as a one-rank job; its combined output."""
    proc = subprocess.run(
        [sys.executable, "-m", f"deepfleet_node.{module}", *map(str, args)],
        env=env or node_env(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{module} exited {proc.returncode}:\n{output[-6000:]}"
    return output


def run_ranks(module: str, world: int, *args: str, node_dirs=None) -> list[str]:
    """Start `world` ranks of one job over gloo; each rank's combined output.

    node_dirs simulates one node per rank: rank i runs in node_dirs[i] as that node's
    local rank 0, so relative paths land on separate "disks".
    """
    port = free_port()
    procs = []
    for rank in range(world):
        env = node_env(rank, world, port)
        if node_dirs:
            env["LOCAL_RANK"] = "0"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", f"deepfleet_node.{module}", *map(str, args)],
                env=env,
                cwd=node_dirs[rank] if node_dirs else None,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=SUBPROCESS_TIMEOUT_S)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{out[-6000:]}"
    return outputs


# A progress line of deepfleet_node.train (and the bridge), printed by global rank 0.
LOG_LINE = re.compile(
    r"^step (\d+)/(\d+) loss (\d+\.\d{4}) lr (\S+) tok/s (\d+) samples/s (\d+\.\d) "
    r"step_time (\d+\.\d\d)s eta (\d+)s$",
    re.M,
)


def logged(log) -> dict[int, float]:
    """{step: loss} from the rank-0 progress lines."""
    return {int(m[1]): float(m[3]) for m in LOG_LINE.finditer(log)}


TRAIN_ARGS = ("--seq-len", "64", "--micro-batch", "4", "--lr", "3e-3", "--warmup-steps", "5")

# Two ranks, two micro-steps per optimizer step, a global micro-batch of 4: short runs
# that runs with other splits (and the bridge) must reproduce step by step. DeepSpeed's
# warmup leaves the lr at 0 for the first two steps, so five steps give three updates.
PAIR_ARGS = ("--steps", "5", "--log-every", "1", "--seq-len", "64", "--micro-batch", "2",
             "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "2")  # fmt: skip


def pair_args(model, data, out) -> tuple:
    return ("--model", model, "--data", data, "--output", out, *PAIR_ARGS)


def instruction_data(directory, train_text):
    """Plain text plus prompt/completion rows: blocks with unlike numbers of labelled
    tokens, so a loss averaged per sample differs from one averaged per token."""
    directory.mkdir()
    (directory / "notes.txt").write_text(Path(train_text).read_text())
    rows = [{"prompt": f"Which boat is {c}? ", "completion": f"The {c} boat."}
            for c in ("red", "green", "white") * 10]  # fmt: skip
    (directory / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def run_launcher(module: str, procs: int, *args: str, port: int | None = None) -> str:
    """Run `deepspeed --num_gpus N --module deepfleet_node.<module>` on this host.

    The real launcher, unlike run_ranks, sets LOCAL_SIZE, which is what makes DeepSpeed
    set up its CPU shared-memory all-reduce; its combined output.
    """
    sibling = Path(sys.executable).with_name("deepspeed")
    launcher = str(sibling) if sibling.is_file() else shutil.which("deepspeed")
    assert launcher, "no `deepspeed` launcher on PATH"
    env = node_env()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key)  # the launcher sets these per rank
    proc = subprocess.run(
        [launcher, "--num_gpus", str(procs), "--master_port", str(port or free_port()),
         "--module", f"deepfleet_node.{module}", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"launcher exited {proc.returncode}:\n{output[-6000:]}"
    return output
