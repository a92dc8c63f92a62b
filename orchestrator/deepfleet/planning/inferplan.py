"""Inference planning: replicas, tensor parallel or ZeRO-3, from the model's size and the
nodes' memory. Pure: the reasons it gives are printed before the job starts.

MODE=auto takes the first that fits of: a replica per device (the model fits the smallest),
tensor parallel in the machine with the most device memory, ZeRO-3 across every machine;
then, with each mode's predicted seconds per token (planning/cost.py), it never keeps a
mode predicted SLOWER_LIMIT times slower than another that fits, which includes replicas
on only the machines whose every device holds the model (ZeRO-3 over a LAN gathers every
weight for every token). The reason carries the chosen mode's predicted time per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from deepfleet.errors import PlanError
from deepfleet.planning import cost
from deepfleet.planning.memory import device_rooms, inference_need
from deepfleet.planning.plan import ClusterPlan
from deepfleet.planning.reports import NodeReport

MODES = ("auto", "replicas", "tp", "zero")
GB = 1e9
# MODE=auto never keeps a mode predicted this many times slower than another that fits
SLOWER_LIMIT = 20.0


@dataclass(frozen=True)
class InferencePlan:
    mode: str
    slots: dict[str, int]  # per node; 0 leaves it out
    reason: str
    prediction: cost.TokenPrediction | None = None  # None: the model's size is unknown


def choose(
    plan: ClusterPlan,
    reports: Mapping[str, NodeReport],
    model_bytes: int | None,
    mode: str,
    links: cost.Links | None = None,
) -> InferencePlan:
    """links: the measured links (the cluster state's); default: every pair 1 GbE."""
    if mode not in MODES:
        raise PlanError(f"unknown inference mode {mode!r}; use one of {', '.join(MODES)}")
    devices = {n.name: device_rooms(reports[n.name]) for n in plan.nodes}
    # CPU: the node's slots (one per node unless asked otherwise); GPU: one copy per device
    replica_slots = {
        n.name: n.slots if n.accelerator == "cpu" else len(devices[n.name]) for n in plan.nodes
    }
    all_slots = {n.name: n.slots for n in plan.nodes}
    need = inference_need(model_bytes)
    smallest = min(min(d) for d in devices.values())
    best_node = max(plan.nodes, key=lambda n: sum(devices[n.name]))
    best_total = sum(devices[best_node.name])
    cluster_total = sum(sum(d) for d in devices.values())
    tp_slots = {n.name: (n.slots if n is best_node else 0) for n in plan.nodes}
    speeds = {r.machine: r for r in cost.job_ranks(plan, reports)}

    def predict(kind: str, slots: dict[str, int]) -> cost.TokenPrediction | None:
        if not model_bytes:
            return None
        ranks = [replace(speeds[n], slots=k) for n, k in slots.items() if k > 0]
        return cost.predict_token(model_bytes, kind, ranks, links)

    def made(kind: str, slots: dict[str, int], reason: str) -> InferencePlan:
        return InferencePlan(kind, slots, reason, predict(kind, slots))

    if mode == "replicas":
        return made("replicas", replica_slots, "asked for replicas")
    if mode == "tp":
        return made("tp", tp_slots, f"asked for tensor parallel on {best_node.name}")
    if mode == "zero":
        return made("zero", all_slots, "asked for ZeRO-3 inference")
    if need is None:
        return InferencePlan("replicas", replica_slots, "model size unknown: one copy per device")
    size = f"model needs ~{need / GB:.1f} GB"
    fitting: list[InferencePlan] = []
    if need <= smallest:
        fitting.append(made(
            "replicas", replica_slots, f"{size}, the smallest device has {smallest / GB:.1f} GB"
        ))  # fmt: skip
    if need <= best_total and best_node.slots > 1:
        fitting.append(made(
            "tp",
            tp_slots,
            f"{size}, more than one device ({smallest / GB:.1f} GB) but within "
            f"{best_node.name}'s {best_node.slots} devices ({best_total / GB:.1f} GB)",
        ))  # fmt: skip
    if need <= cluster_total:
        fitting.append(made(
            "zero", all_slots, f"{size}, more than any node; ZeRO-3 across all "
            f"({cluster_total / GB:.1f} GB)",
        ))  # fmt: skip
    if not fitting:
        raise PlanError(f"{size} but the whole cluster has {cluster_total / GB:.1f} GB")
    # the machines whose every device holds a copy: replicas there alone
    holders = {n: (k if min(devices[n]) >= need else 0) for n, k in replica_slots.items()}
    if 0 < sum(1 for k in holders.values() if k) < len(holders):
        where = ", ".join(n for n, k in holders.items() if k)
        fitting.append(made("replicas", holders, f"{size}; one copy per device on {where}"))
    pick = fitting[0]
    fastest = max(fitting, key=lambda c: c.prediction.tokens_per_s)  # a batch of prompts
    ratio = fastest.prediction.tokens_per_s / pick.prediction.tokens_per_s
    if ratio >= SLOWER_LIMIT:
        return replace(
            fastest,
            reason=f"{fastest.reason}, not {pick.mode} (predicted {ratio:.0f}x slower: "
            f"{pick.prediction.text()}); {fastest.prediction.text()}",
        )
    return replace(pick, reason=f"{pick.reason}; {pick.prediction.text()}")
