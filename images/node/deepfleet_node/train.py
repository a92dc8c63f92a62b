"""DeepSpeed causal-LM fine-tuning, run on every rank by the DeepSpeed launcher.

    deepspeed --hostfile H --master_addr IP --master_port P \\
        --module deepfleet_node.train --model DIR --data FILE --output OUT ...

Also runs as a plain `python -m deepfleet_node.train ...`: with no RANK/WORLD_SIZE in the
environment it makes a one-rank process group by itself.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from . import balance
from ._log import exit_after_success, say
from .ranksetup import init_distributed, quiet_libraries
from .zero3 import zero3_loading

CONFIG_NAMES = ("zero1", "zero2", "zero3", "zero3-offload")
WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
BALANCES = ("even", "speed")


# ---------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="deepfleet_node.train", description=__doc__.split("\n")[0])
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
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
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
    return args


def shares_arg(text: str) -> list[int]:
    try:
        return balance.parse_shares(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------- distributed


def pick_precision(requested: str, device: str) -> str:
    """bf16 only when every rank's GPU has it, else fp16; fp32 on CPU."""
    if requested != "auto":
        return requested
    if device == "cpu":
        return "fp32"
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    ok = torch.tensor([int(get_accelerator().is_bf16_supported())], device=torch_device(device))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return "bf16" if ok.item() else "fp16"


def torch_device(device: str):
    import torch
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name() if device != "cpu" else "cpu")


# ---------------------------------------------------------------- config


def resolve_config(name_or_path: str) -> Path:
    if name_or_path in CONFIG_NAMES:
        return Path(str(resources.files("deepfleet_node") / "configs" / f"{name_or_path}.json"))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no DeepSpeed config {path} (names: {', '.join(CONFIG_NAMES)})")
    return path


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


def build_ds_config(
    args, world: int, ga: int, precision: str, steps: int, device: str, shared: bool
) -> dict:
    cfg = json.loads(resolve_config(args.deepspeed_config).read_text())
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


# ---------------------------------------------------------------- model and data


def load_model(args, ds_config: dict, precision: str):
    """The model, plus an object that must stay alive while ZeRO-3 is in use.

    With ZeRO-3, zero3_loading makes from_pretrained build the model under
    deepspeed.zero.Init, so no rank ever holds the full weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    keep_alive = None
    if ds_config["zero_optimization"].get("stage") == 3:
        keep_alive = zero3_loading(ds_config)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    # from_pretrained leaves the model in eval mode and DeepSpeed does not change it; in
    # eval mode HF skips activation checkpointing (and dropout) altogether.
    model.train()
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, keep_alive


def load_dataset(args, tokenizer):
    from . import data

    if args.prepare_dataset:
        return data.from_hook(args.prepare_dataset, tokenizer, args.seq_len, args.data, args.seed)
    return data.build_packed(tokenizer, data.load_examples(args.data), args.seq_len)


def total_steps(args, batches_per_epoch: int, ga: int) -> int:
    if args.steps is not None:
        return args.steps
    return max(1, math.ceil(args.epochs * batches_per_epoch / ga))


# ---------------------------------------------------------------- loss


def valid_targets(labels) -> int:
    """How many tokens a causal-LM loss counts in a batch: the labels after HF's one-token
    shift (position t predicts label t+1) that are not IGNORE_INDEX."""
    from .data import IGNORE_INDEX

    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits, labels):
    """Summed next-token cross-entropy over the valid targets.

    Exactly HF's ForCausalLMLoss with reduction "sum" (float logits, labels padded by one
    and shifted), i.e. the model's own `.loss` times valid_targets(labels), except that
    a batch with no valid target gives 0 rather than HF's 0/0 = nan.
    """
    import torch.nn.functional as F

    from .data import IGNORE_INDEX

    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].contiguous()
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shifted.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def weighted_loss(loss_sum, world: int, ga: int, step_targets: int):
    """What one micro-step hands to engine.backward.

    DeepSpeed divides the loss by ga and averages gradients over the ranks, so the
    gradient of the optimizer step is sum over ranks and micro-steps of loss_sum divided by
    step_targets, the valid targets of the whole global step: the token mean over the
    global batch, however many samples each rank took.
    """
    return loss_sum * (world * ga / max(step_targets, 1))


def all_reduce_sum(value: int, device) -> int:
    import torch
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


# ---------------------------------------------------------------- balancing


def synchronize(device) -> None:
    """Wait for the device's queued work, so a wall-clock timer measures it."""
    import torch

    if torch.device(device).type != "cpu":
        torch.accelerator.synchronize(device)


def gather_floats(value: float, device) -> list[float]:
    """value from every rank, in rank order, the same list on every rank."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor([value], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.item() for t in every]


def model_inputs(batch: dict, device) -> dict:
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}


# Calibration and rebalancing time at least this long: a machine's sustained speed, not a
# burst. A CPU quota (a container's --cpus, a lab machine's LAB_CPUS) lets a short burst
# run at full speed and throttles only over its 100 ms periods; so does a GPU's clock.
SUSTAINED_S = 1.0
MAX_PASSES = 200


def sustained(run_once) -> float:
    """Mean seconds per call of run_once over at least SUSTAINED_S (one untimed warm-up)."""
    run_once()
    passes, began = 0, time.perf_counter()
    while passes < 2 or (time.perf_counter() - began < SUSTAINED_S and passes < MAX_PASSES):
        run_once()
        passes += 1
    return (time.perf_counter() - began) / passes


def calibrate(forward, model, batch: dict, device) -> float:
    """Seconds per sample of forward + backward on this rank, sustained (see SUSTAINED_S).
    forward(**inputs) returns logits; the gradients are dropped afterwards."""
    inputs, labels = model_inputs(batch, device), batch["labels"].to(device)

    def once():
        token_loss_sum(forward(**inputs), labels).backward()
        synchronize(device)

    seconds = sustained(once)
    model.zero_grad(set_to_none=True)
    return seconds / labels.shape[0]


PROBE_TOKENS = 1024
PROBE_MAX_WEIGHTS = 64 * 2**20  # elements of the probe's weight matrix


def probe_seconds(config, dtype, device) -> float:
    """Seconds per token of one MLP-sized matmul forward + backward on this rank.

    For ZeRO-3, whose forward gathers every layer's weights from all ranks, so that timing
    it measures the slowest rank and the network rather than this rank. The matmul is the
    bulk of a transformer's compute; only the ratio between ranks is used.
    """
    import torch

    hidden = next(
        (getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(config, k)),
        1024,
    )
    inner = next(
        (getattr(config, k) for k in ("intermediate_size", "n_inner", "ffn_dim")
         if getattr(config, k, None)),
        4 * hidden,
    )  # fmt: skip
    inner = max(1, min(inner, PROBE_MAX_WEIGHTS // hidden))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_TOKENS, hidden, generator=generator).to(device, dtype)
    w = (torch.randn(hidden, inner, generator=generator) / hidden**0.5).to(device, dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)

    def once():
        (x @ w).float().square().mean().backward()
        synchronize(device)

    return sustained(once) / PROBE_TOKENS


@dataclass
class Balancer:
    """The forward timings that may re-split the global micro-batch once, at rebalance_at
    (an optimizer step count; None: never)."""

    rebalance_at: int | None = None
    first: int = 0  # the first timed step
    seconds: float = 0.0
    samples: int = 0
    # Time forward and backward of the micro-steps before the accumulation boundary, where
    # ZeRO 0-1 and the bridge reduce nothing; else the forward alone. The forward alone
    # misreads a CPU-quota machine: measured in the lab at 0.3 cores, it read 0.53 of the
    # fastest machine's speed where forward and backward (and the machine alone) read 0.37.
    with_backward: bool = False

    def timing(self, step: int) -> bool:
        return self.rebalance_at is not None and step < self.rebalance_at

    def timed_what(self) -> str:
        return "forward and backward passes" if self.with_backward else "forward passes"

    def times(self, step: int, micro: int, ga: int) -> bool:
        """Whether this micro-step is timed, and its backward with it (with_backward)."""
        return self.timing(step) and (not self.with_backward or micro < ga - 1)

    def add(self, seconds: float, samples: int) -> None:
        self.seconds += seconds
        self.samples += samples


def initial_shares(args, world: int, stage: int, measure, device) -> tuple[list[int], str]:
    """(shares, the balance line) at start, the same on every rank.

    measure() gives this rank's seconds per sample (calibration or, for ZeRO-3, the
    probe); every rank runs it or none does, and the shares come from the all-gathered
    figures.
    """
    total = args.micro_batch * world
    if args.shares is not None:
        return args.shares, balance.describe(args.shares, None, "from --shares")
    nominal = balance.even_shares(args.micro_batch, world)
    if args.balance == "even" or world == 1:
        return nominal, balance.describe(nominal, None, "even split")
    import torch.distributed as dist

    dist.barrier()  # ranks that share a machine time themselves together, as they train
    seconds = gather_floats(measure(), device)
    speeds = balance.speeds_from_seconds(seconds)
    shares = balance.shares_from_speeds(speeds, total, args.max_micro)
    source = "from a matmul probe (ZeRO-3)" if stage == 3 else "from calibration"
    return shares, balance.describe(shares, speeds, source)


def make_balancer(args, world: int, stage: int, start: int, total: int, ga: int = 1) -> Balancer:
    """Time the first --rebalance-after steps when they may change the split: balance=speed,
    no --shares, ZeRO 0-2 (ZeRO-3's forward waits on every rank at each layer, so its
    timings cannot tell ranks apart) and steps left after the decision."""
    at = start + args.rebalance_after
    if (
        args.balance != "speed"
        or args.shares is not None
        or world == 1
        or stage == 3
        or args.rebalance_after == 0
        or at >= total
    ):
        return Balancer()
    return Balancer(rebalance_at=at, first=start, with_backward=stage <= 1 and ga > 1)


def rebalance(run: Run, done: int) -> None:
    """Re-split from the all-gathered forward timings; every rank decides alike."""
    b = run.balancer
    seconds = gather_floats(b.seconds / max(b.samples, 1), run.comm_device)
    timed = gather_floats(b.seconds, run.comm_device)
    if min(timed) < SUSTAINED_S:  # bursts, not sustained speed: keep the calibration's split
        say(
            balance.describe(
                run.stream.shares,
                None,
                f"kept: steps {b.first + 1}-{done} held "
                f"{min(timed):.2f} s of {b.timed_what()}, under {SUSTAINED_S:.0f} s",
            )
        )
        run.balancer = Balancer()
        return
    speeds = balance.speeds_from_seconds(seconds)
    proposed = balance.shares_from_speeds(speeds, run.stream.global_batch, run.args.max_micro)
    source = f"from the {b.timed_what()} of steps {b.first + 1}-{done}"
    if balance.worth_rebalancing(run.stream.shares, proposed, seconds):
        run.stream.set_shares(proposed)
        say(balance.describe(proposed, speeds, source))
    else:
        gain = round(balance.REBALANCE_GAIN * 100)
        say(balance.describe(run.stream.shares, speeds, f"{source}; kept: no split {gain}% faster"))
    run.balancer = Balancer()


# ---------------------------------------------------------------- metrics


@dataclass
class Window:
    """What happened since the last log line; reduced over ranks only when logging."""

    loss_sum: Any = 0.0  # summed token losses on this rank
    targets: int = 0  # the valid targets they are summed over
    tokens: int = 0
    samples: int = 0
    steps: int = 0
    seconds: float = 0.0

    def add_micro(self, loss_sum, targets: int, batch) -> None:
        self.loss_sum = self.loss_sum + loss_sum.detach().float()
        self.targets += targets
        self.tokens += int(batch["attention_mask"].sum())
        self.samples += int(batch["input_ids"].shape[0])

    def reduce(self, device) -> tuple[float, int, int]:
        """(token-mean loss, global tokens, global samples) over every rank."""
        import torch
        import torch.distributed as dist

        totals = torch.stack(
            [
                torch.as_tensor(self.loss_sum, dtype=torch.float64).to(device),
                torch.tensor(float(self.targets), dtype=torch.float64, device=device),
                torch.tensor(float(self.tokens), dtype=torch.float64, device=device),
                torch.tensor(float(self.samples), dtype=torch.float64, device=device),
            ]
        )
        dist.all_reduce(totals)
        loss_sum, targets, tokens, samples = totals.tolist()
        loss = loss_sum / targets if targets else float("nan")
        return loss, int(tokens), int(samples)


def metrics_record(
    step: int, lr: float, window: Window, reduced, remaining: int, shares: list[int]
) -> dict:
    loss, tokens, samples = reduced
    step_time = window.seconds / max(window.steps, 1)
    seconds = max(window.seconds, 1e-9)
    return {
        "step": step,
        "loss": loss,
        "lr": lr,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds,
        "step_time_s": step_time,
        "eta_s": step_time * remaining,
        "micro_batches": list(shares),  # samples per rank per micro-step, by global rank
    }


def log_line(rec: dict, total: int) -> str:
    return (
        f"step {rec['step']}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
        f"tok/s {rec['tokens_per_s']:.0f} samples/s {rec['samples_per_s']:.1f} "
        f"step_time {rec['step_time_s']:.2f}s eta {rec['eta_s']:.0f}s"
    )


# ---------------------------------------------------------------- checkpoints


def output_is_shared(out: Path, rank: int, device) -> bool:
    """Whether every rank sees rank 0's output dir, i.e. one filesystem for all nodes.

    deepfleet nodes normally each have their own disk; then DeepSpeed must write the
    per-node parts of a checkpoint on every node (use_node_local_storage).
    """
    import torch
    import torch.distributed as dist

    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = out / f".deepfleet-shared-{token[0]}"
    if rank == 0:
        marker.touch()
    dist.barrier()
    seen = torch.tensor([int(marker.exists())], device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    if rank == 0:
        marker.unlink()
    return bool(seen.item())


def save_checkpoint(engine, ckpt_dir: Path, step: int) -> None:
    # Every rank writes its own ZeRO shard; DeepSpeed writes ckpt_dir/latest on rank 0.
    tag = f"global_step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    if engine.use_node_local_storage() and engine.local_rank == 0:
        # ...so on node-local disks the other nodes need their own pointer.
        (ckpt_dir / "latest").write_text(tag)


def latest_tag(ckpt_dir: Path) -> str | None:
    """Rank 0's view of the newest checkpoint, shared so every rank makes one decision."""
    import torch.distributed as dist

    latest = ckpt_dir / "latest"
    tag = [latest.read_text().strip() if latest.is_file() else None]
    dist.broadcast_object_list(tag, src=0)
    return tag[0]


def resume(engine, ckpt_dir: Path) -> int:
    tag = latest_tag(ckpt_dir)
    if tag is None:
        say(f"no checkpoint in {ckpt_dir}; starting from step 0")
        return 0
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
    step = int(client_state["step"])
    say(f"resumed from step {step}")
    return step


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget metrics logged after the checkpoint: those steps are about to be redone."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def export_final(engine, tokenizer, final_dir: Path, rank: int) -> None:
    """HF-format model + tokenizer, written by global rank 0 only.

    Under ZeRO-3 each rank holds a slice of every weight, so all ranks take part in the
    gather and rank 0 receives the full state dict; under stages 0-2 rank 0's module
    already holds full, updated weights.
    """
    import torch.distributed as dist

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        model = engine.module
        model.config.use_cache = True
        model.save_pretrained(final_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(final_dir)
    dist.barrier()


# ---------------------------------------------------------------- training


@dataclass
class Run:
    engine: Any
    stream: Any
    args: argparse.Namespace
    ga: int
    total: int
    device: Any  # where the model computes
    out: Path
    world: int = 1
    comm_device: Any = None  # where collectives' tensors live (the device unless set)
    balancer: Balancer = field(default_factory=Balancer)

    def __post_init__(self):
        if self.comm_device is None:
            self.comm_device = self.device

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


def train_step(run: Run, step: int, window: Window) -> None:
    """One optimizer step: every rank the same ga micro-steps, each on its share.

    The whole step's batches are known up front (a pure function of the step), so one
    all-reduce of the valid-target count gives every rank the loss weight first.
    """
    engine = run.engine
    batches = [run.stream.batch(step * run.ga + micro) for micro in range(run.ga)]
    targets = [valid_targets(b["labels"]) for b in batches]
    step_targets = all_reduce_sum(sum(targets), run.comm_device)
    balancer = run.balancer
    for micro, (batch, count) in enumerate(zip(batches, targets, strict=True)):
        inputs, labels = model_inputs(batch, run.device), batch["labels"].to(run.device)
        # what is timed holds no collective (see Balancer): this rank's own speed
        timed = balancer.times(step, micro, run.ga)
        if timed:
            synchronize(run.device)
            began = time.perf_counter()
        loss_sum = token_loss_sum(engine(**inputs).logits, labels)
        if timed and not balancer.with_backward:
            synchronize(run.device)
            balancer.add(time.perf_counter() - began, labels.shape[0])
        engine.backward(weighted_loss(loss_sum, run.world, run.ga, step_targets))
        if timed and balancer.with_backward:
            synchronize(run.device)
            balancer.add(time.perf_counter() - began, labels.shape[0])
        # Called every micro-step; DeepSpeed only updates at the accumulation boundary.
        engine.step()
        window.add_micro(loss_sum, count, batch)


_tensorboard = {}


def tensorboard(out: Path):
    """A SummaryWriter under OUTPUT/tensorboard when the tensorboard package is installed."""
    if "writer" not in _tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: metrics.jsonl always has the same figures
            _tensorboard["writer"] = None
        else:
            _tensorboard["writer"] = SummaryWriter(str(out / "tensorboard"))
    return _tensorboard["writer"]


def log_window(run: Run, step: int, lr: float, window: Window, rank: int) -> float:
    reduced = window.reduce(run.comm_device)
    rec = metrics_record(step, lr, window, reduced, run.total - step, run.stream.shares)
    if rank == 0:
        print(log_line(rec, run.total), flush=True)
        with (run.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        writer = tensorboard(run.out)
        if writer is not None:
            for key in ("loss", "lr", "tokens_per_s", "samples_per_s", "step_time_s"):
                writer.add_scalar(f"train/{key}", rec[key], step)
            writer.flush()
    return rec["loss"]


def log_interval(asked: int, total: int) -> int:
    """Steps between progress lines. Counted in steps, not seconds: each line is a
    collective reduce, so every rank must agree on when it comes without talking."""
    if asked > 0:
        return asked
    return max(1, min(math.ceil(total / 6), 50))


def train_loop(run: Run, start: int, rank: int) -> float:
    window, last_loss, saved = Window(), float("nan"), start
    every = log_interval(run.args.log_every, run.total)
    for step in range(start, run.total):
        lr = run.engine.get_lr()[0]
        began = time.perf_counter()
        train_step(run, step, window)
        window.seconds += time.perf_counter() - began
        window.steps += 1
        done = step + 1
        if done % every == 0 or done == run.total:
            last_loss = log_window(run, done, lr, window, rank)
            window = Window()
        if done == run.balancer.rebalance_at:
            rebalance(run, done)
        if run.args.save_every and done % run.args.save_every == 0:
            save_checkpoint(run.engine, run.ckpt_dir, done)
            saved = done
    if saved != run.total:
        save_checkpoint(run.engine, run.ckpt_dir, run.total)
    return last_loss


def check_shares_arg(args, world: int) -> None:
    if args.max_micro is not None and len(args.max_micro) != world:
        raise SystemExit(f"--max-micro: {len(args.max_micro)} caps for {world} ranks")
    if args.shares is not None:
        try:
            balance.check_shares(args.shares, world, args.micro_batch * world)
        except ValueError as exc:
            raise SystemExit(f"--shares: {exc}") from None


def measure_speed(model, stream, stage: int, device) -> float:
    """This rank's seconds per sample before DeepSpeed takes the model (see initial_shares):
    the plain model's forward + backward on this rank's first nominal micro-batch, or for
    ZeRO-3 (weights already partitioned) the matmul probe."""
    if stage == 3:
        return probe_seconds(model.config, next(model.parameters()).dtype, device)
    model.to(device)
    return calibrate(lambda **inputs: model(**inputs).logits, model, stream.batch(0), device)


def run_to_end(run: Run, tokenizer, rank: int, stage: int) -> None:
    """Resume if asked, train the steps left, export, and leave the process group: the
    same for the DeepSpeed engine and the bridge's (`stage` picks what may rebalance)."""
    import torch.distributed as dist

    start = resume(run.engine, run.ckpt_dir) if run.args.resume else 0
    run.balancer = make_balancer(run.args, run.world, stage, start, run.total, run.ga)
    if rank == 0:
        drop_metrics_after(run.out / "metrics.jsonl", start)
    if start >= run.total:
        say(f"checkpoint is at step {start}, --steps is {run.total}: nothing left to train")
    else:
        say(f"final loss {train_loop(run, start, rank):.4f}")
    final_dir = run.out / "final"
    export_final(run.engine, tokenizer, final_dir, rank)
    say(f"exported {final_dir}")
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device_type = init_distributed(args.local_rank)

    import deepspeed
    from transformers import AutoTokenizer, set_seed

    from .data import BatchStream

    check_shares_arg(args, world)
    quiet_libraries(args.verbose)
    set_seed(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    shared = output_is_shared(out, rank, torch_device(device_type))

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset(args, tokenizer)
    ga = grad_accum_steps(args, world)
    stream = BatchStream(dataset, rank, world, args.micro_batch, args.seed)
    steps = total_steps(args, stream.per_epoch, ga)
    precision = pick_precision(args.precision, device_type)
    ds_config = build_ds_config(args, world, ga, precision, steps, device_type, shared)
    stage = ds_config["zero_optimization"].get("stage", 0)
    model, _keep_alive = load_model(args, ds_config, precision)
    device = torch_device(device_type)
    shares, balance_line = initial_shares(
        args, world, stage, lambda: measure_speed(model, stream, stage, device), device
    )
    stream.set_shares(shares)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config
    )
    say(
        f"training {args.model}: {len(dataset)} blocks x {args.seq_len} tokens, world {world}, "
        f"micro-batch {args.micro_batch}, grad-accum {ga}, global batch "
        f"{ds_config['train_batch_size']}, {steps} steps, zero stage {stage}, {precision}, "
        f"{'shared' if shared else 'node-local'} checkpoint storage"
    )
    say(balance_line)

    run = Run(engine, stream, args, ga, steps, engine.device, out, world)
    run_to_end(run, tokenizer, rank, stage)


if __name__ == "__main__":
    main()
    exit_after_success()
