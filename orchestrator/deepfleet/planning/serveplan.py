"""Where `deepfleet serve` puts its replicas. Pure: the plan is printed (and is all that
--dry-run shows) before anything starts.

A replica is one long-running process that holds the whole model: one per GPU that fits
it, one per machine for a CPU machine, or one spanning a machine's GPUs when the model fits
the machine but not one of its devices (transformers' device_map over those GPUs). A
machine that cannot hold a replica sits out, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from deepfleet.errors import PlanError
from deepfleet.layout import RUN_DIR
from deepfleet.planning import cost
from deepfleet.planning.inferplan import GB
from deepfleet.planning.memory import device_rooms, inference_need
from deepfleet.planning.plan import ClusterPlan, LeftOut
from deepfleet.planning.reports import NodeReport

# Each replica listens on its machine's address at REPLICA_PORT + its index there.
REPLICA_PORT = 8760
GATEWAY_PORT = 8000  # the OpenAI-compatible endpoint, on the operator's machine
MAX_TOKENS_LIMIT = 4096  # the most one request may ask for (--max-tokens-limit)
API_KEY_ENV = "DEEPFLEET_API_KEY"  # the endpoint's key when --api-key is not given
# The running service's record on the master: where it listens, its replicas' counts.
SERVICE_FILE = f"{RUN_DIR}/service.json"
SERVICE_READ_SH = f"cat {SERVICE_FILE} 2>/dev/null; true"


@dataclass(frozen=True)
class Replica:
    name: str  # machine/index: how logs, status and errors name it
    machine: str
    address: str
    port: int
    gpus: tuple[int, ...] = ()  # the devices it uses; () on a CPU machine

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def argv(self, model: str) -> list[str]:
        """The replica process, as its machine's node container runs it."""
        argv = ["python", "-m", "deepfleet_node.serve", "--model", model, "--name", self.name]
        argv += ["--host", self.address, "--port", str(self.port)]
        if self.gpus:
            argv += ["--gpus", ",".join(str(g) for g in self.gpus)]
        return argv


@dataclass(frozen=True)
class ServePlan:
    replicas: tuple[Replica, ...]
    left_out: tuple[LeftOut, ...]
    reason: str
    # replica name -> predicted seconds per token of one request (planning/cost.py); empty
    # when the model's size is unknown. The gateway routes by measured tokens/s regardless.
    per_token: dict[str, float] = field(default_factory=dict)


def plan_service(
    plan: ClusterPlan,
    reports: Mapping[str, NodeReport],
    model_bytes: int | None,
    port: int = REPLICA_PORT,
) -> ServePlan:
    need = inference_need(model_bytes)
    replicas: list[Replica] = []
    left: list[LeftOut] = []
    for node in plan.nodes:
        room = device_rooms(reports[node.name])
        on_gpu = node.accelerator != "cpu"
        indices = list(node.devices) or list(range(len(room)))
        devices = [(i, room[i] if i < len(room) else 0) for i in indices] if on_gpu else []

        def add(gpus: tuple[int, ...], name: str = node.name, address: str = node.address):
            index = sum(1 for r in replicas if r.machine == name)
            replicas.append(Replica(f"{name}/{index}", name, address, port + index, gpus))

        if not on_gpu:
            if need is not None and need > room[0]:
                left.append(_left(node.name, f"RAM {room[0] / GB:.1f} GB", need))
            else:
                add(())
            continue
        fitting = [i for i, memory in devices if need is None or need <= memory]
        if fitting:
            for i in fitting:
                add((i,))
        elif need is not None and need <= sum(m for _, m in devices) and len(devices) > 1:
            add(tuple(i for i, _ in devices))
        else:
            total = sum(m for _, m in devices)
            left.append(_left(node.name, f"{len(devices)} GPU(s), {total / GB:.1f} GB", need))
    size = f"model needs ~{_size(need)}" if need else "model size unknown"
    if not replicas:
        raise PlanError(
            f"{size}; no machine can hold a whole replica "
            f"({'; '.join(o.reason for o in left)}); `make infer MODE=zero` spreads one "
            "copy over every machine for batch jobs"
        )
    return ServePlan(
        tuple(replicas), tuple(left), size, predict(plan, reports, model_bytes, replicas)
    )


def predict(
    plan: ClusterPlan, reports: Mapping[str, NodeReport], model_bytes: int | None, replicas
) -> dict[str, float]:
    """Each replica's predicted seconds per token: one device reading the whole model, or
    the machine's GPUs sharing it (tp inside one machine)."""
    if not model_bytes:
        return {}
    speeds = {r.machine: r for r in cost.job_ranks(plan, reports)}
    out = {}
    for r in replicas:
        one = replace(speeds[r.machine], slots=max(1, len(r.gpus)))
        mode = "tp" if len(r.gpus) > 1 else "replicas"
        out[r.name] = cost.predict_token(model_bytes, mode, [one]).seconds
    return out


def _size(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 1e6:.0f} MB"


def _left(name: str, has: str, need: int | None) -> LeftOut:
    wants = f"{need / GB:.1f} GB" if need else "more"
    return LeftOut(name, f"{name} has {has}, a replica needs {wants}", "a smaller model")


def describe(sp: ServePlan) -> str:
    machines = len({r.machine for r in sp.replicas})
    lines = [f"serve: {len(sp.replicas)} replica(s) on {machines} machine(s); {sp.reason}"]
    for r in sp.replicas:
        where = f"GPU {','.join(str(g) for g in r.gpus)}" if r.gpus else "CPU"
        known = sp.per_token.get(r.name)
        speed = f"  ~{cost.secs(known)} per token (predicted)" if known else ""
        lines.append(f"  {r.name:<12} {where:<10} {r.url}{speed}")
    for out in sp.left_out:
        lines.append(f"  {out.name:<12} left out: {out.reason}")
    return "\n".join(lines)
