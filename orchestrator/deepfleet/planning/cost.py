"""The cost model: predicted seconds per training step and per generated token.

Pure, like the rest of planning/: from the model's shape, the ranks' speeds and the links
between machines it predicts where a job's time goes (compute, the network, host-device
copies) and names the bottleneck. The plan prints it; CONFIG=auto and infer's MODE=auto
use it to avoid a strategy the LAN cannot carry.

Training, per optimizer step with one micro-step (what deepfleet's configs run):

- compute = max over ranks of 6 x params x that rank's tokens / its speed: the ranks
  synchronise at every collective, so the slowest decides (speed balancing gives a fast
  rank more tokens, which the per-rank tokens express).
- communication: the ZeRO paper (Rajbhandari et al. 2020, section 7) counts 2 x Psi
  elements per rank per step for data parallel and ZeRO-1/2 (a reduce-scatter of the
  gradients and an all-gather of the updated weights, Psi each) and 3 x Psi for ZeRO-3
  (an all-gather of the weights in the forward, another in the backward, a reduce-scatter
  of the gradients). Those are the large-N limits of a ring: each of those collectives
  sends (N-1)/N of the data per rank. Bytes sent per rank per step, N ranks:

      dp / ZeRO-1 / ZeRO-2:  2 x (N-1)/N x params x grad_bytes
      ZeRO-3 (and offload):  3 x (N-1)/N x params x grad_bytes
      bridge:                2 x (N-1)/N x params x 4   (one fp32 all-reduce over gloo)

  grad_bytes is 2 in bf16/fp16 and 4 in fp32. An 8B model in bf16 on 2 machines: data
  parallel 2 x 1/2 x 8e9 x 2 = 16 GB (137 s at 117 MB/s), ZeRO-3 24 GB (205 s): issue
  #31's figures. The ring runs over the ranks in hostfile order; ranks inside one machine
  talk through shared memory or NVLink, so only the hops that cross machines touch the
  LAN, and each of them carries the whole per-rank volume: the time is that volume over
  the slowest crossing (each direction as measured). A job on one machine has no network
  term. Latency: every collective pays (N-1) ring steps of the slowest crossing's RTT,
  with one collective per bucket (reduce_bucket_size, allgather_bucket_size of the
  shipped configs) and, for ZeRO-3, two gathers per layer (forward and backward) at
  least.
- overlap, as DeepSpeed does it: ZeRO-1/2 run with overlap_comm, so the gradients'
  reduce-scatter (half the volume) hides behind the backward (2/3 of the compute); the
  all-gather of the updated weights after the optimizer step does not:
  total = compute + max(0, reduce - backward) + gather + latency. ZeRO-3's gathers are
  on the critical path of every layer (on CPU/gloo the prefetch hides next to nothing):
  total = compute + communication. The bridge all-reduces once after the backward:
  total = compute + communication.
- ZeRO-3 offload on a GPU adds the host<->device copies of the rank's partition each step
  (16-bit weights in for the forward and again for the backward, fp32 gradients out,
  updated 16-bit weights in: 10 bytes per parameter of the partition over PCIE_BPS) and
  CPU Adam (CPU_ADAM_PARAMS_PER_S); on a CPU rank the
  "offload" moves nothing.

Inference, seconds per generated token of one sequence (batch 1, decoding):

- replicas: each device reads every weight once per token and does 2 x params FLOPs:
  max(weights / memory bandwidth, 2 x params / speed); params = weight bytes / 2 (the
  16-bit checkpoints nearly every published model uses). The figure is the slowest
  replica's.
- tp: the weights split over one machine's GPUs (each reads its share), plus two
  all-reduces of the hidden state per layer over the machine's own links (fast: their
  latency only, LOCAL_LATENCY_S).
- zero: every weight is gathered over the LAN for every token: (N-1)/N x weight bytes
  over the slowest crossing, plus the compute on the slowest device and one gather per
  layer's latency.
- MODE=auto compares the job's tokens/s (a batch of prompts): replicas add up, ZeRO's
  ranks each generate their own prompts from one gather, tp's ranks one sequence.

Speeds: a GPU's dense 16-bit peak (plan.GPU_TFLOPS) x GPU_MFU; fp32 on a GPU
FP32_GPU_FACTOR of that (torch leaves TF32 off for matmuls, CUDA-core fp32 is 1/2 to
1/15 of the tensor-core 16-bit rate); a CPU core plan.CPU_CORE_TFLOPS (50 GFLOP/s, fp32
with AVX2 FMA) x CPU_MFU, the machine's cores (its cgroup quota) shared by its ranks. A
measured figure (`calibrated`: machine -> FLOP/s of one rank, from the ranks' own timing)
replaces the table where known (training; inference uses the tables). Links: measured
(Links.from_records) or DEFAULT_LINK, 1 GbE, and the prediction then says "assumed 1 GbE".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from deepfleet.planning import memory
from deepfleet.planning.compat import drivable_gpus
from deepfleet.planning.plan import CPU_CORE_TFLOPS, ClusterPlan, gpu_speed
from deepfleet.planning.reports import NodeReport
from deepfleet_node.train.metrics import secs  # rank 0 prints step times the same way

# ---------------------------------------------------------------- assumptions

LINK_1GBE_BPS = 117e6  # bytes/s: 1 Gbit/s less Ethernet, IP and TCP framing
LINK_1GBE_RTT_S = 0.5e-3
GPU_MFU = 0.4  # model FLOPs utilisation of a GPU in training (bf16, a large enough batch)
FP32_GPU_FACTOR = 0.25  # an fp32 job on a GPU: this share of its dense 16-bit rate
CPU_MFU = 0.5  # share of a core's fp32 FMA peak torch's GEMMs reach in a training step
PCIE_BPS = 12e9  # host<->GPU copies (PCIe 4.0 x16 as pinned copies reach it, halved)
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeed's CPU Adam, parameters updated per second per rank
LOCAL_LATENCY_S = 20e-6  # one collective between the GPUs of one machine (NVLink, PCIe)
BACKWARD_SHARE = 2 / 3  # the backward's part of 6 x params x tokens (4 of the 6)
# decoding reads every weight per token: a device's memory bandwidth, bytes/s, by name
GPU_MEM_BPS = {
    "B200": 8.0e12, "H200": 4.8e12, "H100": 3.35e12, "GH200": 4.0e12, "A100": 2.0e12,
    "A40": 0.70e12, "A10": 0.60e12, "L40S": 0.86e12, "L40": 0.86e12, "L4": 0.30e12,
    "V100": 0.90e12, "T4": 0.32e12, "RTX 5090": 1.79e12, "RTX 4090": 1.0e12,
    "RTX 4080": 0.72e12, "RTX 4070": 0.50e12, "RTX 3090": 0.94e12, "RTX 3080": 0.76e12,
    "RTX 3070": 0.45e12, "RTX 3060": 0.36e12, "MI355": 8.0e12, "MI325": 6.0e12,
    "MI300": 5.3e12, "MI250": 3.2e12, "MI210": 1.6e12, "MI100": 1.2e12,
    "7900 XTX": 0.96e12, "7900 XT": 0.80e12, "W7900": 0.86e12,
}  # fmt: skip
DEFAULT_GPU_MEM_BPS = 0.5e12
CPU_MEM_BPS = 20e9  # a desktop's dual-channel DDR4/DDR5 as one process streams it
MEM_EFFICIENCY = 0.6  # share of the memory bandwidth a decoding step reaches
INFER_WEIGHT_BYTES = 2  # bytes per parameter of a checkpoint whose dtype is not known

STRATEGIES = ("zero1", "zero2", "zero3", "zero3-offload", "bridge")
VOLUME = {"zero1": 2, "zero2": 2, "zero3": 3, "zero3-offload": 3, "bridge": 2}
GRAD_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# the shipped configs' buckets (deepfleet_node/configs/*.json), elements
DEFAULT_BUCKET = 50_000_000


# ---------------------------------------------------------------- links


@dataclass(frozen=True)
class Link:
    """One pair of machines: bytes/s each way and the round trip; measured_at: when
    (seconds since the epoch), None for an assumed link."""

    a: str
    b: str
    a_to_b_bps: float
    b_to_a_bps: float
    rtt_s: float
    measured_at: float | None = None

    def bps(self, src: str, dst: str) -> float:
        if (src, dst) == (self.b, self.a):
            return self.b_to_a_bps
        return self.a_to_b_bps

    @property
    def assumed(self) -> bool:
        return self.measured_at is None


DEFAULT_LINK = Link("", "", LINK_1GBE_BPS, LINK_1GBE_BPS, LINK_1GBE_RTT_S)


@dataclass(frozen=True)
class Links:
    """The measured links by unordered pair; a pair not measured gets `default`."""

    links: tuple[Link, ...] = ()
    default: Link = DEFAULT_LINK

    def between(self, a: str, b: str) -> Link:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        d = self.default
        return Link(a, b, d.a_to_b_bps, d.b_to_a_bps, d.rtt_s, None)

    @classmethod
    def from_records(cls, records: Iterable[Mapping] | None) -> Links:
        """The cluster state's form: [{"a", "b", "a_to_b_bps", "b_to_a_bps", "rtt_s",
        "measured_at"}, ...]; a record lacking a figure is skipped (assumed instead)."""
        links = []
        for r in records or ():
            try:
                links.append(
                    Link(str(r["a"]), str(r["b"]), float(r["a_to_b_bps"]),
                         float(r["b_to_a_bps"]), float(r["rtt_s"]),
                         None if r.get("measured_at") is None else float(r["measured_at"]))
                )  # fmt: skip
            except (KeyError, TypeError, ValueError):
                continue
        return cls(tuple(links))


def _mb(bps: float) -> str:
    return f"{bps / 1e6:.0f} MB/s" if bps >= 1e6 else f"{bps / 1e3:.0f} kB/s"


def link_text(link: Link, bps: float) -> str:
    return f"the {link.a}-{link.b} link, {_mb(bps)}"


ASSUMED_LINKS = "assumed 1 GbE for links not measured"
ASSUMED_SPEEDS = "speeds from the GPU/CPU tables"


@dataclass(frozen=True)
class Ring:
    """The crossings between machines of a ring in hostfile order."""

    hops: tuple[tuple[Link, float], ...]  # each crossing and its bytes/s that way

    @property
    def slowest(self) -> tuple[Link, float] | None:
        return min(self.hops, key=lambda h: h[1]) if self.hops else None

    @property
    def rtt_s(self) -> float:
        return max((link.rtt_s for link, _ in self.hops), default=0.0)

    @property
    def assumed(self) -> bool:
        return any(link.assumed for link, _ in self.hops)


def ring(machines: Sequence[str], links: Links) -> Ring:
    if len(machines) < 2:
        return Ring(())
    hops = []
    for i, src in enumerate(machines):
        dst = machines[(i + 1) % len(machines)]
        link = links.between(src, dst)
        hops.append((link, link.bps(src, dst)))
    return Ring(tuple(hops))


# ---------------------------------------------------------------- speeds


@dataclass(frozen=True)
class Ranks:
    """One machine's part of a job: its ranks and what one of them computes (FLOP/s)."""

    machine: str
    slots: int
    accelerator: str
    flops: float  # per rank, achieved (utilisation included)
    mem_bps: float = CPU_MEM_BPS * MEM_EFFICIENCY  # per rank, achieved (inference)
    calibrated: bool = False


def cpu_flops(report: NodeReport, slots: int) -> float:
    cores = report.cpu_quota or report.cpu_count or 1
    return cores * CPU_CORE_TFLOPS * 1e12 * CPU_MFU / max(slots, 1)


def gpu_flops(gpu, precision: str) -> float:
    peak = gpu_speed(gpu) * 1e12 * GPU_MFU
    return peak * (FP32_GPU_FACTOR if precision == "fp32" else 1.0)


def gpu_mem_bps(gpu) -> float:
    name = (gpu.name or "").upper()
    for key in sorted(GPU_MEM_BPS, key=len, reverse=True):
        if key.upper() in name:
            return GPU_MEM_BPS[key] * MEM_EFFICIENCY
    return DEFAULT_GPU_MEM_BPS * MEM_EFFICIENCY


def job_ranks(
    cluster: ClusterPlan,
    reports: Mapping[str, NodeReport],
    calibrated: Mapping[str, float] | None = None,
) -> list[Ranks]:
    """Per machine of the plan, one rank's speed: the slowest of its GPUs (its ranks wait
    for each other) or its share of the CPU; a calibrated figure wins."""
    calibrated = calibrated or {}
    per_rank = cluster.precision.split(",")
    out, index = [], 0
    for node in cluster.nodes:
        report = reports[node.name]
        precisions = [per_rank[min(index + i, len(per_rank) - 1)] for i in range(node.slots)]
        index += node.slots
        if node.accelerator == "cpu":
            flops, mem = cpu_flops(report, node.slots), CPU_MEM_BPS * MEM_EFFICIENCY / node.slots
        else:
            gpus = drivable_gpus(report)
            if node.devices:
                gpus = [g for g in gpus if g.index in node.devices]
            gpus = gpus[: node.slots]
            if gpus:
                flops = min(gpu_flops(g, p) for g, p in zip(gpus, precisions, strict=False))
                mem = min(gpu_mem_bps(g) for g in gpus)
            else:
                flops, mem = cpu_flops(report, node.slots), CPU_MEM_BPS * MEM_EFFICIENCY
        known = calibrated.get(node.name)
        out.append(Ranks(node.name, node.slots, node.accelerator, known or flops, mem, bool(known)))
    return out


def flops_from_tokens_per_s(tokens_per_s: float, params: int) -> float:
    """A rank's measured training tokens/s as the FLOP/s the model uses (6 x params)."""
    return 6 * params * tokens_per_s


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class StepPrediction:
    strategy: str
    compute_s: float
    comm_s: float  # the network's whole time (bandwidth and latency), overlapped or not
    total_s: float
    overlap: str
    network_share: float  # the share of total_s spent waiting on the network
    bottleneck: str
    assumed: tuple[str, ...] = ()
    detail: tuple[str, ...] = ()
    bytes_per_rank: float = 0.0
    copies_s: float = 0.0  # host<->device copies and CPU Adam (ZeRO-3 offload on a GPU)

    def line(self) -> str:
        return (
            f"predicted: {secs(self.total_s)} per step with {self.strategy} "
            f"({self.network_share:.0%} on the network; bottleneck: {self.bottleneck})"
            + (f"; {', '.join(self.assumed)}" if self.assumed else "")
        )


def _buckets(strategy: str) -> tuple[int, int]:
    """(reduce, gather) bucket sizes in elements of the shipped config."""
    if strategy == "bridge":
        return 0, 0
    zero = memory.zero3_settings(strategy)  # the configs' one reader
    reduce = int(zero.get("reduce_bucket_size", DEFAULT_BUCKET))
    gather = int(zero.get("allgather_bucket_size", zero.get("stage3_prefetch_bucket_size",
                                                             DEFAULT_BUCKET)))  # fmt: skip
    return reduce, gather


def collectives(shape, strategy: str) -> int:
    """Collectives per step: one per bucket (reduce and gather), ZeRO-3 at least one
    gather per layer in the forward and again in the backward; the bridge one."""
    if strategy == "bridge":
        return 1
    reduce, gather = _buckets(strategy)
    p = shape.params
    n_reduce = math.ceil(p / max(reduce, 1))
    if strategy.startswith("zero3"):
        return n_reduce + 2 * max(shape.layers, math.ceil(p / max(gather, 1)))
    return n_reduce + math.ceil(p / max(gather, 1))


def predict_step(
    shape,
    strategy: str,
    ranks: Sequence[Ranks],
    links: Links | None,
    tokens_per_rank: int | Sequence[int],
    precision: str,
) -> StepPrediction:
    """Seconds per optimizer step of `strategy` (one micro-step per step). tokens_per_rank:
    one figure for every rank, or one per rank in hostfile order (speed balancing)."""
    links = links or Links()
    if strategy not in VOLUME:
        raise ValueError(f"no cost model for {strategy!r} (known: {', '.join(STRATEGIES)})")
    world = sum(r.slots for r in ranks)
    per_rank = [r for r in ranks for _ in range(r.slots)]
    tokens = (
        [int(tokens_per_rank)] * world
        if isinstance(tokens_per_rank, int)
        else [int(t) for t in tokens_per_rank]
    )
    p = shape.params
    times = [6 * p * t / r.flops for t, r in zip(tokens, per_rank, strict=True)]
    compute = max(times)
    slowest_rank = per_rank[times.index(compute)]
    assumed: list[str] = []
    precision_of = "fp32" if strategy == "bridge" else precision.split(",")[0]
    width = 4 if strategy == "bridge" else GRAD_BYTES.get(precision_of, 4)
    volume = VOLUME[strategy] * (world - 1) / world * p * width if world > 1 else 0.0
    machines = [r.machine for r in ranks]
    crossing = ring(machines, links)
    slowest = crossing.slowest
    detail = [
        f"compute: 6 x {p / 1e9:.2f}B params x {max(tokens)} tokens / "
        f"{slowest_rank.flops / 1e12:.2f} TFLOP/s ({slowest_rank.machine}) = {secs(compute)}"
    ]
    comm = lat = 0.0
    if slowest is not None:
        link, bps = slowest
        comm = volume / bps
        lat = collectives(shape, strategy) * (world - 1) * crossing.rtt_s
        if crossing.assumed:
            assumed.append(ASSUMED_LINKS)
        detail.append(
            f"network: {VOLUME[strategy]} x {world - 1}/{world} x {p / 1e9:.2f}B x {width} B = "
            f"{volume / 1e9:.1f} GB per rank over {link_text(link, bps)} = {secs(comm)}, "
            f"+ {collectives(shape, strategy)} collectives x {world - 1} hops x "
            f"{crossing.rtt_s * 1e3:.1f} ms RTT = {secs(lat)}"
        )
    else:
        detail.append("network: none (one machine: its ranks talk through shared memory)")
    if not all(r.calibrated for r in ranks):
        assumed.append(ASSUMED_SPEEDS)
    copies = 0.0
    if strategy == "zero3-offload":
        for r in ranks:
            if r.accelerator == "cpu":
                continue
            share = p / world
            copies = max(copies, share * (2 * 2 + 4 + 2) / PCIE_BPS
                         + share / CPU_ADAM_PARAMS_PER_S)  # fmt: skip
        if copies:
            detail.append(f"offload: host<->GPU copies and CPU Adam = {secs(copies)}")
    if strategy in ("zero1", "zero2"):
        reduce, gather = comm / 2, comm / 2
        exposed = max(0.0, reduce - BACKWARD_SHARE * compute) + gather + lat
        overlap = (
            "the gradients' reduce-scatter overlaps the backward, the weights' all-gather does not"
        )
    else:
        exposed = comm + lat
        overlap = (
            "none: ZeRO-3 gathers every layer's weights on the critical path"
            if strategy.startswith("zero3")
            else "none: one all-reduce after the backward"
        )
    total = compute + exposed + copies
    share = exposed / total if total else 0.0
    if slowest is not None and exposed >= max(compute, copies):
        bottleneck = link_text(*slowest)
    elif copies > compute:
        bottleneck = "host<->GPU copies and CPU Adam (offload)"
    else:
        bottleneck = f"compute on {slowest_rank.machine}"
    return StepPrediction(
        strategy, compute, comm + lat, total, overlap, share, bottleneck, tuple(assumed),
        tuple(detail), volume, copies,
    )  # fmt: skip


# ---------------------------------------------------------------- inference

INFER_MODES = ("replicas", "tp", "zero")


@dataclass(frozen=True)
class TokenPrediction:
    mode: str
    seconds: float  # per generated token of one sequence
    tokens_per_s: float  # the whole job's: every replica (or ZeRO rank) generating at once
    network_share: float
    bottleneck: str
    assumed: tuple[str, ...] = ()
    detail: tuple[str, ...] = field(default_factory=tuple)

    def text(self) -> str:
        network = f"{self.network_share:.0%} on the network; " if self.network_share else ""
        return (
            f"predicted {secs(self.seconds)} per token, {self.tokens_per_s:.3g} tokens/s in "
            f"all ({network}bottleneck: {self.bottleneck})"
            + (f"; {', '.join(self.assumed)}" if self.assumed else "")
        )


def _device_token(weight_bytes: float, params: float, r: Ranks, split: int = 1) -> float:
    return max(weight_bytes / split / r.mem_bps, 2 * params / split / r.flops)


def predict_token(
    model_bytes: int, mode: str, ranks: Sequence[Ranks], links: Links | None = None
) -> TokenPrediction:
    """Seconds per generated token (batch 1) for one of infer's modes over `ranks` (the
    machines that run it: for tp, the one machine), and the job's tokens/s: every replica
    generates its own prompts, so do ZeRO's ranks (one gather serves them all), tp's ranks
    generate one sequence together. params = model_bytes / 2."""
    links = links or Links()
    params = model_bytes / INFER_WEIGHT_BYTES
    assumed: tuple[str, ...] = ()
    if mode == "replicas":
        times = {r.machine: _device_token(model_bytes, params, r) for r in ranks}
        rate = sum(r.slots / times[r.machine] for r in ranks)
        name = max(times, key=times.get)
        return TokenPrediction(mode, times[name], rate, 0.0, f"memory/compute on {name}",
                               assumed)  # fmt: skip
    if mode == "tp":
        r = ranks[0]
        layers_lat = 2 * _layers(model_bytes) * LOCAL_LATENCY_S if r.slots > 1 else 0.0
        seconds = _device_token(model_bytes, params, r, r.slots) + layers_lat
        return TokenPrediction(mode, seconds, 1 / seconds, 0.0, f"memory/compute on {r.machine}",
                               assumed)  # fmt: skip
    if mode != "zero":
        raise ValueError(f"no cost model for inference mode {mode!r}")
    world = sum(r.slots for r in ranks)
    compute = max(_device_token(model_bytes, params, r) for r in ranks)
    crossing = ring([r.machine for r in ranks], links)
    slowest = crossing.slowest
    if slowest is None or world < 2:
        return TokenPrediction(mode, compute, world / compute, 0.0,
                               f"memory/compute on {ranks[0].machine}", assumed)  # fmt: skip
    link, bps = slowest
    net = model_bytes * (world - 1) / world / bps
    net += _layers(model_bytes) * (world - 1) * crossing.rtt_s
    if crossing.assumed:
        assumed += (ASSUMED_LINKS,)
    total = compute + net
    detail = (f"every token gathers {(world - 1) / world:.2f} x {model_bytes / 1e9:.1f} GB "
              f"over {link_text(link, bps)}",)  # fmt: skip
    return TokenPrediction(mode, total, world / total, net / total,
                           link_text(link, bps) if net >= compute else "compute", assumed,
                           detail)  # fmt: skip


def _layers(model_bytes: float) -> int:
    """Layers when only the size is known: ~32 for a 7B model, scaling with the cube root."""
    return max(1, round(32 * (model_bytes / 14e9) ** (1 / 3)))
