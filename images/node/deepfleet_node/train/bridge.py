"""Plain data-parallel fine-tuning across unlike devices, GPUs and CPUs in one job.

    python -m deepfleet_node.train.bridge --model DIR --data FILE --output OUT ...

The same arguments as deepfleet_node.train, the same data, balancing, log lines,
metrics.jsonl, checkpoints (with --resume) and HF export; but no DeepSpeed engine, whose
collectives need one backend (nccl or gloo) for every rank. Here every rank holds the
whole model in fp32 on its own device (cuda when there is one, else cpu; DEEPFLEET_BRIDGE_
DEVICE=cpu|cuda forces it), computes in bf16 autocast or plain fp32, and at each optimizer
step the gradients go through one fp32 host tensor all-reduced over gloo. The optimizer is
torch's AdamW with the DeepSpeed config's hyperparameters, gradient clipping and
DeepSpeed's own lr scheduler class, so a run steps like train's; the config's ZeRO
settings do not apply.

--precision is one value for every rank or a comma list with one per rank, in rank order
(e.g. bf16,fp32,fp32: the operator's per-device decision); bf16 autocasts, fp32 does not,
auto is the node's own rule (deepfleet_node.precision) for this rank's device, bf16 where
it is native and fp32 elsewhere. fp16 is refused: it needs a loss scale agreed over ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from .. import ranksetup
from .._log import exit_after_success, say
from ..precision import PRECISIONS, local_precision, torch_dtype
from .args import check_shares_arg
from .args import parse_args as train_args
from .checkpoints import output_is_shared
from .config import grad_accum_steps, load_config, set_optimizer, set_scheduler, total_steps
from .loop import Run, run_to_end
from .model import load_dataset, load_model
from .speed import calibrate, initial_shares

DEVICE_ENV = "DEEPFLEET_BRIDGE_DEVICE"
STATE_FILE = "bridge_state.pt"


# ---------------------------------------------------------------- setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """train's arguments, --precision a list (see precision_list)."""
    args = train_args(
        argv,
        prog="deepfleet_node.train.bridge",
        description=__doc__.split("\n")[0],
        precision_type=precision_list,
    )
    if "fp16" in args.precision:
        # fp16 needs loss scaling agreed over ranks; bf16 needs none.
        raise SystemExit("the bridge computes in bf16 or fp32; --precision fp16 is train's")
    return args


def precision_list(text: str) -> list[str]:
    """ "bf16" or "bf16,fp32,fp32" -> one name per value, each auto/fp32/bf16/fp16."""
    names = [part.strip() for part in text.split(",")]
    bad = [n for n in names if n not in ("auto", *PRECISIONS)]
    if bad:
        raise argparse.ArgumentTypeError(
            f"expected auto, {', '.join(PRECISIONS)} or a comma list of them, got {text!r}"
        )
    return names


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


def rank_precision(requested: list[str], rank: int, world: int, device) -> str:
    """This rank's precision, bf16 or fp32, from --precision: one value for every rank or
    one per rank; auto: bf16 where this rank's device has it natively, else fp32."""
    if len(requested) == 1:
        name = requested[0]
    elif len(requested) == world:
        name = requested[rank]
    else:
        raise SystemExit(
            f"--precision: {len(requested)} values for {world} ranks; give one, or one per rank"
        )
    if name == "auto":
        name = "bf16" if local_precision(device) == "bf16" else "fp32"
    return name


def compute_dtype(precision: str):
    """The autocast dtype of a precision, or None for plain fp32."""
    return None if precision == "fp32" else torch_dtype(precision)


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
    """DeepSpeed's own scheduler class for the config's scheduler (config.set_scheduler has
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
    all-reduced over gloo (DeepSpeed's averaging, so loss.weighted_loss applies as is).
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
    """The part of DeepSpeed's engine API that train's loop, checkpoints and export
    use (train.loop.Run), for plain data parallelism over gloo."""

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


def describe_ranks(device, precision: str) -> str:
    """Every rank's device and precision, e.g. "cuda/bf16, cpu/fp32", in rank order."""
    import torch.distributed as dist

    mine = f"{device.type}/{precision}"
    every: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return ", ".join(str(x) for x in every)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world = init_gloo(args.local_rank)

    import torch
    from transformers import AutoTokenizer, set_seed

    from ..data import BatchStream

    check_shares_arg(args, world)
    ranksetup.quiet_libraries(args.verbose)
    set_seed(args.seed)
    device = bridge_device()
    host = torch.device("cpu")  # gloo's tensors
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    shared = output_is_shared(out, rank, host)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset(args, tokenizer)
    ga = grad_accum_steps(args, world)
    stream = BatchStream(dataset, rank, world, args.micro_batch, args.seed)
    steps = total_steps(args, stream.per_epoch, ga)
    cfg = load_config(args.deepspeed_config)
    set_optimizer(cfg, args, torch_adam=True)
    set_scheduler(cfg, args, steps)
    precision = rank_precision(args.precision, rank, world, device)
    dtype = compute_dtype(precision)

    # fp32 master weights on every rank; autocast computes in dtype.
    model, _ = load_model(args, None, "fp32")
    model.to(device)
    broadcast_parameters(list(model.parameters()))

    def forward(**inputs):
        with autocast(device, dtype):
            return model(**inputs).logits

    shares, balance_line = initial_shares(
        args,
        world,
        0,
        lambda: calibrate(forward, model, stream.batch(0), device),
        host,
    )
    stream.set_shares(shares)
    optimizer = build_optimizer(cfg, model.parameters())
    engine = BridgeEngine(
        model, optimizer, build_scheduler(cfg, optimizer), ga=ga, world=world, rank=rank,
        device=device, dtype=dtype, clip=float(cfg.get("gradient_clipping", 0.0)),
        node_local=not shared,
    )  # fmt: skip
    ranks = describe_ranks(device, precision)
    say(
        f"bridge training {args.model}: {len(dataset)} blocks x {args.seq_len} tokens, "
        f"world {world}, micro-batch {args.micro_batch}, grad-accum {ga}, global batch "
        f"{args.micro_batch * ga * world}, {steps} steps, ranks {ranks}, gloo, "
        f"{'shared' if shared else 'node-local'} checkpoint storage"
    )
    say(balance_line)

    run = Run(engine, stream, args, ga, steps, device, out, world, comm_device=host)
    run_to_end(run, tokenizer, rank, 0)


if __name__ == "__main__":
    main()
    exit_after_success()
