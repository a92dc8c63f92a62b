"""The memory model: how much a job needs on each device, and how much room each has.

One home for the training, inference and serving planners. `device_rooms` is what every
planner sets a need against (each drivable GPU's memory, or on a machine without one its
RAM, the cgroup limit where one is set). Inference and serving need the weights plus
INFERENCE_HEADROOM (`inference_need`). Training (the rest of this module) asks: will a
job's model states and activations fit every machine?

Pure. The model states (parameters, gradients, optimizer states) per rank and per machine
come from DeepSpeed's own estimators, transcribed below so the operator needs neither
torch nor DeepSpeed; tests/node/test_memfit.py checks the transcription against the real
functions inside the node image. Activations, the logits and a per-process overhead are
added on top, then each machine's need is set against its room: every GPU's memory, and
the host RAM (the cgroup limit where one is set).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

from deepfleet.errors import PlanError
from deepfleet.planning.compat import drivable_gpus
from deepfleet.planning.reports import NodeReport
from deepfleet_node.precision import BYTES

GIB = 1 << 30
# DeepSpeed's own default headroom for its model-state estimates.
BUFFER_FACTOR = 1.5
# What each rank's process holds before any model: torch, DeepSpeed and transformers
# imported, gloo/NCCL buffers, the tokenized data. Measured on the CPU image: about
# 0.55 GiB resident per rank (tests/integration/test_unlike.py records it).
RANK_OVERHEAD = int(0.6 * GIB)
# A CUDA/ROCm context on each GPU.
GPU_CONTEXT = int(0.8 * GIB)
# Freed tensors a process keeps: torch's caching allocator on a GPU, glibc's arenas on a
# CPU. Measured on the CPU image: a ZeRO-3 rank's resident memory grows ~15 % over its
# first steps as gathered parameters are freed and allocated again.
ALLOCATOR_SLACK = 1.15
# CONFIG=auto tries these, cheapest (least communication) first. zero1 holds more than
# zero2 and runs no faster, so auto never needs it.
AUTO_ORDER = ("zero2", "zero3", "zero3-offload")
# "bridge": deepfleet's own data parallel over gloo for mixed devices (no ZeRO partitioning)
BRIDGE = "bridge"
# Inference and serving: activations, KV cache and allocator slack on top of the weights.
INFERENCE_HEADROOM = 1.25


def device_rooms(report: NodeReport) -> list[int]:
    """The memory of each device a job can use on a machine: every GPU torch can drive
    there, or, on a machine without one, its RAM (the cgroup limit where one is set)."""
    gpus = [g.memory_bytes or 0 for g in drivable_gpus(report)]
    return gpus or [report.memory_room]


def inference_need(model_bytes: int | None) -> int | None:
    """What one copy of a model needs to generate: its weights and the headroom; None when
    the model's size is unknown."""
    return int(model_bytes * INFERENCE_HEADROOM) if model_bytes else None


CONFIGS = ("zero1", "zero2", "zero3", "zero3-offload", BRIDGE)


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, as `python -m deepfleet_node.modelinfo` prints it."""

    params: int
    largest_layer_params: int
    layers: int
    hidden_size: int
    heads: int
    vocab_size: int
    name: str = "model"

    @classmethod
    def from_info(cls, info: Mapping, name: str = "model") -> ModelShape:
        hidden, vocab = int(info["hidden_size"]), int(info["vocab_size"])
        return cls(
            params=int(info["params"]),
            # older modelinfo output lacks it: the embedding is the largest layer of an LLM
            largest_layer_params=int(info.get("largest_layer_params") or hidden * vocab),
            layers=int(info["layers"]),
            hidden_size=hidden,
            heads=int(info["heads"]),
            vocab_size=vocab,
            name=name,
        )


# ---------------------------------------------------------------- DeepSpeed's estimators


def estimate_zero2_model_states_mem_needs(
    total_params, num_gpus_per_node=1, num_nodes=1, cpu_offload=True, additional_buffer_factor=1.5
):
    """deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs (0.19.8)."""
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def estimate_zero3_model_states_mem_needs(
    total_params,
    largest_layer_params,
    num_gpus_per_node=1,
    num_nodes=1,
    cpu_offload=True,
    cpu_offload_params=True,
    zero_init=True,
    additional_buffer_factor=1.5,
):
    """deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs (0.19.8)."""
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            if zero_init:
                cpu_mem = total_params * 18 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = (
                    total_params
                    * max(4 * num_gpus_per_node, 18 * gpus_factor)
                    * additional_buffer_factor
                )
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            if zero_init:
                cpu_mem = total_params * 16 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = (
                    total_params
                    * max(4 * num_gpus_per_node, 16 * gpus_factor)
                    * additional_buffer_factor
                )
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        if zero_init:
            cpu_mem = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
        else:
            cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory


# ---------------------------------------------------------------- per-rank need


@dataclass(frozen=True)
class StateNeed:
    device_per_rank: int  # on the rank's GPU (its share of RAM on a CPU machine)
    host_per_machine: int  # host RAM the machine needs besides the ranks' device memory


def model_states(
    shape: ModelShape, config: str, slots: int, world: int, precision: str
) -> StateNeed:
    """Model states under one of deepfleet's configs for a machine running `slots` of the
    job's `world` ranks, from DeepSpeed's estimators.

    The estimators assume every node has the same number of GPUs; asking them for a
    cluster of world/slots such nodes gives each rank's device share (which depends on
    the world size only) and this machine's host share (which depends on its own ranks).
    DeepSpeed counts 16-bit parameters (2 bytes each beside the fp32 master copy); an fp32
    job keeps its full-size parameters in 4 bytes, which adds 2 bytes per parameter held.
    ZeRO-3 loads the weights partitioned (zero.Init), the other stages load them whole on
    every rank first, which is DeepSpeed's host-side figure.
    """
    p, nodes = shape.params, world / slots
    if config == BRIDGE:
        # every rank: fp32 weights, fp32 gradients and Adam's two moments (16 bytes per
        # parameter, nothing partitioned), after loading the whole model on the host
        return StateNeed(16 * p, int(p * 4 * slots * BUFFER_FACTOR))
    if config in ("zero1", "zero2"):
        host, device = estimate_zero2_model_states_mem_needs(
            p, slots, nodes, cpu_offload=False, additional_buffer_factor=BUFFER_FACTOR
        )
        if config == "zero1":  # 16-bit gradients stay whole: only optimizer states split
            device += int(2 * p * (1 - 1 / world))
        held = p
    elif config in ("zero3", "zero3-offload"):
        offload = config == "zero3-offload"
        host, device, _ = estimate_zero3_model_states_mem_needs(
            p, shape.largest_layer_params, slots, nodes, cpu_offload=offload,
            cpu_offload_params=offload, zero_init=True, additional_buffer_factor=BUFFER_FACTOR,
        )  # fmt: skip
        held = shape.largest_layer_params if offload else p // world
    else:
        raise PlanError(f"no memory estimate for config {config!r} (known: {', '.join(CONFIGS)})")
    if precision == "fp32":  # DeepSpeed's estimate counts 16-bit parameters and gradients
        device += (BYTES["fp32"] - BYTES["bf16"]) * held
    return StateNeed(device, host)


@cache
def zero3_settings(config: str) -> dict:
    """The shipped config's ZeRO section (deepfleet_node/configs/<config>.json)."""
    path = resources.files("deepfleet_node") / "configs" / f"{config}.json"
    return json.loads(path.read_text())["zero_optimization"]


def zero3_working_set(shape: ModelShape, config: str, precision: str) -> int:
    """What ZeRO-3 holds beside its partitions while it computes, which DeepSpeed's estimator
    leaves out: gathered parameters stay resident up to stage3_max_live_parameters, each
    with its gradient until the reduce-scatter, plus the prefetch and reduce buckets. For a
    model under that many parameters this is the whole model again, which is why ZeRO-3
    saves nothing over ZeRO-2 on a few small machines."""
    zero = zero3_settings(config)
    width = BYTES[precision]
    live = min(shape.params, int(zero.get("stage3_max_live_parameters", 1e9)))
    prefetch = min(shape.params, int(zero.get("stage3_prefetch_bucket_size", 5e7)))
    bucket = min(shape.params, int(zero.get("reduce_bucket_size", 5e8)))
    return width * (2 * live + prefetch + bucket)


def activation_bytes(
    shape: ModelShape, seq_len: int, micro_batch: int, precision: str, checkpointing: bool = False
) -> int:
    """Activations kept for the backward pass, plus the logits and their gradient.

    Per layer s*b*h*(34 + 5*a*s/h) bytes in 16-bit (Korthikanti et al., "Reducing
    Activation Recomputation in Large Transformer Models", no recomputation); fp32 doubles
    it. With activation checkpointing each layer keeps only its 16-bit input and one layer
    at a time is recomputed whole. The loss upcasts the logits to fp32.
    """
    s, b, h, a = seq_len, micro_batch, shape.hidden_size, shape.heads
    scale = BYTES[precision] // BYTES["bf16"]
    per_layer = int(s * b * h * (34 + 5 * a * s / h)) * scale
    if checkpointing:
        layers = shape.layers * 2 * s * b * h * scale + per_layer
    else:
        layers = shape.layers * per_layer
    # the fp32 logits and their gradient, plus the 16-bit logits they were upcast from
    upcast = BYTES[precision] if precision != "fp32" else 0
    logits = s * b * shape.vocab_size * (BYTES["fp32"] * 2 + upcast)
    return layers + logits


# ---------------------------------------------------------------- fit


@dataclass(frozen=True)
class DeviceFit:
    machine: str
    where: str  # "GPU 0", "RAM"
    need: int
    room: int

    @property
    def fits(self) -> bool:
        return self.need <= self.room

    def text(self) -> str:
        return (
            f"{self.machine} {self.where} needs {self.need / GIB:.1f} GiB, "
            f"has {self.room / GIB:.1f} GiB"
        )


@dataclass(frozen=True)
class Verdict:
    config: str
    micro_batch: int
    devices: tuple[DeviceFit, ...]

    @property
    def fits(self) -> bool:
        return all(d.fits for d in self.devices)

    @property
    def short(self) -> tuple[DeviceFit, ...]:
        return tuple(d for d in self.devices if not d.fits)

    def tightest(self) -> DeviceFit:
        return max(self.devices, key=lambda d: d.need / max(d.room, 1))


@dataclass(frozen=True)
class Rank:
    """What the memory model needs to know of one machine in the plan."""

    name: str
    slots: int
    accelerator: str


def machine_fits(
    shape: ModelShape,
    config: str,
    ranks: list[Rank],
    reports: Mapping[str, NodeReport],
    seq_len: int,
    micro_batch: int,
    precision: str,
    checkpointing: bool = False,
) -> Verdict:
    world = sum(r.slots for r in ranks)
    act = activation_bytes(shape, seq_len, micro_batch, precision, checkpointing)
    fits = []
    working = zero3_working_set(shape, config, precision) if config.startswith("zero3") else 0
    for rank in ranks:
        states = model_states(shape, config, rank.slots, world, precision)
        report = reports[rank.name]
        room = report.memory_room
        host_need = states.host_per_machine + rank.slots * RANK_OVERHEAD
        device = int((states.device_per_rank + working + act) * ALLOCATOR_SLACK)
        if rank.accelerator == "cpu":  # the ranks' "device" memory is the same RAM
            host_need += rank.slots * device
        else:
            for gpu in drivable_gpus(report)[: rank.slots]:
                gpu_room = gpu.memory_bytes or 0
                need = device + GPU_CONTEXT
                fits.append(DeviceFit(rank.name, f"GPU {gpu.index}", need, gpu_room))
        fits.append(DeviceFit(rank.name, "RAM", host_need, room))
    return Verdict(config, micro_batch, tuple(fits))


def largest_micro_batch(shape, config, ranks, reports, seq_len, micro_batch, precision) -> int:
    """The largest micro-batch up to the asked one that fits (0: none does)."""
    for b in range(micro_batch, 0, -1):
        if machine_fits(shape, config, ranks, reports, seq_len, b, precision).fits:
            return b
    return 0


def machine_caps(
    shape: ModelShape,
    config: str,
    ranks: list[Rank],
    reports: Mapping[str, NodeReport],
    seq_len: int,
    precision: str,
    limit: int,
) -> dict[str, int]:
    """Per machine, the largest micro-batch (up to limit) its ranks may take and still fit:
    the cap on what speed balancing hands a fast machine."""
    caps = {}
    for rank in ranks:
        low, high = 0, limit  # fits at low (0: not even one), and we look for the top
        while low < high:
            mid = (low + high + 1) // 2
            verdict = machine_fits(shape, config, ranks, reports, seq_len, mid, precision)
            if all(d.fits for d in verdict.devices if d.machine == rank.name):
                low = mid
            else:
                high = mid - 1
        caps[rank.name] = low
    return caps


def advice(
    shape: ModelShape,
    config: str,
    ranks: list[Rank],
    reports: Mapping[str, NodeReport],
    seq_len: int,
    micro_batch: int,
    precision: str,
) -> list[str]:
    """What would fit instead: another config, a smaller micro-batch, a machine left out."""
    tips = []
    for other in AUTO_ORDER:
        if (
            other != config
            and machine_fits(shape, other, ranks, reports, seq_len, micro_batch, precision).fits
        ):
            tips.append(f"CONFIG={other}")
    smaller = largest_micro_batch(shape, config, ranks, reports, seq_len, micro_batch, precision)
    if 0 < smaller < micro_batch:
        tips.append(f"--micro-batch {smaller}")
    verdict = machine_fits(shape, config, ranks, reports, seq_len, micro_batch, precision)
    for name in dict.fromkeys(d.machine for d in verdict.short):
        rest = [r for r in ranks if r.name != name]
        if (
            rest
            and machine_fits(shape, config, rest, reports, seq_len, micro_batch, precision).fits
        ):
            tips.append(f"SLOTS={name}=0 (leave {name} out)")
    return tips


def refusal(verdict: Verdict, tips: list[str], shape: ModelShape) -> str:
    short = "; ".join(d.text() for d in verdict.short)
    fix = f"; would fit: {', '.join(tips)}" if tips else "; nothing deepfleet can set fits it"
    return (
        f"{shape.name} ({shape.params / 1e9:.2f}B params) does not fit with {verdict.config}, "
        f"micro-batch {verdict.micro_batch}: {short}{fix}"
    )


def choose_config(
    shape: ModelShape,
    ranks: list[Rank],
    reports: Mapping[str, NodeReport],
    seq_len: int,
    micro_batch: int,
    precision: str,
    predicted: Callable[[str], float] | None = None,
) -> Verdict:
    """CONFIG=auto: of the configs that fit every machine, the fastest by `predicted`
    (config -> predicted seconds per step, planning/cost.py; a tie keeps AUTO_ORDER's
    order) or, without predictions, the cheapest; else a refusal that says what would fit
    (a smaller micro-batch or a machine left out)."""
    args = (ranks, reports, seq_len, micro_batch, precision)
    verdicts = [machine_fits(shape, c, *args) for c in AUTO_ORDER]
    fitting = [v for v in verdicts if v.fits]
    if fitting:
        if predicted is None:
            return fitting[0]
        return min(fitting, key=lambda v: predicted(v.config))  # min keeps the first of ties
    tips = []
    for config in AUTO_ORDER:
        tips += [
            f"CONFIG={config} {tip}" for tip in advice(shape, config, *args) if "CONFIG" not in tip
        ]
    least = verdicts[-1]  # the config that needs the least memory
    raise PlanError(refusal(least, tips, shape), least.tightest().machine)


def fit_without(
    shape: ModelShape,
    ranks: list[Rank],
    reports: Mapping[str, NodeReport],
    seq_len: int,
    micro_batch: int,
    precision: str,
) -> tuple[Verdict, list[DeviceFit]] | None:
    """CONFIG=auto when no config fits every machine: the cheapest config that fits once
    the machines short of memory sit out, and what each of them lacked; None if none does."""
    for config in AUTO_ORDER:
        verdict = machine_fits(shape, config, ranks, reports, seq_len, micro_batch, precision)
        short = {d.machine for d in verdict.short}
        rest = [r for r in ranks if r.name not in short]
        if not rest:
            continue
        after = machine_fits(shape, config, rest, reports, seq_len, micro_batch, precision)
        if after.fits:
            return after, list(verdict.short)
    return None


def check(
    shape: ModelShape,
    config: str,
    ranks: list[Rank],
    reports: Mapping[str, NodeReport],
    seq_len: int,
    micro_batch: int,
    precision: str,
) -> Verdict:
    """The verdict for the config asked for; a PlanError naming the machine when it does
    not fit (checked before anything is copied or launched)."""
    if config == "auto":
        return choose_config(shape, ranks, reports, seq_len, micro_batch, precision)
    verdict = machine_fits(shape, config, ranks, reports, seq_len, micro_batch, precision)
    if not verdict.fits:
        tips = advice(shape, config, ranks, reports, seq_len, micro_batch, precision)
        raise PlanError(refusal(verdict, tips, shape), verdict.short[0].machine)
    return verdict


def describe(verdict: Verdict) -> str:
    tight = verdict.tightest()
    return (
        f"memory: fits with {verdict.config}, micro-batch {verdict.micro_batch} "
        f"(tightest: {tight.text()})"
    )
