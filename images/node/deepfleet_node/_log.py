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


def exit_after_success() -> None:
    """End a finished workload process without interpreter teardown.

    The work is done and written; what is left is tearing down torch's and DeepSpeed's
    native threads, and at that point a rank sometimes aborts with "terminate called
    without an active exception" (a std::thread destroyed while joinable), turning a
    finished job into a failed one. Flush what was printed, then leave at once.
    """
    import logging
    import sys

    from . import heartbeat, joblog

    heartbeat.finish()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    joblog.finish()
    os._exit(0)
