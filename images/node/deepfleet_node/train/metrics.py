"""Progress: the window of steps since the last log line, reduced over the ranks when a
line is due; rank 0's progress line, metrics.jsonl record and tensorboard scalars; the
truth check of the operator's predicted step time (--predicted-step-s)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


@dataclass
class StepTruth:
    """Measured against predicted seconds per step, said once. The first step this process
    trains is the warm-up (allocations, the first gathers, lazy inits) and is left out of
    the measured figure; a run whose only step is that one is measured on it."""

    predicted: float | None  # the operator's cost model; None: nothing to check
    seconds: float = 0.0  # the steps after the warm-up
    steps: int = 0
    warmup_s: float | None = None
    said: bool = False

    def add(self, seconds: float) -> None:
        if self.warmup_s is None:
            self.warmup_s = seconds
        else:
            self.seconds += seconds
            self.steps += 1

    def line(self, last: bool = False) -> str | None:
        """The line, the first time a measured figure exists (or at the run's last line)."""
        if self.predicted is None or self.said:
            return None
        if self.steps:
            measured = self.seconds / self.steps
        elif last and self.warmup_s is not None:
            measured = self.warmup_s
        else:
            return None
        self.said = True
        return truth_line(measured, self.predicted)


def truth_line(measured: float, predicted: float) -> str:
    return (
        f"step time: measured {secs(measured)}, predicted {secs(predicted)} "
        f"({measured / predicted:.2f}x)"
    )


def secs(s: float) -> str:
    """Seconds as rank 0 and the operator's plan (planning/cost.py) print them."""
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.1f} s"
    if s >= 0.1:
        return f"{s:.2f} s"
    return f"{s * 1000:.3g} ms"


def metrics_record(
    step: int,
    lr: float,
    window: Window,
    reduced,
    remaining: int,
    shares: list[int],
    predicted: float | None = None,
) -> dict:
    loss, tokens, samples = reduced
    step_time = window.seconds / max(window.steps, 1)
    seconds = max(window.seconds, 1e-9)
    rec = {
        "step": step,
        "loss": loss,
        "lr": lr,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds,
        "step_time_s": step_time,
        "eta_s": step_time * remaining,
        "micro_batches": list(shares),  # samples per rank per micro-step, by global rank
    }
    if predicted is not None:
        rec["predicted_step_time_s"] = predicted
    return rec


def log_line(rec: dict, total: int) -> str:
    return (
        f"step {rec['step']}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
        f"tok/s {rec['tokens_per_s']:.0f} samples/s {rec['samples_per_s']:.1f} "
        f"step_time {rec['step_time_s']:.2f}s eta {rec['eta_s']:.0f}s"
    )


def log_interval(asked: int, total: int) -> int:
    """Steps between progress lines. Counted in steps, not seconds: each line is a
    collective reduce, so every rank must agree on when it comes without talking."""
    if asked > 0:
        return asked
    return max(1, min(math.ceil(total / 6), 50))


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


def log_window(
    run, step: int, lr: float, window: Window, rank: int, truth: StepTruth | None = None
) -> float:
    """Reduce the window over the ranks; on rank 0 print the progress line and record it
    (run: a loop.Run), then, once, the measured against predicted step time. The window's
    loss."""
    reduced = window.reduce(run.comm_device)
    predicted = truth.predicted if truth is not None else None
    rec = metrics_record(step, lr, window, reduced, run.total - step, run.stream.shares, predicted)
    if rank == 0:
        print(log_line(rec, run.total), flush=True)
        said = truth.line(last=step == run.total) if truth is not None else None
        if said:
            print(said, flush=True)
        with (run.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        writer = tensorboard(run.out)
        if writer is not None:
            for key in ("loss", "lr", "tokens_per_s", "samples_per_s", "step_time_s"):
                writer.add_scalar(f"train/{key}", rec[key], step)
            writer.flush()
    return rec["loss"]


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget metrics logged after the checkpoint: those steps are about to be redone."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
