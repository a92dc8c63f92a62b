"""Inference planning: replicas, tensor parallel or ZeRO-3, from the model's size and the
nodes' memory. Pure: the reasons it gives are printed before the job starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from deepfleet.errors import PlanError
from deepfleet.planning.memory import device_rooms, inference_need
from deepfleet.planning.plan import ClusterPlan
from deepfleet.planning.reports import NodeReport

MODES = ("auto", "replicas", "tp", "zero")
GB = 1e9


@dataclass(frozen=True)
class InferencePlan:
    mode: str
    slots: dict[str, int]  # per node; 0 leaves it out
    reason: str


def choose(
    plan: ClusterPlan, reports: Mapping[str, NodeReport], model_bytes: int | None, mode: str
) -> InferencePlan:
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

    if mode == "replicas":
        return InferencePlan("replicas", replica_slots, "asked for replicas")
    if mode == "tp":
        return InferencePlan("tp", tp_slots, f"asked for tensor parallel on {best_node.name}")
    if mode == "zero":
        return InferencePlan("zero", all_slots, "asked for ZeRO-3 inference")
    if need is None:
        return InferencePlan("replicas", replica_slots, "model size unknown: one copy per device")
    size = f"model needs ~{need / GB:.1f} GB"
    if need <= smallest:
        return InferencePlan(
            "replicas", replica_slots, f"{size}, the smallest device has {smallest / GB:.1f} GB"
        )
    if need <= best_total and best_node.slots > 1:
        return InferencePlan(
            "tp",
            tp_slots,
            f"{size}, more than one device ({smallest / GB:.1f} GB) but within "
            f"{best_node.name}'s {best_node.slots} devices ({best_total / GB:.1f} GB)",
        )
    if need <= cluster_total:
        return InferencePlan(
            "zero", all_slots, f"{size}, more than any node; ZeRO-3 across all "
            f"({cluster_total / GB:.1f} GB)",
        )  # fmt: skip
    raise PlanError(f"{size} but the whole cluster has {cluster_total / GB:.1f} GB")
