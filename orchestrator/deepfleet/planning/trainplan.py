"""A training job's plan: the cluster plan, the memory verdict and the micro-batch per rank.

Pure, like plan.py: from the cluster plan, the node reports and the model's shape it
decides the ZeRO config (CONFIG=auto) and refuses a job that would not fit before anything
is copied or launched. The micro-batches shown per rank are an estimate from the reports
(CPU quota and cores); the ranks measure their real speed at start and rebalance.

With the model's shape it also predicts the seconds per step of the chosen config and of
every other candidate (planning/cost.py: compute, the network over the measured or
assumed links, the bottleneck): CONFIG=auto takes the fastest that fits memory, and the
plan names another config that fits and is predicted at least FASTER_FACTOR times faster.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from deepfleet.planning import cost, memory
from deepfleet.planning.compat import drivable_gpus
from deepfleet.planning.plan import CPU_CORE_TFLOPS, DEFAULT_TFLOPS, ClusterPlan, LeftOut, gpu_speed
from deepfleet.planning.reports import NodeReport
from deepfleet_node.train import balance

BALANCES = ("speed", "even")
# another config that fits and is predicted this many times faster gets a line of its own
FASTER_FACTOR = 2.0


@dataclass(frozen=True)
class Candidate:
    """A config the job could run with: its memory verdict and predicted step."""

    config: str
    verdict: memory.Verdict | None  # None: memory not judged
    prediction: cost.StepPrediction

    @property
    def fits(self) -> bool:
        return self.verdict is None or self.verdict.fits


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
    prediction: cost.StepPrediction | None = None  # the chosen config's; None: shape unknown
    candidates: tuple[Candidate, ...] = ()  # every config it could run with, predicted

    @property
    def faster(self) -> Candidate | None:
        """A config that fits memory and is predicted FASTER_FACTOR times faster or more."""
        if self.prediction is None:
            return None
        fitting = [c for c in self.candidates if c.fits and c.config != self.config]
        # a tie goes to CONFIG=auto's own order (zero1 holds more than zero2 for the same time)
        order = {c: i for i, c in enumerate(memory.AUTO_ORDER)}
        best = min(
            fitting,
            key=lambda c: (c.prediction.total_s, order.get(c.config, len(order))),
            default=None,
        )
        if best is not None and best.prediction.total_s * FASTER_FACTOR <= self.prediction.total_s:
            return best
        return None

    @property
    def rank_names(self) -> list[str]:
        return [n.name for n in self.cluster.nodes for _ in range(n.slots)]

    def step_seconds(self, global_batch: int | None = None) -> float | None:
        """The predicted seconds per optimizer step the ranks check their own against
        (train's --predicted-step-s); None when there is no prediction. The cost model
        predicts one micro-step per step; a --global-batch that makes several repeats the
        forward, the backward and the gradients' collectives for each of them, so it is
        scaled by that count (for ZeRO-1/2 a little high: their weights' all-gather runs
        once a step)."""
        if self.prediction is None:
            return None
        per_micro_step = self.micro_batch * self.cluster.world_size
        ga = 1
        if global_batch and per_micro_step and global_batch % per_micro_step == 0:
            ga = global_batch // per_micro_step
        return self.prediction.total_s * ga


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


def memory_precision(cluster: ClusterPlan) -> str:
    """The one precision the memory model judges with: a bridge job's per-rank list
    ("bf16,fp32") counts as fp32 when any rank computes in it (the wider need)."""
    per_rank = cluster.precision.split(",")
    return "fp32" if "fp32" in per_rank else per_rank[0]


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
    links: cost.Links | None = None,
    calibrated: Mapping[str, float] | None = None,
) -> TrainPlan:
    """Raises PlanError, naming the machine, when the model does not fit.

    With CONFIG=auto a job that fits part of the cluster is not refused: when no config
    fits every machine, the machines short of memory sit out (replan(slots) gives the
    cluster plan without them) and each is named with what it lacked.

    links: the measured links (the cluster state's), default none: every pair assumed
    1 GbE; calibrated: machine -> one rank's measured FLOP/s, where known."""
    if shape is not None and config == "auto" and replan is not None:
        ranks = [memory.Rank(n.name, n.slots, n.accelerator) for n in cluster.nodes]
        args = (ranks, reports, seq_len, micro_batch, memory_precision(cluster))
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
                    smaller, reports, shape, verdict.config, seq_len, micro_batch, balance,
                    links=links, calibrated=calibrated,
                )  # fmt: skip
                return replace(tp, slots={name: 0 for name in names})
    verdict = None
    chosen = config
    total = micro_batch * cluster.world_size
    caps = None
    speeds = rank_speeds(cluster, reports) if balance == "speed" else [1.0] * cluster.world_size
    candidates: tuple[Candidate, ...] = ()
    if shape is not None and memory_config(config):
        ranks = [memory.Rank(n.name, n.slots, n.accelerator) for n in cluster.nodes]
        # every rank's tokens as the speed split gives them (before any memory cap)
        tokens = [t * seq_len for t in split(speeds, total)]
        candidates = predict_candidates(
            shape, config, cluster, reports, ranks, tokens, seq_len, micro_batch, links,
            calibrated,
        )  # fmt: skip
        if config == "auto":
            times = {c.config: c.prediction.total_s for c in candidates}
            verdict = memory.choose_config(
                shape, ranks, reports, seq_len, micro_batch, memory_precision(cluster), times.get
            )
        else:
            verdict = memory.check(
                shape, config, ranks, reports, seq_len, micro_batch, memory_precision(cluster)
            )
        chosen = verdict.config
        if balance == "speed":
            per_machine = memory.machine_caps(
                shape, chosen, ranks, reports, seq_len, memory_precision(cluster), total
            )
            caps = tuple(per_machine[n.name] for n in cluster.nodes for _ in range(n.slots))
            if min(caps) >= total:  # every machine holds the whole micro-batch: no cap
                caps = None
    elif config == "auto":
        chosen = memory.AUTO_ORDER[0]
    shares = split(speeds, total, list(caps) if caps else None)
    prediction = None
    if shape is not None and memory_config(chosen):
        machines = cost.job_ranks(cluster, reports, calibrated)
        tokens = [t * seq_len for t in shares]
        prediction = cost.predict_step(shape, chosen, machines, links, tokens, cluster.precision)
        # the chosen row with the shares the job runs (memory caps included)
        candidates = tuple(
            replace(c, prediction=prediction) if c.config == chosen else c for c in candidates
        )
    return TrainPlan(
        cluster, chosen, micro_batch, tuple(shares), tuple(speeds), balance, verdict, caps,
        prediction=prediction, candidates=candidates,
    )  # fmt: skip


def predict_candidates(
    shape: memory.ModelShape,
    config: str,
    cluster: ClusterPlan,
    reports: Mapping[str, NodeReport],
    ranks: list[memory.Rank],
    tokens: list[int],
    seq_len: int,
    micro_batch: int,
    links: cost.Links | None,
    calibrated: Mapping[str, float] | None,
) -> tuple[Candidate, ...]:
    """Every config the job could run with, its memory verdict and predicted step: the
    ZeRO configs for a DeepSpeed job (one backend), the bridge alone for a bridge job."""
    configs = (memory.BRIDGE,) if config == memory.BRIDGE else memory.CONFIGS[:-1]
    machines = cost.job_ranks(cluster, reports, calibrated)
    out = []
    for c in configs:
        verdict = memory.machine_fits(
            shape, c, ranks, reports, seq_len, micro_batch, memory_precision(cluster)
        )
        prediction = cost.predict_step(shape, c, machines, links, tokens, cluster.precision)
        out.append(Candidate(c, verdict, prediction))
    return tuple(out)


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
    lines += prediction_lines(tp)
    for out in tp.cluster.left_out:
        if out.name in tp.slots:  # the memory fit's own: the job's plan line lacks the why
            lines.append(f"  {out.name:<12} left out: {out.reason}; to use it: {out.override}")
    if tp.caps is not None:
        caps = ", ".join(f"{name} {cap}" for name, cap in zip(names, tp.caps, strict=True))
        lines.append(f"memory: the most a rank's memory holds per micro-step: {caps}")
    elif memory_config(tp.config) is None:
        lines.append(f"memory: not checked ({tp.config} is a custom config file)")
    return "\n".join(lines)


def prediction_lines(tp: TrainPlan) -> list[str]:
    """The predicted step (time, network share, bottleneck) and, when another config that
    fits is predicted FASTER_FACTOR times faster, the line naming it and its flag."""
    if tp.prediction is None:
        return []
    lines = [tp.prediction.line()]
    better = tp.faster
    if better is not None:
        ratio = tp.prediction.total_s / better.prediction.total_s
        times = f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"
        lines.append(
            f"faster: {better.config} fits memory and is predicted {times} faster "
            f"({cost.secs(better.prediction.total_s)} per step): CONFIG={better.config} "
            f"(--config {better.config})"
        )
    return lines


def candidate_lines(tp: TrainPlan) -> list[str]:
    """Every config the job could run with: memory verdict and predicted step time."""
    if not tp.candidates:
        return []
    lines = ["candidates (predicted time per step; memory):"]
    for c in tp.candidates:
        if c.verdict is None:
            fit = "memory not judged"
        else:
            d = c.verdict.tightest() if c.verdict.fits else c.verdict.short[0]
            use = (
                f"{d.machine} {d.where} {d.need / memory.GIB:.1f} of {d.room / memory.GIB:.1f} GiB"
            )
            fit = f"fits ({use})" if c.verdict.fits else f"does not fit ({use})"
        p = c.prediction
        mark = "*" if c.config == tp.config else " "
        lines.append(
            f" {mark}{c.config:<14}{cost.secs(p.total_s):>8}, {p.network_share:>4.0%} network, "
            f"bottleneck {p.bottleneck}; {fit}"
        )
    return lines


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
        "prediction": _prediction_dict(tp.prediction),
        "candidates": [
            {"config": c.config, "fits": c.fits, "prediction": _prediction_dict(c.prediction)}
            for c in tp.candidates
        ],
    }


def _prediction_dict(p: cost.StepPrediction | None) -> dict | None:
    if p is None:
        return None
    return {
        "strategy": p.strategy,
        "step_s": p.total_s,
        "compute_s": p.compute_s,
        "network_s": p.comm_s,
        "network_share": p.network_share,
        "bytes_per_rank": p.bytes_per_rank,
        "bottleneck": p.bottleneck,
        "overlap": p.overlap,
        "assumed": list(p.assumed),
        "detail": list(p.detail),
    }
