"""A training job's plan: the cluster plan, the memory verdict and the micro-batch per rank.

Pure, like plan.py: from the cluster plan, the node reports and the model's shape it
decides the ZeRO config (CONFIG=auto) and refuses a job that would not fit before anything
is copied or launched. The micro-batches shown per rank are an estimate from the reports
(CPU quota and cores); the ranks measure their real speed at start and rebalance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from deepfleet.planning import memory
from deepfleet.planning.compat import drivable_gpus
from deepfleet.planning.plan import CPU_CORE_TFLOPS, DEFAULT_TFLOPS, ClusterPlan, LeftOut, gpu_speed
from deepfleet.planning.reports import NodeReport
from deepfleet_node.train import balance

BALANCES = ("speed", "even")


@dataclass(frozen=True)
class TrainPlan:
    cluster: ClusterPlan
    config: str
    micro_batch: int  # nominal per rank: the global micro-batch is this x world size
    shares: tuple[int, ...]  # estimated samples per rank per micro-step, hostfile order
    speeds: tuple[float, ...]  # estimated relative speed per rank
    balance: str
    verdict: memory.Verdict | None = None  # None: model unknown or a custom config file
    # per rank, the largest micro-batch its memory holds; None: not known or not needed
    caps: tuple[int, ...] | None = None
    slots: dict[str, int] = field(default_factory=dict)  # machines the memory fit left out

    @property
    def rank_names(self) -> list[str]:
        return [n.name for n in self.cluster.nodes for _ in range(n.slots)]


def rank_speeds(cluster: ClusterPlan, reports: Mapping[str, NodeReport]) -> list[float]:
    """Relative speed per rank before anything is measured: a CPU rank gets its share of
    the machine's cores (the cgroup quota where one is set), a GPU rank its GPU's rated
    speed (plan.GPU_TFLOPS); the ranks time themselves at start."""
    speeds = []
    for node in cluster.nodes:
        report = reports[node.name]
        if node.accelerator == "cpu":
            cores = report.cpu_quota or report.cpu_count
            speeds += [cores * CPU_CORE_TFLOPS / node.slots] * node.slots
        else:
            gpus = drivable_gpus(report)
            if node.devices:
                gpus = [g for g in gpus if g.index in node.devices]
            speeds += [gpu_speed(g) for g in gpus[: node.slots]]
            speeds += [float(DEFAULT_TFLOPS)] * (node.slots - len(gpus[: node.slots]))
    top = max(speeds)
    return [s / top for s in speeds]


def split(speeds: list[float], total: int, caps: list[int] | None = None) -> list[int]:
    """The node's own rule (deepfleet_node.train.balance), so the plan shows what the ranks do."""
    return balance.shares_from_speeds(speeds, total, caps)


def memory_config(config: str) -> str | None:
    """The config the memory model can judge; None for a user's JSON file."""
    return config if config == "auto" or config in memory.CONFIGS else None


def plan_training(
    cluster: ClusterPlan,
    reports: Mapping[str, NodeReport],
    shape: memory.ModelShape | None,
    config: str,
    seq_len: int,
    micro_batch: int,
    balance: str = "speed",
    replan: Callable[[dict[str, int]], ClusterPlan] | None = None,
) -> TrainPlan:
    """Raises PlanError, naming the machine, when the model does not fit.

    With CONFIG=auto a job that fits part of the cluster is not refused: when no config
    fits every machine, the machines short of memory sit out (replan(slots) gives the
    cluster plan without them) and each is named with what it lacked."""
    if shape is not None and config == "auto" and replan is not None:
        ranks = [memory.Rank(n.name, n.slots, n.accelerator) for n in cluster.nodes]
        args = (ranks, reports, seq_len, micro_batch, cluster.precision)
        if not any(memory.machine_fits(shape, c, *args).fits for c in memory.AUTO_ORDER):
            found = memory.fit_without(shape, *args)
            if found is not None:
                verdict, short = found
                names = dict.fromkeys(d.machine for d in short)
                smaller = replan({name: 0 for name in names})
                left = tuple(
                    LeftOut(name, "; ".join(d.text() for d in short if d.machine == name)
                            + " under every ZeRO config", "more memory or a smaller --micro-batch")
                    for name in names
                )  # fmt: skip
                kept = tuple(x for x in smaller.left_out if x.name not in names)  # not "0 slots"
                smaller = replace(smaller, left_out=kept + left)
                tp = plan_training(
                    smaller, reports, shape, verdict.config, seq_len, micro_batch, balance
                )
                return replace(tp, slots={name: 0 for name in names})
    verdict = None
    chosen = config
    total = micro_batch * cluster.world_size
    caps = None
    if shape is not None and memory_config(config):
        ranks = [memory.Rank(n.name, n.slots, n.accelerator) for n in cluster.nodes]
        verdict = memory.check(
            shape, config, ranks, reports, seq_len, micro_batch, cluster.precision
        )
        chosen = verdict.config
        if balance == "speed":
            per_machine = memory.machine_caps(
                shape, chosen, ranks, reports, seq_len, cluster.precision, total
            )
            caps = tuple(per_machine[n.name] for n in cluster.nodes for _ in range(n.slots))
            if min(caps) >= total:  # every machine holds the whole micro-batch: no cap
                caps = None
    elif config == "auto":
        chosen = memory.AUTO_ORDER[0]
    speeds = rank_speeds(cluster, reports) if balance == "speed" else [1.0] * cluster.world_size
    shares = split(speeds, total, list(caps) if caps else None)
    return TrainPlan(
        cluster, chosen, micro_batch, tuple(shares), tuple(speeds), balance, verdict, caps
    )


def describe(tp: TrainPlan) -> str:
    names = tp.rank_names
    per_rank = ", ".join(f"{name} {share}" for name, share in zip(names, tp.shares, strict=True))
    how = "estimated; measured at start and rebalanced" if tp.balance == "speed" else "even"
    lines = [
        f"train: {tp.config}, global micro-batch {sum(tp.shares)} "
        f"(micro-batch per rank: {per_rank}; {how})"
    ]
    if tp.verdict is not None:
        lines.append(memory.describe(tp.verdict))
    for out in tp.cluster.left_out:
        if out.name in tp.slots:  # the memory fit's own: the job's plan line lacks the why
            lines.append(f"  {out.name:<12} left out: {out.reason}; to use it: {out.override}")
    if tp.caps is not None:
        caps = ", ".join(f"{name} {cap}" for name, cap in zip(names, tp.caps, strict=True))
        lines.append(f"memory: the most a rank's memory holds per micro-step: {caps}")
    elif memory_config(tp.config) is None:
        lines.append(f"memory: not checked ({tp.config} is a custom config file)")
    return "\n".join(lines)


def as_dict(tp: TrainPlan) -> dict:
    verdict = None
    if tp.verdict is not None:
        verdict = {
            "fits": tp.verdict.fits,
            "config": tp.verdict.config,
            "micro_batch": tp.verdict.micro_batch,
            "devices": [
                {
                    "machine": d.machine,
                    "where": d.where,
                    "need_bytes": d.need,
                    "room_bytes": d.room,
                    "fits": d.fits,
                }
                for d in tp.verdict.devices
            ],  # fmt: skip
        }
    return {
        "config": tp.config,
        "balance": tp.balance,
        "micro_batch": tp.micro_batch,
        "ranks": [
            {"machine": name, "micro_batch": share, "speed": round(speed, 3)}
            for name, share, speed in zip(tp.rank_names, tp.shares, tp.speeds, strict=True)
        ],
        "memory": verdict,
        "max_micro_batch": list(tp.caps) if tp.caps else None,
    }
