"""infer's process group and what its ranks share: the backend, the prompt queue,
gathering the rows, DeepSpeed's CPU shared-memory all-reduce and its segment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import ranksetup

BACKEND_ENV = "DEEPFLEET_BACKEND"  # set by the operator's plan (plan.BACKENDS)
QUEUE_KEY = "deepfleet/next-prompt"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(mode: str, local_rank: int | None) -> tuple[int, int]:
    """(rank, world). Replicas need no process group on one rank; tp and zero always do."""
    if mode == "replicas" and world_size() == 1:
        return 0, 1
    rank, world, _ = ranksetup.init_distributed(
        local_rank, backend=planned_backend(), shm_allreduce=uses_shm_allreduce(mode)
    )
    return rank, world


def planned_backend() -> str | None:
    """gloo when the operator planned a world of several accelerators (DEEPFLEET_BACKEND=gloo
    beside a GPU): NCCL cannot reach a CPU rank, gloo reaches every rank through host
    memory. None: the accelerator's own backend."""
    return "gloo" if os.environ.get(BACKEND_ENV) == "gloo" else None


def uses_shm_allreduce(mode: str) -> bool:
    """Whether DeepSpeed's CPU shared-memory all-reduce can and should serve this run.

    Only AutoTP's all-reduce goes through it, and the op only sets up its shared buffers
    when LOCAL_SIZE (set by the launcher) equals WORLD_SIZE, i.e. every rank is on one
    host. Otherwise (ranks on several nodes, or started without the launcher) it reduces
    through buffers it never set up and segfaults (DeepSpeed 0.19.8,
    csrc/cpu/comm/shm_interface.cpp).
    """
    single_host = os.environ.get("LOCAL_SIZE") == os.environ.get("WORLD_SIZE", "1")
    return mode == "tp" and single_host and world_size() > 1


def remove_shm_segment(rank: int) -> None:
    """Unlink this rank's DeepSpeed all-reduce segment, once no rank will touch it again.

    DeepSpeed names it after uid, MASTER_ADDR, MASTER_PORT and rank and never unlinks
    it, and node containers share the host's /dev/shm (ipc: host), so every run on a new
    port would leave 66 MiB per rank of RAM-backed tmpfs behind. The mappings stay valid
    until exit; if a DeepSpeed version names it differently this does nothing.
    """
    name = "_".join(
        [
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(rank),
        ]
    )
    Path("/dev/shm", name).unlink(missing_ok=True)


def gather_rows(rows: list[dict], rank: int, world: int) -> list[dict] | None:
    """Every rank's rows on rank 0, in prompt order; None elsewhere."""
    if world == 1:
        return sorted(rows, key=lambda r: r["index"])
    import torch.distributed as dist

    parts: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(rows, parts, dst=0)
    if rank != 0:
        return None
    return sorted((row for part in parts for row in part), key=lambda r: r["index"])


def check_ranks_agree(rows: list[dict], rank: int, world: int) -> list[dict] | None:
    """tp: every rank generated every prompt; rank 0 gets the rows once all ranks match.

    A mismatch means the ranks fed different tokens into the same all-reduces, so the
    text is not what the model would have produced: fail, on every rank, rather than
    write it.
    """
    if world == 1:
        return rows
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, rows)
    bad = sorted(
        {
            mine["index"]
            for part in parts[1:]
            for mine, theirs in zip(parts[0], part, strict=True)
            if mine != theirs
        }
    )
    if bad:
        raise RuntimeError(f"tensor-parallel ranks generated different text for prompts {bad}")
    return rows if rank == 0 else None


def next_prompts(count: int, world: int):
    """Prompt indices for this replica, taken one at a time from a counter every rank
    shares (the process group's own store): a rank twice as fast takes twice as many, so
    unlike machines finish together."""
    if world == 1:
        yield from range(count)
        return
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    while (index := store.add(QUEUE_KEY, 1) - 1) < count:
        yield index
