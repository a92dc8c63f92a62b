"""`deepfleet export slurm`: the same training job for another scheduler."""

from __future__ import annotations

import sys
from pathlib import Path

from deepfleet.cli.common import (
    add_train_job,
    train_job,
)
from deepfleet.errors import DeepfleetError
from deepfleet.export import slurm


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
        train=train_job(args),
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


def add_export(sub) -> None:
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
    add_train_job(xs)
    xs.add_argument("extra", nargs="*", help="passed to train.py after --")
    xs.set_defaults(func=cmd_export_slurm)
