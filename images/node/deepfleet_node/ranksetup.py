"""What every rank does before its work: the environment a launcher-less run lacks, its
job log and heartbeat, the interface towards the master, the process group, and quiet
libraries. train, infer and the bridge start their ranks here rather than from each other.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings

from . import heartbeat, joblog
from .netif import pin_socket_interfaces

PG_TIMEOUT_ENV = "DEEPFLEET_PG_TIMEOUT"  # set by the operator (jobrun.py)
DEFAULT_PG_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_dist_env() -> None:
    """Give a launcher-less run the env a one-rank process group needs, and bind the
    collectives to the interface that reaches the master (see netif). The rank's output
    goes to its machine's job log from here on (see joblog)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        for key, value in defaults.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    joblog.start()
    pin_socket_interfaces()
    heartbeat.start()


def process_group_timeout():
    """How long a collective may wait for a peer (DEEPFLEET_PG_TIMEOUT, seconds).

    torch waits 30 minutes by default; a peer that died or vanished should end the job
    long before, and the operator's watchdog usually ends it sooner still.
    """
    from datetime import timedelta

    return timedelta(seconds=float(os.environ.get(PG_TIMEOUT_ENV, DEFAULT_PG_TIMEOUT_S)))


def keep_shm_allreduce_off() -> None:
    """Keep DeepSpeed's CPU shm comm op unloaded; all-reduce then goes through gloo.

    Loaded, the op also creates a 66 MiB /dev/shm segment per rank that DeepSpeed never
    removes, even in runs that never use it.
    """
    import deepspeed.ops

    # init_distributed loads the op only if this says it is compatible; DeepSpeed caches
    # the dict on first use and documents that edits to it persist.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(
    local_rank: int | None, *, backend: str | None = None, shm_allreduce: bool = False
) -> tuple[int, int, str]:
    """(rank, world, device type) with this rank's process group up.

    backend: None for the accelerator's own (nccl, or gloo on CPU). shm_allreduce: leave
    DeepSpeed's CPU shared-memory all-reduce loadable (AutoTP inference on one host only).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ensure_dist_env()
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        # Before any allocation, so zero.Init and NCCL land on this rank's GPU.
        acc.set_device(int(os.environ["LOCAL_RANK"]))
    elif not shm_allreduce:
        # Only AutoTP inference uses DeepSpeed's CPU shm all-reduce, and loading it leaves
        # a 66 MiB /dev/shm segment per rank on the host behind.
        keep_shm_allreduce_off()
    deepspeed.init_distributed(
        dist_backend=backend or acc.communication_backend_name(), timeout=process_group_timeout()
    )
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size(), acc.device_name()


def quiet_libraries(verbose: bool) -> None:
    import transformers
    from deepspeed.utils import logger as ds_logger

    transformers.utils.logging.disable_progress_bar()
    # Under the operator the rank's whole output is its job log and the operator's
    # terminal leaves the chatter out (see joblog), so nothing is dropped at the source.
    if not verbose and not joblog.active():
        ds_logger.setLevel(logging.WARNING)
        # DeepSpeed still calls c10d functions torch has renamed; one warning per call site
        # per rank buries the progress lines.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
        )
