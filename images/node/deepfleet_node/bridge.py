"""Plain data-parallel fine-tuning across unlike devices, GPUs and CPUs in one job.

    python -m deepfleet_node.bridge --model DIR --data FILE --output OUT ...

The same arguments as deepfleet_node.train, the same data, balancing, log lines,
metrics.jsonl, checkpoints (with --resume) and HF export; but no DeepSpeed engine, whose
collectives need one backend (nccl or gloo) for every rank. Here every rank holds the
whole model in fp32 on its own device (cuda when there is one, else cpu; DEEPFLEET_BRIDGE_
DEVICE=cpu|cuda forces it), computes in bf16 autocast on a GPU that has it and fp32
elsewhere, and at each optimizer step the gradients go through one fp32 host tensor
all-reduced over gloo. The optimizer is torch's AdamW with the DeepSpeed config's
hyperparameters, gradient clipping and DeepSpeed's own lr scheduler class, so a run
steps like train.py's; the config's ZeRO settings do not apply.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

from . import ranksetup, train
from ._log import exit_after_success, say

DEVICE_ENV = "DEEPFLEET_BRIDGE_DEVICE"
STATE_FILE = "bridge_state.pt"


# ---------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = train.parse_args(argv)
    if args.precision == "fp16":
        # fp16 needs loss scaling agreed over ranks; bf16 needs none.
        raise SystemExit("the bridge computes in bf16 or fp32; --precision fp16 is train.py's")
    return args


def init_gloo(local_rank: int | None) -> tuple[int, int]:
    """A gloo process group for every rank, whatever DEEPFLEET_BACKEND says."""
    import torch.distributed as dist

    ranksetup.ensure_dist_env()
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)
    dist.init_process_group("gloo", timeout=ranksetup.process_group_timeout())
    return dist.get_rank(), dist.get_world_size()


def bridge_device():
    import torch

    forced = os.environ.get(DEVICE_ENV, "").strip().lower()
    if forced not in ("", "cpu", "cuda"):
        raise SystemExit(f"{DEVICE_ENV} must be cpu or cuda, not {forced!r}")
    kind = forced or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"{DEVICE_ENV}=cuda, but torch sees no CUDA device here")
    device = torch.device(
        "cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    )
    torch.cuda.set_device(device)
    return device


def compute_dtype(requested: str, device):
    """The autocast dtype, or None for plain fp32. auto: bf16 on a GPU that has it."""
    import torch

    if requested == "fp32":
        return None
    if requested == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_optimizer(cfg: dict, params):
    """torch AdamW (or Adam) as DeepSpeed builds it from the config with torch_adam."""
    import torch

    opt = cfg["optimizer"]
    kind = opt["type"].lower()
    kwargs = dict(opt.get("params", {}))
    kwargs.pop("torch_adam", None)
    adam_w_mode = kwargs.pop("adam_w_mode", True)
    if kind not in ("adam", "adamw"):
        raise SystemExit(f"the bridge trains with Adam or AdamW, not the config's {opt['type']}")
    cls = torch.optim.AdamW if kind == "adamw" or adam_w_mode else torch.optim.Adam
    return cls(params, **kwargs)


def build_scheduler(cfg: dict, optimizer):
    """DeepSpeed's own scheduler class for the config's scheduler (train.set_scheduler has
    fitted it to the run), stepped once per optimizer step as DeepSpeed does."""
    from deepspeed.runtime import lr_schedules

    sched = cfg.get("scheduler")
    if not sched:
        return None
    return getattr(lr_schedules, sched["type"])(optimizer, **sched.get("params", {}))


# ---------------------------------------------------------------- gradients


def flat_host(tensors):
    import torch

    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])


def unflatten_into(flat, tensors) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_gradients(params, world: int) -> None:
    """Every rank's gradients -> their mean over ranks, through one fp32 host tensor
    all-reduced over gloo (DeepSpeed's averaging, so train.weighted_loss applies as is).
    A parameter without a gradient on this rank counts as zeros."""
    import torch
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = flat_host([p.grad for p in params])
    dist.all_reduce(flat)
    flat /= world
    unflatten_into(flat, [p.grad for p in params])


def broadcast_parameters(params) -> None:
    """Start every rank from rank 0's weights, as DeepSpeed does."""
    import torch
    import torch.distributed as dist

    flat = flat_host(params)
    dist.broadcast(flat, src=0)
    with torch.no_grad():
        unflatten_into(flat, params)


# ---------------------------------------------------------------- the engine


class BridgeEngine:
    """The part of DeepSpeed's engine API that train.py's loop, checkpoints and export
    use, for plain data parallelism over gloo."""

    def __init__(self, model, optimizer, scheduler, *, ga, world, rank, device, dtype, clip,
                 node_local):  # fmt: skip
        self.module = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ga = ga
        self.world = world
        self.rank = rank
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        self.dtype = dtype
        self.clip = clip
        self.node_local = node_local
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.micro_steps = 0

    def __call__(self, **inputs):
        with autocast(self.device, self.dtype):
            return self.module(**inputs)

    def backward(self, loss) -> None:
        (loss / self.ga).backward()  # engine.backward's scaling

    def step(self) -> None:
        """Called every micro-step; updates at the accumulation boundary."""
        import torch

        self.micro_steps += 1
        if self.micro_steps % self.ga:
            return
        all_reduce_gradients(self.params, self.world)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def use_node_local_storage(self) -> bool:
        return self.node_local

    def zero_optimization_partition_weights(self) -> bool:
        return False

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict) -> None:
        """Every rank holds the same state: global rank 0 writes it, or on node-local
        disks every node's local rank 0 writes its own copy."""
        import torch
        import torch.distributed as dist

        writer = self.local_rank == 0 if self.node_local else self.rank == 0
        if writer:
            folder = Path(save_dir) / tag
            folder.mkdir(parents=True, exist_ok=True)
            state = {
                "module": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "client_state": client_state,
            }
            partial = folder / (STATE_FILE + ".partial")
            torch.save(state, partial)
            partial.replace(folder / STATE_FILE)
            if self.rank == 0:
                (Path(save_dir) / "latest").write_text(tag)
        dist.barrier()

    def load_checkpoint(self, load_dir: str, tag: str):
        """(path, client_state) like DeepSpeed's, or (None, None) when it is missing here."""
        import torch

        path = Path(load_dir) / tag / STATE_FILE
        if not path.is_file():
            return None, None
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        return str(path.parent), state["client_state"]


def precision_name(dtype) -> str:
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.").replace("bfloat", "bf")


def describe_ranks(device, dtype) -> str:
    """Every rank's device and precision, e.g. "cuda/bf16, cpu/fp32", in rank order."""
    import torch.distributed as dist

    mine = f"{device.type}/{precision_name(dtype)}"
    every: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return ", ".join(str(x) for x in every)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world = init_gloo(args.local_rank)

    import torch
    from transformers import AutoTokenizer, set_seed

    from .data import BatchStream

    train.check_shares_arg(args, world)
    ranksetup.quiet_libraries(args.verbose)
    set_seed(args.seed)
    device = bridge_device()
    host = torch.device("cpu")  # gloo's tensors
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    shared = train.output_is_shared(out, rank, host)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = train.load_dataset(args, tokenizer)
    ga = train.grad_accum_steps(args, world)
    stream = BatchStream(dataset, rank, world, args.micro_batch, args.seed)
    steps = train.total_steps(args, stream.per_epoch, ga)
    cfg = json.loads(train.resolve_config(args.deepspeed_config).read_text())
    train.set_optimizer(cfg, args, torch_adam=True)
    train.set_scheduler(cfg, args, steps)
    dtype = compute_dtype(args.precision, device)

    # fp32 master weights on every rank; autocast computes in dtype.
    model, _ = train.load_model(args, {"zero_optimization": {"stage": 0}}, "fp32")
    model.to(device)
    broadcast_parameters(list(model.parameters()))

    def forward(**inputs):
        with autocast(device, dtype):
            return model(**inputs).logits

    shares, balance_line = train.initial_shares(
        args,
        world,
        0,
        lambda: train.calibrate(forward, model, stream.batch(0), device),
        host,
    )
    stream.set_shares(shares)
    optimizer = build_optimizer(cfg, model.parameters())
    engine = BridgeEngine(
        model, optimizer, build_scheduler(cfg, optimizer), ga=ga, world=world, rank=rank,
        device=device, dtype=dtype, clip=float(cfg.get("gradient_clipping", 0.0)),
        node_local=not shared,
    )  # fmt: skip
    ranks = describe_ranks(device, dtype)
    say(
        f"bridge training {args.model}: {len(dataset)} blocks x {args.seq_len} tokens, "
        f"world {world}, micro-batch {args.micro_batch}, grad-accum {ga}, global batch "
        f"{args.micro_batch * ga * world}, {steps} steps, ranks {ranks}, gloo, "
        f"{'shared' if shared else 'node-local'} checkpoint storage"
    )
    say(balance_line)

    run = train.Run(engine, stream, args, ga, steps, device, out, world, comm_device=host)
    train.run_to_end(run, tokenizer, rank, 0)


if __name__ == "__main__":
    main()
    exit_after_success()
