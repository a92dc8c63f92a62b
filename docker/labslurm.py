"""The lab's Slurm cluster: Debian's slurm-wlm and munge on the lab's own machines.

    python docker/lab.py up --nodes 3 --slurm 2     # slurmctld on lab1, slurmd on lab1, lab2

What a site's cluster has, in small: one controller, a slurmd on every compute node, munge
authenticating them with one shared key, and a shared filesystem (the lab's /shared, the
same host folder in every machine, see lab.py). A job submitted with `sbatch` on the
controller runs on the compute nodes' own Docker engines.

Only the lab's machines run it; nothing else on this host is configured.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from deepfleet.machines.transfer import tar_files

CLUSTER = "deepfleet-lab"
PARTITION = "lab"
CONF = "/etc/slurm/slurm.conf"
MUNGE_KEY = "/etc/munge/munge.key"


class SlurmError(Exception):
    pass


@dataclass(frozen=True)
class SlurmNode:
    name: str  # the machine's hostname: slurmd finds its NodeName by it
    address: str
    container: object  # the lab machine's docker-py container


def _run(container, script: str, what: str) -> str:
    code, out = container.exec_run(["sh", "-c", script])
    text = out.decode(errors="replace")
    if code != 0:
        raise SlurmError(f"{container.name}: {what}: {' '.join(text.split())[-300:]}")
    return text


def _put(container, directory: str, name: str, data: bytes, mode: int) -> None:
    if not container.put_archive(directory, tar_files({name: (data, mode)})):
        raise SlurmError(f"{container.name}: cannot write {directory}/{name}")


def hardware_line(node: SlurmNode) -> str:
    """The node's own NodeName line as slurmd measures it (`slurmd -C`), so the
    controller never drains it for having fewer CPUs or less memory than configured."""
    out = _run(node.container, "slurmd -C", "slurmd -C")
    line = next((x for x in out.splitlines() if x.startswith("NodeName=")), None)
    if line is None:
        raise SlurmError(f"{node.container.name}: slurmd -C printed no NodeName line")
    fields = [f for f in line.split() if not f.startswith(("NodeName=", "UpTime="))]
    return f"NodeName={node.name} NodeAddr={node.address} " + " ".join(fields)


def slurm_conf(controller: SlurmNode, lines: list[str]) -> str:
    names = ",".join(line.split()[0].split("=", 1)[1] for line in lines)
    return "\n".join(
        [
            f"ClusterName={CLUSTER}",
            f"SlurmctldHost={controller.name}({controller.address})",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "StateSaveLocation=/var/spool/slurmctld",
            "SlurmdSpoolDir=/var/spool/slurmd",
            # the lab machines share the host's cgroup tree: no cgroup plugins here
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SelectType=select/linear",
            "SlurmctldLogFile=/var/log/slurmctld.log",
            "SlurmdLogFile=/var/log/slurmd.log",
            *lines,
            f"PartitionName={PARTITION} Nodes={names} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def start(nodes: list[SlurmNode], timeout: float = 90.0) -> SlurmNode:
    """munge on every node, slurmctld on the first, slurmd on each; returns the controller
    once every node is idle."""
    if not nodes:
        raise SlurmError("a Slurm cluster needs at least one node")
    controller = nodes[0]
    key = os.urandom(1024)
    conf = slurm_conf(controller, [hardware_line(n) for n in nodes]).encode()
    for node in nodes:
        _put(node.container, "/etc/munge", "munge.key", key, 0o400)
        _put(node.container, "/etc/slurm", "slurm.conf", conf, 0o644)
        _run(
            node.container,
            "chown munge:munge /etc/munge/munge.key && mkdir -p /run/munge"
            " && chown munge:munge /run/munge && runuser -u munge -- /usr/sbin/munged",
            "starting munged",
        )
    _run(controller.container, "mkdir -p /var/spool/slurmctld && slurmctld", "starting slurmctld")
    for node in nodes:
        _run(node.container, "mkdir -p /var/spool/slurmd && slurmd", "starting slurmd")
    wait_idle(controller, [n.name for n in nodes], timeout)
    return controller


def wait_idle(controller: SlurmNode, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        code, out = controller.container.exec_run(["sinfo", "-h", "-N", "-o", "%N %T"])
        if code == 0:
            states = dict(line.split()[:2] for line in out.decode().splitlines() if line.strip())
            if all(states.get(n, "").rstrip("*") == "idle" for n in names):
                return
        time.sleep(1)
    shown = ", ".join(f"{n} {states.get(n, 'unknown')}" for n in names)
    raise SlurmError(f"the lab's Slurm nodes are not idle after {timeout:.0f}s: {shown}")


def sbatch_wait(controller: SlurmNode, script: str, timeout: float) -> tuple[int, str]:
    """Submit a batch script on the controller and wait for the job to end (`sbatch
    --wait`); (its exit status, what sbatch printed)."""
    code, out = controller.container.exec_run(
        ["timeout", str(int(timeout)), "sbatch", "--wait", script], workdir="/shared"
    )
    return code, out.decode(errors="replace")
