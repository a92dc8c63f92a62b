"""The training loop and main: DeepSpeed causal-LM fine-tuning, run on every rank by the
DeepSpeed launcher.

    deepspeed --hostfile H --master_addr IP --master_port P \\
        --module deepfleet_node.train --model DIR --data FILE --output OUT ...

Also runs as a plain `python -m deepfleet_node.train ...`: with no RANK/WORLD_SIZE in the
environment it makes a one-rank process group by itself. The bridge (bridge.py) runs the
same loop (Run, run_to_end) with its own engine.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._log import say
from ..ranksetup import init_distributed, quiet_libraries
from .args import check_shares_arg, parse_args
from .checkpoints import export_final, output_is_shared, resume, save_checkpoint
from .config import build_ds_config, grad_accum_steps, pick_precision, total_steps
from .loss import all_reduce_sum, token_loss_sum, valid_targets, weighted_loss
from .metrics import StepTruth, Window, drop_metrics_after, log_interval, log_window
from .model import load_dataset, load_model, model_inputs, torch_device
from .speed import (
    Balancer,
    initial_shares,
    make_balancer,
    measure_speed,
    rebalance,
    synchronize,
)


@dataclass
class Run:
    """One run's engine (DeepSpeed's or the bridge's), data and bookkeeping."""

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


def train_loop(run: Run, start: int, rank: int) -> float:
    window, last_loss, saved = Window(), float("nan"), start
    every = log_interval(run.args.log_every, run.total)
    truth = StepTruth(getattr(run.args, "predicted_step_s", None))
    for step in range(start, run.total):
        lr = run.engine.get_lr()[0]
        began = time.perf_counter()
        train_step(run, step, window)
        took = time.perf_counter() - began
        window.seconds += took
        window.steps += 1
        truth.add(took)
        done = step + 1
        if done % every == 0 or done == run.total:
            last_loss = log_window(run, done, lr, window, rank, truth)
            window = Window()
        if done == run.balancer.rebalance_at:
            rebalance(run, done)
        if run.args.save_every and done % run.args.save_every == 0:
            save_checkpoint(run.engine, run.ckpt_dir, done)
            saved = done
    if saved != run.total:
        save_checkpoint(run.engine, run.ckpt_dir, run.total)
    return last_loss


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

    from ..data import BatchStream

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
