"""What several command groups share: machines from NODES words or a cluster file, slots,
the training job's and the run's options."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from deepfleet.errors import DeepfleetError
from deepfleet.inventory import clusterfile
from deepfleet.inventory.nodes import Inventory
from deepfleet.inventory.sshconfig import DEFAULT_SSH_CONFIG, resolve
from deepfleet.jobs import submit
from deepfleet.jobs.jobrun import RunOptions
from deepfleet.jobs.watchdog import LivenessPolicy
from deepfleet.planning import trainplan


def split_nodes(values: list[str]) -> list[str]:
    return [word for value in values for word in value.split()]


def parse_slots(values: list[str]) -> dict[str, int]:
    slots = {}
    for value in values:
        for item in value.replace(",", " ").split():
            name, sep, count = item.rpartition("=")
            if not sep or not count.isdigit():
                raise DeepfleetError(f"--slots expects NODE=N, got {item!r}")
            slots[name] = int(count)
    return slots


def inventory_from(args) -> tuple[Inventory, clusterfile.ClusterFile | None]:
    """The machines from NODES words or from a cluster file, never both."""
    if getattr(args, "cluster_file", None):
        if args.nodes:
            raise DeepfleetError("give the machines as NODES or in --cluster-file, not both")
        loaded = clusterfile.load(args.cluster_file)
        return loaded.inventory(), loaded
    ssh_config = Path(args.ssh_config) if args.ssh_config else DEFAULT_SSH_CONFIG
    return resolve(split_nodes(args.nodes), ssh_config), None


def given(flag, from_file, default):
    """A flag typed on the command line wins over the cluster file, which wins over the default."""
    return next((v for v in (flag, from_file) if v is not None), default)


def train_request(args) -> submit.TrainRequest:
    return replace(
        train_job(args),
        bridge=args.bridge,
        slots=parse_slots(args.slots),
        options=run_options(args),
    )


def train_job(args) -> submit.TrainRequest:
    """The job's own settings (_add_train_job's), whoever runs it."""
    return submit.TrainRequest(
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


def run_options(args) -> RunOptions:
    return RunOptions(
        liveness=LivenessPolicy(
            interval=min(10.0, max(1.0, args.liveness_timeout / 6)), timeout=args.liveness_timeout
        ),
        collective_timeout=args.collective_timeout,
        preflight_timeout=args.preflight_timeout,
        backend=args.backend,
        verbose=args.verbose,
    )


def add_cluster_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster-file", metavar="FILE", default=None,
        help="machines and options from a cluster.yaml (`deepfleet init` writes one)",
    )  # fmt: skip


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend", choices=("cuda", "rocm", "cpu"), default=None,
        help="run on these machines only (default: the group with the most GPU memory)",
    )  # fmt: skip


def add_run_options(p: argparse.ArgumentParser) -> None:
    add_backend(p)
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


def add_balance(p) -> None:
    p.add_argument(
        "--balance", default="speed", choices=trainplan.BALANCES,
        help="speed: each rank's micro-batch follows its measured speed (default); even",
    )  # fmt: skip


def add_train_job(tr: argparse.ArgumentParser) -> None:
    """The training job itself: what `train` runs and `export slurm` writes."""
    tr.add_argument("--model", default=submit.DEMO, help="demo, a local dir, or a hub name")
    tr.add_argument("--data", default=submit.DEMO, help="demo, or a local .txt/.jsonl file or dir")
    tr.add_argument(
        "--config", default="zero2",
        help="zero1|zero2|zero3|zero3-offload, auto (the fastest predicted that fits), or a path",
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
    add_balance(tr)
