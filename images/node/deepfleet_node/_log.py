"""Rank-aware printing shared by the node workloads."""

from __future__ import annotations

import os


def global_rank() -> int:
    # Read the env rather than torch.distributed so this works before (and without)
    # a process group; the DeepSpeed launcher and our single-rank setup both set RANK.
    return int(os.environ.get("RANK", "0"))


def say(*parts: object) -> None:
    """Print on global rank 0 only, flushed so the orchestrator sees lines live."""
    if global_rank() == 0:
        print(*parts, flush=True)
