"""Training plans across unlike machines: backend, slots, micro-batch per rank, memory fit.

Reports are synthetic (detect's JSON shape) with real model sizes: Llama-2-7B's
6,738,415,616 parameters as transformers' LlamaConfig() builds it on the meta device.
"""

import json

import pytest
from unitdata import inv, rep

from deepfleet.errors import PlanError
from deepfleet.jobs.launch import launcher_argv
from deepfleet.planning import memory, trainplan
from deepfleet.planning.hostfile import render_hostfile
from deepfleet.planning.plan import plan_cluster

GIB = 1 << 30
LLAMA2_7B = memory.ModelShape(
    params=6_738_415_616, largest_layer_params=32000 * 4096, layers=32, hidden_size=4096,
    heads=32, vocab_size=32000, name="Llama-2-7B",
)  # fmt: skip
# a 125M model (GPT-2 small's shape): fits a laptop
SMALL = memory.ModelShape(125_000_000, 50257 * 768, 12, 768, 12, 50257, "small")
CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


def nvidia(i, name="NVIDIA H100 80GB HBM3", memory=80 * GIB, cc="9.0"):
    return {"index": i, "vendor": "nvidia", "name": name, "memory_bytes": memory,
            "compute_capability": cc, "driver": "580.65.06", "runtime": "13.0"}  # fmt: skip


def radeon(i, memory=24 * GIB):
    return {"index": i, "vendor": "amd", "name": "AMD Radeon RX 7900 XTX",
            "memory_bytes": memory, "gfx_target": "gfx1100"}  # fmt: skip


def cuda_machine(*gpus, ram=2048 * GIB, **over):
    versions = {"python": "3.11.2", "torch": "2.13.0+cu130", "deepspeed": "0.19.8",
                "transformers": "5.23.0", "cuda": "13.0"}  # fmt: skip
    return rep(accelerator="cuda", gpu_vendor="nvidia", gpus=list(gpus), memory_bytes=ram,
               versions=versions, torch_arch_list=CU130_ARCHS, cpu_count=64, **over)  # fmt: skip


def rocm_machine(*gpus, ram=128 * GIB):
    return rep(accelerator="rocm", gpu_vendor="amd", gpus=list(gpus), memory_bytes=ram,
               cpu_count=32)  # fmt: skip


def train_plan(names, reports, shape, config="zero2", micro=4, seq=1024, **kw):
    cluster = plan_cluster(inv(*names), reports, **kw)
    return trainplan.plan_training(cluster, reports, shape, config, seq, micro)


# ---- the fleet from the issue: 8x80 GB + 4x24 GB AMD + 1x8 GB, and a CPU laptop


def fleet():
    return {
        "dgx": cuda_machine(*[nvidia(i) for i in range(8)]),
        "amd": rocm_machine(*[radeon(i) for i in range(4)]),
        "desk": cuda_machine(nvidia(0, "NVIDIA GeForce RTX 4060", 8 * GIB, "8.9"), ram=64 * GIB),
        "laptop": rep(cpu_count=8, memory_bytes=16 * GIB),
    }


def test_the_fleet_runs_on_nvidia_and_names_who_sits_out():
    tp = train_plan(["dgx", "amd", "desk", "laptop"], fleet(), SMALL, micro=2)
    assert [(n.name, n.slots) for n in tp.cluster.nodes] == [("dgx", 8), ("desk", 1)]
    assert tp.cluster.backend == "nccl" and tp.cluster.precision == "bf16"
    reasons = {x.name: (x.reason, x.override) for x in tp.cluster.left_out}
    assert reasons["amd"] == (
        "rocm while the job runs on cuda (one job needs one backend)",
        "--backend rocm",
    )
    assert reasons["laptop"][1] == "--backend cpu"
    # micro-batch per rank by rated speed: each H100 far ahead of the 4060
    assert len(tp.shares) == 9 and sum(tp.shares) == 2 * 9
    assert tp.shares[-1] == 1 and min(tp.shares[:8]) >= 2
    assert tp.verdict.fits and tp.config == "zero2"


def test_llama2_7b_does_not_fit_the_8gb_card_and_the_refusal_says_what_would():
    with pytest.raises(PlanError) as err:
        train_plan(["dgx", "amd", "desk", "laptop"], fleet(), LLAMA2_7B, micro=1, seq=512)
    line = err.value.one_line()
    assert line.startswith("desk: Llama-2-7B (6.74B params) does not fit with zero2")
    assert "desk GPU 0 needs" in line and "has 8.0 GiB" in line
    # ZeRO-3 keeps up to stage3_max_live_parameters (1e9) gathered on the GPU: 2 GB alone
    assert "CONFIG=zero3" not in line and "SLOTS=desk=0 (leave desk out)" in line
    assert "\n" not in line


def test_config_auto_picks_the_cheapest_setting_that_fits_every_machine():
    # without the small card zero2 fits: 2P + 18P/8 = 28 GiB per H100, plus activations
    tp = train_plan(["dgx"], {"dgx": fleet()["dgx"]}, LLAMA2_7B, config="auto")
    assert tp.config == "zero2" and tp.verdict.fits
    # with the 8 GB card no config fits it: auto leaves it out, naming what it lacked
    reports = fleet()
    cluster = plan_cluster(inv("dgx", "desk"), reports)

    def replan(extra):
        return plan_cluster(inv("dgx", "desk"), reports, slots=extra)

    tp = trainplan.plan_training(cluster, reports, LLAMA2_7B, "auto", 512, 1, "speed", replan)
    assert tp.config == "zero2" and tp.slots == {"desk": 0}
    assert [n.name for n in tp.cluster.nodes] == ["dgx"]
    (out,) = [x for x in tp.cluster.left_out if x.name == "desk"]
    assert out.reason.startswith("desk GPU 0 needs") and "under every ZeRO config" in out.reason
    assert "  desk         left out: desk GPU 0 needs" in trainplan.describe(tp)
    # without a way to re-plan (an explicit config), the same job is refused naming desk
    with pytest.raises(PlanError, match="^Llama-2-7B .* does not fit with zero3-offload"):
        trainplan.plan_training(cluster, reports, LLAMA2_7B, "auto", 512, 1)


def test_zero3_partitions_states_so_a_model_too_big_for_each_gpu_fits_across_them():
    eight = {"amd": rocm_machine(*[radeon(i, 32 * GIB) for i in range(8)], ram=512 * GIB)}
    with pytest.raises(PlanError, match="does not fit with zero2.*would fit: CONFIG=zero3,"):
        train_plan(["amd"], eight, LLAMA2_7B, micro=1, seq=512)
    tp = train_plan(["amd"], eight, LLAMA2_7B, config="auto", micro=1, seq=512)
    assert tp.config == "zero3"
    gpu0 = tp.verdict.devices[0]
    # 4 x largest layer + 18 bytes x P / 8 GPUs, the gathered working set, activations
    states = 4 * LLAMA2_7B.largest_layer_params + int(18 * LLAMA2_7B.params / 8)
    working = memory.zero3_working_set(LLAMA2_7B, "zero3", "bf16")
    assert states + working < gpu0.need < 32 * GIB


def test_one_machine_with_two_gpu_models_shares_by_speed_and_the_small_one_decides_fit():
    mixed = cuda_machine(nvidia(0, "NVIDIA A100-SXM4-80GB", 80 * GIB, "8.0"),
                         nvidia(1, "NVIDIA GeForce RTX 3060", 12 * GIB, "8.6"))  # fmt: skip
    tp = train_plan(["m"], {"m": mixed}, SMALL, micro=7, seq=256)
    assert tp.cluster.nodes[0].slots == 2 and tp.cluster.precision == "bf16"
    assert tp.shares == (13, 1)  # 312 vs 25 rated TFLOPS, at least one each
    wheres = [d.where for d in tp.verdict.devices]
    assert wheres == ["GPU 0", "GPU 1", "RAM"]


def test_gpus_the_images_torch_cannot_drive_sit_out_and_the_ranks_skip_them():
    kepler = nvidia(1, "Tesla K80", 12 * GIB, "3.7")
    box = cuda_machine(nvidia(0), kepler, nvidia(2))
    cluster = plan_cluster(inv("box", "old"), {"box": box, "old": cuda_machine(kepler)})
    node = cluster.nodes[0]
    assert (node.name, node.slots, node.devices) == ("box", 2, (0, 2))
    out = {x.name: x.reason for x in cluster.left_out}
    assert "compute 3.7" in out["box GPU 1"] and "compute 3.7" in out["old"]
    # the hostfile lists devices 0..2 and the launcher includes only 0 and 2
    assert render_hostfile(cluster) == "10.0.0.1 slots=3\n"
    argv = launcher_argv(cluster, "deepfleet_node.train", [])
    assert argv[argv.index("--include") + 1] == "10.0.0.1:0,2"


def test_a_2gib_cgroup_limit_is_the_room_that_counts():
    roomy = rep(cpu_count=2, memory_bytes=24 * GIB)
    limited = rep(cpu_count=2, memory_bytes=24 * GIB, memory_limit_bytes=2 * GIB, cpu_quota=0.3)
    medium = memory.ModelShape(100_000_000, 32000 * 512, 8, 512, 8, 32000, "medium")
    reports = {"a": roomy, "b": roomy, "c": limited}
    with pytest.raises(PlanError) as err:
        train_plan(["a", "b", "c"], reports, medium, micro=2, seq=128)
    line = err.value.one_line()
    assert line.startswith("c: medium (0.10B params) does not fit with zero2")
    assert "has 2.0 GiB" in line and "SLOTS=c=0 (leave c out)" in line
    # CPU ranks by cores: 2, 2 and a 0.3-core quota
    tp = train_plan(["a", "b", "c"], reports, None, micro=2, seq=128)
    assert tp.shares == (3, 2, 1) and tp.speeds[2] == pytest.approx(0.15)
    # auto: c sits out (no ZeRO stage fits it), a and b train
    cluster = plan_cluster(inv("a", "b", "c"), reports)

    def replan(extra):
        return plan_cluster(inv("a", "b", "c"), reports, slots=extra)

    tp = trainplan.plan_training(cluster, reports, medium, "auto", 128, 2, "speed", replan)
    assert tp.config == "zero2" and tp.slots == {"c": 0} and tp.shares == (2, 2)


def test_memory_need_grows_with_micro_batch_and_a_smaller_one_is_offered():
    reports = {"a": rep(cpu_count=4, memory_bytes=6 * GIB)}
    ranks = [memory.Rank("a", 1, "cpu")]
    need = [
        memory.machine_fits(SMALL, "zero2", ranks, reports, 512, b, "fp32").devices[0].need
        for b in (1, 4, 16)
    ]
    assert need[0] < need[1] < need[2]
    best = memory.largest_micro_batch(SMALL, "zero2", ranks, reports, 512, 64, "fp32")
    assert 1 <= best < 64
    with pytest.raises(PlanError, match=f"--micro-batch {best}"):
        trainplan.plan_training(plan_cluster(inv("a"), reports), reports, SMALL, "zero2", 512, 64)


def test_without_a_model_the_plan_still_shows_slots_and_micro_batches():
    reports = {"a": rep(cpu_count=4), "b": rep(cpu_count=2)}
    tp = train_plan(["a", "b"], reports, None, micro=3)
    assert tp.verdict is None and tp.shares == (4, 2)
    text = trainplan.describe(tp)
    assert "micro-batch per rank: a 4, b 2" in text
    even = trainplan.plan_training(tp.cluster, reports, None, "zero2", 64, 3, balance="even")
    assert even.shares == (3, 3)
    assert json.loads(json.dumps(trainplan.as_dict(tp)))["ranks"][1] == {
        "machine": "b", "micro_batch": 2, "speed": 0.5,
    }  # fmt: skip


@pytest.mark.parametrize(
    "speeds,total,expected",
    [([1, 1], 8, [4, 4]), ([3, 1], 8, [6, 2]), ([1, 0.5, 0.3], 12, [7, 3, 2]),
     ([100, 1, 1], 4, [2, 1, 1]), ([1, 1, 1], 3, [1, 1, 1])],
)  # fmt: skip
def test_split_is_proportional_sums_to_total_and_gives_everyone_one(speeds, total, expected):
    shares = trainplan.split(speeds, total)
    assert shares == expected and sum(shares) == total
    with pytest.raises(ValueError):
        trainplan.split([1, 1, 1], 2)


def test_a_mixed_world_keeps_every_accelerator_and_talks_over_gloo():
    reports = fleet()
    names = ["dgx", "amd", "desk", "laptop"]
    mixed = plan_cluster(inv(*names), reports, mixed=True)
    assert [(n.name, n.accelerator, n.slots) for n in mixed.nodes] == [
        ("dgx", "cuda", 8), ("amd", "rocm", 4), ("desk", "cuda", 1), ("laptop", "cpu", 1),
    ]  # fmt: skip
    assert mixed.backend == "gloo" and mixed.env["DEEPFLEET_BACKEND"] == "gloo"
    # the operator decides each rank's precision: bf16 on the H100s (sm 9.0), the Radeons
    # (gfx1100, RDNA3) and the 4060 (sm 8.9), fp32 on the CPU rank
    assert mixed.precision == ",".join(["bf16"] * 13 + ["fp32"]) and mixed.left_out == ()
    # the CPU ranks' thread pools are sized from the CPU machines only
    assert mixed.env["OMP_NUM_THREADS"] == "8"
    # --backend still narrows it to one group
    assert plan_cluster(inv(*names), reports, mixed=True, backend="rocm").backend == "nccl"
    # replicas: one copy per GPU, the CPU machine's slots
    from deepfleet.planning import inferplan

    chosen = inferplan.choose(mixed, reports, 250_000_000, "auto")
    assert chosen.mode == "replicas" and chosen.slots == {"dgx": 8, "amd": 4, "desk": 1,
                                                           "laptop": 1}  # fmt: skip


def test_bridge_needs_the_whole_model_states_on_every_rank():
    reports = {"gpu": cuda_machine(nvidia(0, "NVIDIA GeForce RTX 4090", 24 * GIB, "8.9")),
               "cpu": rep(cpu_count=8, memory_bytes=32 * GIB)}  # fmt: skip
    ranks = [memory.Rank("gpu", 1, "cuda"), memory.Rank("cpu", 1, "cpu")]
    verdict = memory.machine_fits(SMALL, memory.BRIDGE, ranks, reports, 256, 2, "fp32")
    gpu = verdict.devices[0]
    assert gpu.where == "GPU 0" and gpu.need > 16 * SMALL.params and verdict.fits
    with pytest.raises(PlanError, match="does not fit with bridge"):
        memory.check(LLAMA2_7B, memory.BRIDGE, ranks, reports, 256, 1, "fp32")


def test_speed_balance_never_hands_a_machine_more_than_its_memory_holds():
    # a fast roomy machine and a slow one; the fast one's RAM caps its share
    reports = {"fast": rep(cpu_count=8, memory_bytes=24 * GIB, memory_limit_bytes=3 * GIB),
               "slow": rep(cpu_count=1, memory_bytes=24 * GIB)}  # fmt: skip
    medium = memory.ModelShape(60_000_000, 32000 * 512, 8, 512, 8, 32000, "medium")
    tp = train_plan(["fast", "slow"], reports, medium, micro=4, seq=256)
    assert tp.caps is not None and tp.caps[0] < 8 <= tp.caps[1]
    assert tp.shares[0] == tp.caps[0] and sum(tp.shares) == 8  # 8:1 speed, held at the cap
    ranks = [memory.Rank("fast", 1, "cpu"), memory.Rank("slow", 1, "cpu")]
    at_cap = memory.machine_fits(medium, "zero2", ranks, reports, 256, tp.caps[0], "fp32")
    over = memory.machine_fits(medium, "zero2", ranks, reports, 256, tp.caps[0] + 1, "fp32")
    assert at_cap.devices[0].fits and not over.devices[0].fits
    assert "the most a rank's memory holds per micro-step: fast" in trainplan.describe(tp)


def test_a_job_on_one_machine_that_is_not_the_launchers_is_launched_over_ssh():
    reports = {"a": rep(), "b": rep()}
    alone = plan_cluster(inv("a", "b"), reports, slots={"a": 0})
    argv = launcher_argv(alone, "deepfleet_node.train", [], launcher_node="a")
    assert "--force_multi" in argv  # DeepSpeed would run a one-host file on `a` itself
    both = plan_cluster(inv("a", "b"), reports)
    assert "--force_multi" not in launcher_argv(both, "m", [], launcher_node="a")
    on_a = plan_cluster(inv("a", "b"), reports, slots={"b": 0})
    assert "--force_multi" not in launcher_argv(on_a, "m", [], launcher_node="a")


def test_the_operator_decides_the_job_precision_from_every_gpu_once():
    """One rule (deepfleet_node.precision) over the reports: a T4 (sm 7.5, bf16 only by
    emulation) among A100s makes the whole job fp16; A100s alone bf16; no GPU fp32."""
    a100 = cuda_machine(nvidia(0, "NVIDIA A100-SXM4-80GB", 80 * GIB, "8.0"))
    t4 = cuda_machine(nvidia(0, "Tesla T4", 16 * GIB, "7.5"))
    assert plan_cluster(inv("a", "t"), {"a": a100, "t": t4}).precision == "fp16"
    assert plan_cluster(inv("a"), {"a": a100}).precision == "bf16"
    mi100 = rocm_machine(
        {"index": 0, "vendor": "amd", "name": "AMD Instinct MI100", "memory_bytes": 32 * GIB,
         "gfx_target": "gfx908"}
    )  # fmt: skip
    assert plan_cluster(inv("m"), {"m": mi100}).precision == "fp16"
    assert plan_cluster(inv("c"), {"c": rep(cpu_count=4)}).precision == "fp32"


# ---- the cost model in the plan (planning/cost.py): predicted step, candidates, auto


def test_the_plan_predicts_every_candidate_and_names_a_config_twice_as_fast():
    reports = {"dgx": fleet()["dgx"]}
    tp = train_plan(["dgx"], reports, SMALL, config="zero3-offload", micro=2)
    assert [c.config for c in tp.candidates] == ["zero1", "zero2", "zero3", "zero3-offload"]
    assert all(c.fits for c in tp.candidates)
    # one machine: no network; offload's copies and CPU Adam dwarf the compute of 2 x 1024
    # tokens per H100: 6 x 125e6 x 2048 / 395.6e12 = 3.9 ms
    assert tp.prediction.strategy == "zero3-offload" and tp.prediction.comm_s == 0
    assert tp.candidates[1].prediction.total_s == pytest.approx(0.00388, rel=0.01)
    assert tp.faster.config == "zero2"  # the tie with zero1 goes to auto's order
    text = trainplan.describe(tp)
    assert "predicted: " in text and "with zero3-offload (0% on the network" in text
    assert "faster: zero2 fits memory and is predicted" in text
    assert "CONFIG=zero2 (--config zero2)" in text
    rows = trainplan.candidate_lines(tp)
    assert rows[0].startswith("candidates") and rows[-1].startswith(" *zero3-offload")
    assert trainplan.as_dict(tp)["prediction"]["strategy"] == "zero3-offload"
    assert len(trainplan.as_dict(tp)["candidates"]) == 4
    # the fastest already: no such line
    assert train_plan(["dgx"], reports, SMALL).faster is None


def test_the_prediction_names_a_slow_link_and_auto_keeps_zero2():
    from deepfleet.planning import cost

    reports = {"a": fleet()["dgx"], "b": fleet()["dgx"]}
    links = cost.Links.from_records(
        [
            {
                "a": "a",
                "b": "b",
                "a_to_b_bps": 11.7e6,
                "b_to_a_bps": 117e6,
                "rtt_s": 1e-3,
                "measured_at": 1.0,
            }
        ]
    )
    cluster = plan_cluster(inv("a", "b"), reports)
    tp = trainplan.plan_training(cluster, reports, LLAMA2_7B, "auto", 1024, 2, links=links)
    assert tp.config == "zero2" and tp.prediction.bottleneck == "the a-b link, 12 MB/s"
    # 2 x 15/16 x 6.738e9 x 2 bytes = 25.3 GB over 11.7 MB/s
    assert tp.prediction.comm_s == pytest.approx(25.27e9 / 11.7e6, rel=0.01)
    assert "assumed 1 GbE" not in trainplan.describe(tp)
    z3 = next(c for c in tp.candidates if c.config == "zero3")
    assert z3.prediction.total_s > 1.4 * tp.prediction.total_s and tp.faster is None
    # no links given: 1 GbE assumed, and the plan says so
    assumed = trainplan.plan_training(cluster, reports, LLAMA2_7B, "auto", 1024, 2)
    assert "assumed 1 GbE for links not measured" in trainplan.describe(assumed)


def test_auto_takes_the_fastest_predicted_config_that_fits():
    reports = {"dgx": fleet()["dgx"]}
    ranks = [memory.Rank("dgx", 8, "cuda")]
    times = {"zero2": 3.0, "zero3": 1.0, "zero3-offload": 2.0}
    args = (ranks, reports, 1024, 2, "bf16")
    assert memory.choose_config(SMALL, *args).config == "zero2"  # no predictions: cheapest
    assert memory.choose_config(SMALL, *args, times.get).config == "zero3"
    tied = {"zero2": 1.0, "zero3": 1.0, "zero3-offload": 1.0}
    assert memory.choose_config(SMALL, *args, tied.get).config == "zero2"
