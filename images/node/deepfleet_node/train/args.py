"""The command line of deepfleet_node.train, which the bridge shares (its --precision aside)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..precision import PRECISIONS
from . import balance
from .config import CONFIG_NAMES

PROG = "deepfleet_node.train"
DESCRIPTION = "DeepSpeed causal-LM fine-tuning, run on every rank by the DeepSpeed launcher."
BALANCES = ("even", "speed")


def parse_args(
    argv: list[str] | None = None,
    *,
    prog: str = PROG,
    description: str = DESCRIPTION,
    precision_type: Callable[[str], Any] | None = None,
) -> argparse.Namespace:
    """train's arguments. precision_type: how --precision is read instead of one of
    auto/fp32/bf16/fp16 (the bridge's per-rank list); its default "auto" goes through it."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model", required=True, help="local model dir or hub name")
    p.add_argument("--data", help=".txt/.jsonl file, a directory of them, or a save_to_disk dir")
    p.add_argument(
        "--prepare-dataset",
        metavar="MODULE:FUNCTION",
        help="build the dataset with fn(tokenizer=, seq_len=, data=, seed=); see data.from_hook",
    )
    p.add_argument(
        "--deepspeed-config",
        "--deepspeed_config",
        default="zero2",
        help=f"JSON path or one of {', '.join(CONFIG_NAMES)}",
    )
    p.add_argument("--output", required=True, help="run dir: checkpoints/, final/, metrics.jsonl")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default 100)")
    length.add_argument("--epochs", type=float, help="passes over this rank's shard")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--micro-batch",
        type=int,
        default=4,
        help="sequences per rank per micro-step, on average: the global micro-batch is this x "
        "world size, split over the ranks by --balance / --shares",
    )
    p.add_argument("--global-batch", type=int, help="sets gradient accumulation from world size")
    p.add_argument("--grad-accum", type=int, default=1, help="used when --global-batch is unset")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--weight-decay", type=float, help="default: the config's value")
    p.add_argument(
        "--log-every", type=int, default=0, help="a progress line every N steps (0: about 6 a run)"
    )
    p.add_argument(
        "--save-every", type=int, default=0, help="checkpoint every N steps (0: end only)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/latest")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument(
        "--balance",
        choices=BALANCES,
        default="even",
        help="even: every rank takes --micro-batch samples per micro-step; speed: each rank's "
        "share of the global micro-batch follows its measured speed",
    )
    p.add_argument(
        "--shares",
        type=shares_arg,
        metavar="N,N,...",
        help="samples per micro-step for each rank, summing to --micro-batch x world size; "
        "fixed for the whole run (no calibration, no rebalancing)",
    )
    p.add_argument(
        "--max-micro",
        type=shares_arg,
        metavar="N,N,...",
        help="with --balance speed: the largest micro-batch each rank's memory holds (the "
        "operator's memory fit); a faster rank never takes more",
    )
    p.add_argument(
        "--rebalance-after",
        type=int,
        default=3,
        metavar="STEPS",
        help="with --balance speed: re-split once from the first STEPS steps' forward "
        "timings (0: never)",
    )
    if precision_type is None:
        p.add_argument(
            "--precision",
            choices=("auto", *PRECISIONS),
            default="auto",
            help="auto: bf16 when every rank's GPU has it natively, else fp16; fp32 on CPU",
        )
    else:
        p.add_argument("--precision", type=precision_type, default="auto", metavar="PRECISION")
    p.add_argument(
        "--predicted-step-s",
        type=float,
        metavar="SECONDS",
        help="the operator's predicted seconds per optimizer step (its cost model): rank 0 "
        "prints it against the measured step time once, after the warm-up step, and "
        "metrics.jsonl records it beside step_time_s",
    )
    p.add_argument("--verbose", action="store_true", help="keep DeepSpeed's INFO logging")
    # The DeepSpeed launcher appends --local_rank=N; LOCAL_RANK in the env says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.data and not args.prepare_dataset:
        p.error("give --data or --prepare-dataset")
    if args.steps is None and args.epochs is None:
        args.steps = 100
    if args.rebalance_after < 0:
        p.error("--rebalance-after must be >= 0")
    if args.predicted_step_s is not None and not args.predicted_step_s > 0:
        p.error("--predicted-step-s must be > 0")
    return args


def shares_arg(text: str) -> list[int]:
    try:
        return balance.parse_shares(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_shares_arg(args: argparse.Namespace, world: int) -> None:
    """--shares and --max-micro against the world size, once it is known."""
    if args.max_micro is not None and len(args.max_micro) != world:
        raise SystemExit(f"--max-micro: {len(args.max_micro)} caps for {world} ranks")
    if args.shares is not None:
        try:
            balance.check_shares(args.shares, world, args.micro_batch * world)
        except ValueError as exc:
            raise SystemExit(f"--shares: {exc}") from None
