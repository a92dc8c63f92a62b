"""Plan: a pure function from inventory + node reports to the job layout.

No Docker, no network: `plan_cluster` decides which nodes and how many slots, the
master, the backend and the launcher environment; hostfile.py renders it and the
executor applies it. Everything here is testable from JSON reports alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from deepfleet.errors import PlanError
from deepfleet.inventory.nodes import Inventory
from deepfleet.layout import (  # noqa: F401  (plan's names for them, still imported from here)
    CLUSTER_KEY,
    HF_HOME,
    HOSTFILE,
    MASTER_PORT,
    RUN_DIR,
    SSH_DIR,
    SSH_PORT,
    TORCH_EXTENSIONS_DIR,
    WORKDIR,
)
from deepfleet.planning import flavors
from deepfleet.planning.compat import (
    drivable_gpus,
    effective_accelerator,
    gpu_problems,
    usable_gpus,
)
from deepfleet.planning.reports import NodeReport
from deepfleet_node.precision import job_precision, native_bf16

COMPARED_VERSIONS = ("python", "torch", "deepspeed", "transformers")
MIXED = "mixed"  # a world of several accelerators: gloo between them, each rank its device
# each flavor's own backend; a mixed world reduces over gloo in host memory
BACKENDS = {**{f.name: f.backend for f in flavors.FLAVORS.values()}, MIXED: "gloo"}


@dataclass(frozen=True)
class PlannedNode:
    name: str
    address: str  # what the other containers dial (host networking: the machine's address)
    slots: int
    accelerator: str
    gpus: int
    # GPU indices the ranks use when some of the machine's GPUs sit out (DeepSpeed's
    # --include); empty: the first `slots` devices
    devices: tuple[int, ...] = ()


def choose_precision(reports: Mapping[str, NodeReport], names: list[str]) -> str:
    """One precision for the whole job (every rank must agree or ZeRO's buffers do not
    match), by the node package's one rule (deepfleet_node.precision): the operator decides
    it here and passes it to every rank."""
    gpus = [g for n in names for g in drivable_gpus(reports[n])]
    return job_precision((g.compute_capability, g.gfx_target) for g in gpus)


def rank_precisions(reports: Mapping[str, NodeReport], nodes: list[PlannedNode]) -> str:
    """A mixed world (the bridge): each rank computes on its own device, bf16 where that
    GPU has it natively and fp32 elsewhere (the bridge has no fp16 loss scaling), as a
    comma list in rank order (the launcher numbers ranks node by node, slot by slot)."""
    per_rank = []
    for node in nodes:
        gpus = {g.index: g for g in drivable_gpus(reports[node.name])}
        used = list(node.devices) or sorted(gpus)[: node.slots]
        for slot in range(node.slots):
            gpu = gpus.get(used[slot]) if node.accelerator != "cpu" and slot < len(used) else None
            native = gpu is not None and native_bf16(gpu.compute_capability, gpu.gfx_target)
            per_rank.append("bf16" if native else "fp32")
    return ",".join(per_rank)


@dataclass(frozen=True)
class LeftOut:
    """A machine that sits this job out, why, and how to bring it in."""

    name: str
    reason: str
    override: str


@dataclass(frozen=True)
class ClusterPlan:
    nodes: tuple[PlannedNode, ...]
    master_addr: str
    master_port: int
    backend: str
    env: Mapping[str, str] = field(default_factory=dict)
    ssh_port: int = SSH_PORT
    precision: str = "fp32"
    left_out: tuple[LeftOut, ...] = ()

    @property
    def master(self) -> PlannedNode:
        return self.nodes[0]

    @property
    def world_size(self) -> int:
        return sum(n.slots for n in self.nodes)

    def name_of(self, address: str) -> str | None:
        for node in self.nodes:
            if node.address == address:
                return node.name
        return None


def _precision(precision: str) -> str:
    return f"precision per rank {precision}" if "," in precision else precision


def describe(plan: ClusterPlan, detail: bool = True) -> str:
    """The plan as the operator reads it: who runs, on what, and who sits out and why.
    detail=False: one line for the machines (a job's start needs no table); the machines
    left out keep their own line each, because each says what to do about it."""
    head = (
        f"plan: {plan.world_size} ranks on {len(plan.nodes)} machine(s), backend {plan.backend}, "
        f"{_precision(plan.precision)}, "
        f"master {plan.master.name} ({plan.master_addr}:{plan.master_port})"
    )
    if detail:
        lines = [head]
        for node in plan.nodes:
            lines.append(
                f"  {node.name:<12} {node.slots} rank(s) on {node.accelerator} ({_what(node)})"
            )
    else:
        where = ", ".join(f"{n.name} {n.slots} on {_what(n)}" for n in plan.nodes)
        lines = [f"{head}: {where}"]
    return "\n".join([*lines, *left_out_lines(plan)])


def left_out_lines(plan: ClusterPlan) -> list[str]:
    return [f"  {o.name:<12} left out: {o.reason}; to use it: {o.override}" for o in plan.left_out]


def _what(node: PlannedNode) -> str:
    return f"{node.gpus} GPU(s)" if node.accelerator != "cpu" else "CPU"


def plan_dict(plan: ClusterPlan) -> dict:
    return {
        "world_size": plan.world_size,
        "backend": plan.backend,
        "precision": plan.precision,
        "master": {"name": plan.master.name, "addr": plan.master_addr, "port": plan.master_port},
        "nodes": [
            {
                "name": n.name,
                "address": n.address,
                "slots": n.slots,
                "accelerator": n.accelerator,
                "gpus": n.gpus,
                "devices": list(n.devices),
            }
            for n in plan.nodes
        ],  # fmt: skip
        "left_out": [
            {"name": x.name, "reason": x.reason, "override": x.override} for x in plan.left_out
        ],  # fmt: skip
    }


def _comparable(key: str, value: str | None) -> str | None:
    if value is None:
        return None
    if key == "torch":  # 2.13.0+cpu and 2.13.0+cu128 are the same release
        return value.split("+")[0]
    if key == "python":  # patch releases differ between base images without harm
        return ".".join(value.split(".")[:2])
    return value


def check_versions(reports: Mapping[str, NodeReport]) -> None:
    """Refuse a cluster whose nodes would run different library versions."""
    problems = []
    for key in COMPARED_VERSIONS:
        seen: dict[str | None, list[str]] = {}
        for name, report in reports.items():
            seen.setdefault(_comparable(key, report.versions.get(key)), []).append(name)
        if len(seen) > 1:
            parts = [f"{v or 'missing'} on {', '.join(names)}" for v, names in seen.items()]
            problems.append(f"{key} {' vs '.join(parts)}")
    if problems:
        raise PlanError("node versions differ: " + "; ".join(problems))


def slots_for(report: NodeReport, cpu_slots: int) -> int:
    return len(drivable_gpus(report)) or cpu_slots


def check_refused(
    refused: list[tuple[str, str]], runnable: list[PlannedNode], asked: Mapping[str, int]
) -> None:
    """Machines whose GPUs cannot run the image sit the job out, unless nothing else can
    run it or the user gave them slots: then the job is refused, naming each and the fix."""
    forced = [(name, p) for name, p in refused if asked.get(name, 0) > 0]
    if not refused or (not forced and runnable):
        return
    problems = forced or refused
    if len(problems) == 1:
        raise PlanError(problems[0][1], problems[0][0])
    raise PlanError("; ".join(f"{name}: {p}" for name, p in problems))


# Dense bf16 TFLOPS of common GPUs, by a distinctive part of the name: what a GPU brings
# before its ranks are timed. Unknown GPUs count as DEFAULT_TFLOPS; only ratios matter.
GPU_TFLOPS = {
    "B200": 2250, "H200": 989, "H100": 989, "GH200": 989, "A100": 312, "A40": 150,
    "A10": 125, "L40S": 362, "L40": 181, "L4": 121, "V100": 125, "T4": 65,
    "RTX 5090": 210, "RTX 4090": 165, "RTX 4080": 97, "RTX 4070": 58, "RTX 3090": 71,
    "RTX 3080": 59, "RTX 3070": 40, "RTX 3060": 25,
    "MI355": 2500, "MI325": 1307, "MI300": 1307, "MI250": 362, "MI210": 181, "MI100": 92,
    "7900 XTX": 123, "7900 XT": 103, "W7900": 123,
}  # fmt: skip
DEFAULT_TFLOPS = 50
# One CPU core in the same unit (fp32 with AVX2/AVX-512, as torch reaches it on a GEMM).
CPU_CORE_TFLOPS = 0.05


def gpu_speed(gpu) -> float:
    name = (gpu.name or "").upper()
    for key in sorted(GPU_TFLOPS, key=len, reverse=True):  # "L40S" before "L40" before "L4"
        if key.upper() in name:
            return float(GPU_TFLOPS[key])
    return float(DEFAULT_TFLOPS)


def group_capacity(nodes: list[PlannedNode], reports: Mapping[str, NodeReport]) -> float:
    """What a backend group brings: per GPU its memory (GiB) times its speed (a GPU of
    unknown size counts 8 GiB, of unknown speed DEFAULT_TFLOPS). Memory decides whether a
    model fits at all, speed how fast it trains once it does."""
    total = 0.0
    for node in nodes:
        for gpu in drivable_gpus(reports[node.name])[: node.slots]:
            total += (gpu.memory_bytes or (8 << 30)) / (1 << 30) * gpu_speed(gpu)
    return total


def choose_group(
    nodes: list[PlannedNode],
    reports: Mapping[str, NodeReport],
    asked: set[str],
    backend: str | None = None,
) -> tuple[list[PlannedNode], list[LeftOut], str]:
    """One job runs one backend: the group asked for, or the one with the most capacity.

    CPU machines run only when no GPU group does; a machine the user gave slots to
    explicitly is never dropped silently (that mix is refused, naming it).
    """
    groups: dict[str, list[PlannedNode]] = {}
    for node in nodes:
        groups.setdefault(node.accelerator, []).append(node)
    if backend is not None:
        if backend not in groups:
            have = ", ".join(f"{n.name}={n.accelerator}" for n in nodes)
            raise PlanError(f"--backend {backend}: no machine of the job runs it ({have})")
        chosen = backend
    elif len(groups) == 1:
        chosen = next(iter(groups))
    else:
        gpu_groups = [g for g in groups if g != "cpu"]
        chosen = max(gpu_groups, key=lambda g: (group_capacity(groups[g], reports), g))
    forced = [n for n in nodes if n.accelerator != chosen and n.name in asked]
    if forced:
        kinds = ", ".join(f"{n.name}={n.accelerator}" for n in nodes)
        raise PlanError(
            f"nodes mix accelerators ({kinds}); one job needs one backend: give "
            f"{', '.join(n.name for n in forced)} 0 slots or choose --backend"
        )
    left = [
        LeftOut(
            n.name,
            f"{n.accelerator} while the job runs on {chosen} (one job needs one backend)",
            f"--backend {n.accelerator}",
        )
        for n in nodes
        if n.accelerator != chosen
    ]
    return groups[chosen], left, chosen


def rank_env(dist_backend: str) -> dict[str, str]:
    """What every rank of a job reads, wherever it is launched (LAN or Slurm)."""
    return {
        "PYTHONUNBUFFERED": "1",
        "DEEPFLEET_BACKEND": dist_backend,
        "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR,
        "HF_HOME": HF_HOME,
    }


def plan_cluster(
    inventory: Inventory,
    reports: Mapping[str, NodeReport],
    cpu_slots: int = 1,
    slots: Mapping[str, int] | None = None,
    master_port: int = MASTER_PORT,
    extra_env: Mapping[str, str] | None = None,
    backend: str | None = None,
    mixed: bool = False,
) -> ClusterPlan:
    """`mixed`: every backend group in one world whose collectives run over gloo in host
    memory, each rank on its own device (replica inference, --bridge training)."""
    missing = [n.name for n in inventory.nodes if n.name not in reports]
    if missing:
        raise PlanError(f"no detect report from {', '.join(missing)}")
    check_versions(reports)
    slots = dict(slots or {})
    unknown = set(slots) - {n.name for n in inventory.nodes}
    if unknown:
        raise PlanError(f"slots given for unknown nodes: {', '.join(sorted(unknown))}")
    nodes = []
    left_out_by_slots: list[LeftOut] = []
    refused: list[tuple[str, str]] = []
    for spec in inventory.nodes:
        report = reports[spec.name]
        problems = gpu_problems(report)
        drivable = drivable_gpus(report)
        if usable_gpus(report) and not drivable:  # no GPU here can run the image's torch
            refused.append((spec.name, next(iter(problems.values()))))
            continue
        count = slots.get(spec.name, slots_for(report, cpu_slots))
        if count < 0:
            raise PlanError(f"slots cannot be negative, got {count}", spec.name)
        if count == 0:  # left out of this job
            left_out_by_slots.append(LeftOut(spec.name, "given 0 slots", f"--slots {spec.name}=N"))
            continue
        for index, problem in problems.items():
            left_out_by_slots.append(
                LeftOut(f"{spec.name} GPU {index}", problem, "fix that, then `deepfleet up`")
            )
        # the ranks must skip the GPUs in between
        devices = tuple(g.index for g in drivable[:count]) if problems else ()
        accelerator = effective_accelerator(report)
        nodes.append(PlannedNode(spec.name, spec.host, count, accelerator, len(drivable), devices))
    check_refused(refused, nodes, slots)
    left_out_by_slots += [
        LeftOut(name, problem, "fix that, then `deepfleet up`") for name, problem in refused
    ]
    if not nodes:
        raise PlanError("every node has 0 slots: nothing would run")
    if mixed and backend is None:
        kinds = {n.accelerator for n in nodes}
        left_out, accelerator = [], next(iter(kinds)) if len(kinds) == 1 else MIXED
    else:
        nodes, left_out, accelerator = choose_group(nodes, reports, set(slots), backend)
    dist_backend = BACKENDS.get(accelerator)
    if dist_backend is None:
        raise PlanError(f"no distributed backend for accelerator {accelerator!r}")
    threads = {}
    cpu_nodes = [n for n in nodes if n.accelerator == "cpu"]
    if cpu_nodes:
        # one OpenMP pool per rank sized to its share of the node; torch's default (every
        # core per process) oversubscribes as soon as a node runs two ranks
        share = min(reports[n.name].cpu_count // n.slots for n in cpu_nodes)
        threads = {"OMP_NUM_THREADS": str(max(1, share))}
    env = {**threads, **rank_env(dist_backend), **(extra_env or {})}
    return ClusterPlan(
        nodes=tuple(nodes),
        master_addr=nodes[0].address,
        master_port=master_port,
        backend=dist_backend,
        env=env,
        precision=(
            rank_precisions(reports, nodes)
            if accelerator == MIXED
            else choose_precision(reports, [n.name for n in nodes])
        ),
        left_out=tuple(left_out_by_slots + left_out),
    )
