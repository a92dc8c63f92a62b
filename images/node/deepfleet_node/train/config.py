"""The DeepSpeed config of a run: a shipped or given JSON fitted to the command line
(batch sizes, optimizer, warmup scheduler, precision, ZeRO on a CPU), and the precision."""

from __future__ import annotations

import argparse
import json
import math
from importlib import resources
from pathlib import Path

CONFIG_NAMES = ("zero1", "zero2", "zero3", "zero3-offload")
WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


def pick_precision(requested: str, device: str) -> str:
    """--precision as given, or for auto the node's own rule (deepfleet_node.precision)
    agreed over the ranks: bf16 only when every rank's GPU has it natively, else fp16;
    fp32 on CPU. The operator normally decides and passes it explicitly."""
    if requested != "auto":
        return requested
    if device == "cpu":
        return "fp32"
    import torch
    import torch.distributed as dist

    from ..precision import local_precision
    from .model import torch_device

    here = torch_device(device)
    ok = torch.tensor([int(local_precision(here) == "bf16")], device=here)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return "bf16" if ok.item() else "fp16"


def resolve_config(name_or_path: str) -> Path:
    if name_or_path in CONFIG_NAMES:
        return Path(str(resources.files("deepfleet_node") / "configs" / f"{name_or_path}.json"))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no DeepSpeed config {path} (names: {', '.join(CONFIG_NAMES)})")
    return path


def load_config(name_or_path: str) -> dict:
    """The DeepSpeed config as shipped (a name) or written (a path), not yet fitted."""
    return json.loads(resolve_config(name_or_path).read_text())


def grad_accum_steps(args: argparse.Namespace, world: int) -> int:
    if args.global_batch is None:
        return args.grad_accum
    per_step = args.micro_batch * world
    if args.global_batch % per_step:
        raise SystemExit(
            f"--global-batch {args.global_batch} is not a multiple of "
            f"micro-batch {args.micro_batch} x world size {world}"
        )
    return args.global_batch // per_step


def total_steps(args, batches_per_epoch: int, ga: int) -> int:
    if args.steps is not None:
        return args.steps
    return max(1, math.ceil(args.epochs * batches_per_epoch / ga))


def build_ds_config(
    args, world: int, ga: int, precision: str, steps: int, device: str, shared: bool
) -> dict:
    cfg = load_config(args.deepspeed_config)
    cfg.setdefault("checkpoint", {})["use_node_local_storage"] = not shared
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
    cfg["gradient_accumulation_steps"] = ga
    cfg["train_batch_size"] = args.micro_batch * ga * world
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": precision == "bf16"}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": precision == "fp16"}
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    set_optimizer(cfg, args, device == "cpu" and not offloads(zero, "offload_optimizer"))
    set_scheduler(cfg, args, steps)
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if device == "cpu":
        adapt_zero_to_cpu(zero)
    return cfg


def offloads(zero: dict, key: str) -> bool:
    return zero.get(key, {}).get("device", "none") not in ("none", None)


def set_optimizer(cfg: dict, args, torch_adam: bool) -> None:
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    params["lr"] = args.lr
    if args.weight_decay is not None:
        params["weight_decay"] = args.weight_decay
    if torch_adam and opt["type"].lower() in ("adam", "adamw"):
        # FusedAdam would JIT-compile a CPU op for no gain; offload keeps DeepSpeedCPUAdam.
        params["torch_adam"] = True


def set_scheduler(cfg: dict, args, steps: int) -> None:
    """Fit DeepSpeed's warmup schedulers to this run; other schedulers are left alone."""
    sched = cfg.setdefault("scheduler", {"type": "WarmupDecayLR", "params": {}})
    kind = sched["type"]
    if kind not in WARMUP_SCHEDULERS:
        return
    params = sched.setdefault("params", {})
    # DeepSpeed rejects a zero-step warmup, and the decaying ones need steps left to decay.
    warmup = max(1, min(args.warmup_steps, steps - 1))
    params["warmup_num_steps"] = warmup
    if kind != "WarmupCosineLR":  # that one scales the optimizer's lr by ratios instead
        params.update(warmup_min_lr=0.0, warmup_max_lr=args.lr)
    if kind != "WarmupLR":
        params["total_num_steps"] = max(steps, warmup + 1)


def adapt_zero_to_cpu(zero: dict) -> None:
    # No side streams to overlap with and no pinned memory without an accelerator.
    zero["overlap_comm"] = False
    for key in ("offload_optimizer", "offload_param"):
        if key in zero:
            zero[key]["pin_memory"] = False
