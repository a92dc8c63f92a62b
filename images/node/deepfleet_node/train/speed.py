"""Each rank's speed, for balance's split of the global micro-batch: calibration before
the engine starts (or for ZeRO-3 a matmul probe), and one re-split from the first steps'
timings (the Balancer). Every figure is all-gathered, so every rank decides alike."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .._log import say
from . import balance
from .loss import token_loss_sum
from .model import model_inputs

# Calibration and rebalancing time at least this long: a machine's sustained speed, not a
# burst. A CPU quota (a container's --cpus, a lab machine's LAB_CPUS) lets a short burst
# run at full speed and throttles only over its 100 ms periods; so does a GPU's clock.
SUSTAINED_S = 1.0
MAX_PASSES = 200

PROBE_TOKENS = 1024
PROBE_MAX_WEIGHTS = 64 * 2**20  # elements of the probe's weight matrix


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


def measure_speed(model, stream, stage: int, device) -> float:
    """This rank's seconds per sample before DeepSpeed takes the model (see initial_shares):
    the plain model's forward + backward on this rank's first nominal micro-batch, or for
    ZeRO-3 (weights already partitioned) the matmul probe."""
    if stage == 3:
        return probe_seconds(model.config, next(model.parameters()).dtype, device)
    model.to(device)
    return calibrate(lambda **inputs: model(**inputs).logits, model, stream.batch(0), device)


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


def rebalance(run, done: int) -> None:
    """Re-split from the all-gathered forward timings of run (a loop.Run); every rank
    decides alike."""
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
