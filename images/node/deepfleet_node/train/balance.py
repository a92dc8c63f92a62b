"""Splitting each global micro-batch over unlike ranks: pure arithmetic, no torch.

Every rank runs the same number of micro-steps per optimizer step (DeepSpeed hangs
otherwise); what differs is how many of the global micro-batch's samples each rank takes
per micro-step, its share. A rank that computes twice as fast takes about twice as many,
so no rank idles at the gradient reduction waiting for the slowest one.

Speeds come in as per-sample seconds measured on every rank and all-gathered, so every
rank computes the same shares and takes the same rebalancing decision.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

# Re-split only when the predicted micro-step time falls by more than this fraction: a
# change of shape costs little, but flapping between near-equal splits buys nothing.
REBALANCE_GAIN = 0.05


def shares_from_speeds(
    speeds: Sequence[float], total: int, caps: Sequence[int] | None = None
) -> list[int]:
    """total samples over ranks in proportion to speed, rounded so that the slowest rank's
    micro-step is as short as it can be: every rank at least one and at most its cap.

    Each sample in turn goes to the rank that would finish it first (the rank minimising
    (share + 1) / speed), which for identical samples on ranks of fixed speeds is the
    split with the least predicted micro-step time. Rounding the exact quotas instead
    (largest remainder) can hand the slowest rank the spare sample and so pace the whole
    job: 12/7/5 instead of 13/7/4 at speeds 1.00/0.57/0.37, 4 % slower.

    caps: the largest micro-batch each rank's memory holds (the operator's memory fit); a
    rank at its cap takes no more. Ties go to the lower rank, so the result is a pure
    function of its arguments. The operator's plan shows the same split
    (orchestrator/deepfleet/trainplan.py `split`, kept equal by tests/node/test_balance.py).
    """
    n = len(speeds)
    if n == 0:
        raise ValueError("no ranks to split a micro-batch over")
    if total < n:
        raise ValueError(f"{total} samples cannot give each of {n} ranks one")
    for speed in speeds:
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speeds must be positive and finite, got {list(speeds)}")
    caps = list(caps) if caps is not None else [total] * n
    if len(caps) != n or any(c < 1 for c in caps):
        raise ValueError(f"caps {list(caps)} for {n} ranks: one positive cap per rank")
    if sum(caps) < total:
        raise ValueError(f"the ranks' caps {format_shares(caps)} hold fewer than {total}")
    shares = [1] * n
    # (finish time of one more sample, rank): the heap's order breaks ties by rank
    heap = [((1 + 1) / speeds[i], i) for i in range(n) if caps[i] > 1]
    heapq.heapify(heap)
    for _ in range(total - n):
        _, i = heapq.heappop(heap)
        shares[i] += 1
        if shares[i] < caps[i]:
            heapq.heappush(heap, ((shares[i] + 1) / speeds[i], i))
    return shares


def even_shares(micro_batch: int, world: int) -> list[int]:
    return [micro_batch] * world


def speeds_from_seconds(per_sample_seconds: Sequence[float]) -> list[float]:
    """Samples per second from seconds per sample (a timer's zero counts as very fast)."""
    return [1.0 / max(s, 1e-9) for s in per_sample_seconds]


def relative(speeds: Sequence[float]) -> list[float]:
    """Speeds over the fastest one: the fastest rank reads 1.00."""
    top = max(speeds)
    return [s / top for s in speeds]


def predicted_time(shares: Sequence[int], per_sample_seconds: Sequence[float]) -> float:
    """One micro-step's compute time: every rank waits for the slowest at the reduction."""
    return max(n * s for n, s in zip(shares, per_sample_seconds, strict=True))


def worth_rebalancing(
    current: Sequence[int],
    proposed: Sequence[int],
    per_sample_seconds: Sequence[float],
    gain: float = REBALANCE_GAIN,
) -> bool:
    """Whether proposed beats current by more than gain of the predicted step time."""
    if list(proposed) == list(current):
        return False
    now = predicted_time(current, per_sample_seconds)
    after = predicted_time(proposed, per_sample_seconds)
    return after < now * (1 - gain)


def parse_shares(text: str) -> list[int]:
    """ "6,3,3" -> [6, 3, 3]; every share a positive integer."""
    try:
        shares = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--shares wants comma-separated integers, got {text!r}") from None
    if not shares or any(n < 1 for n in shares):
        raise ValueError(f"--shares wants every rank's micro-batch >= 1, got {text!r}")
    return shares


def check_shares(shares: Sequence[int], world: int, total: int) -> None:
    """Raise ValueError unless shares is one positive count per rank summing to total."""
    if len(shares) != world:
        raise ValueError(f"{len(shares)} shares {format_shares(shares)} for {world} ranks")
    if any(n < 1 for n in shares):
        raise ValueError(f"every rank needs a micro-batch of at least 1, got {list(shares)}")
    if sum(shares) != total:
        raise ValueError(
            f"shares {format_shares(shares)} sum to {sum(shares)}, not the global "
            f"micro-batch {total} (micro-batch x world size)"
        )


def format_shares(shares: Sequence[int]) -> str:
    return "/".join(str(n) for n in shares)


def describe(shares: Sequence[int], speeds: Sequence[float] | None, source: str) -> str:
    """The rank-0 balance line, e.g.
    balance: micro-batch per rank 6/3/3 (relative speed 1.00/0.52/0.31, from calibration)"""
    detail = source
    if speeds is not None:
        rel = "/".join(f"{s:.2f}" for s in relative(speeds))
        detail = f"relative speed {rel}, {source}"
    return f"balance: micro-batch per rank {format_shares(shares)} ({detail})"
