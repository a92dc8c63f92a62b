"""The cost model with worked numbers (planning/cost.py's docstring has the formulas).

Issue #31's figures: an 8B model in bf16 on two machines over 1 GbE (117 MB/s) moves
16 GB a step per rank with data parallel (~140 s) and 24 GB with ZeRO-3 (~200 s).
"""

import pytest
from unitdata import inv, rep

from deepfleet.planning import cost, memory
from deepfleet.planning.plan import plan_cluster

GIB = 1 << 30
EIGHT_B = memory.ModelShape(
    params=8_000_000_000, largest_layer_params=128256 * 4096, layers=32, hidden_size=4096,
    heads=32, vocab_size=128256, name="8B",
)  # fmt: skip
LLAMA2_7B = memory.ModelShape(
    params=6_738_415_616, largest_layer_params=32000 * 4096, layers=32, hidden_size=4096,
    heads=32, vocab_size=32000, name="Llama-2-7B",
)  # fmt: skip
H100 = 989e12 * cost.GPU_MFU  # 395.6 TFLOP/s achieved
H100_MEM = 3.35e12 * cost.MEM_EFFICIENCY  # 2.01 TB/s read while decoding


def h100s(*machines, slots=1):
    return [cost.Ranks(m, slots, "cuda", H100, H100_MEM) for m in machines]


def test_data_parallel_and_zero3_reproduce_the_issue_figures_on_1gbe():
    ranks = h100s("a", "b")
    dp = cost.predict_step(EIGHT_B, "zero2", ranks, None, 4096, "bf16")
    z3 = cost.predict_step(EIGHT_B, "zero3", ranks, None, 4096, "bf16")
    # 2 x (2-1)/2 x 8e9 x 2 bytes = 16 GB; 3 x 1/2 x 8e9 x 2 = 24 GB per rank
    assert dp.bytes_per_rank == pytest.approx(16e9) and z3.bytes_per_rank == pytest.approx(24e9)
    # 16e9 / 117e6 = 136.75 s, plus 160 + 160 buckets x 1 hop x 0.5 ms = 0.16 s
    assert dp.comm_s == pytest.approx(136.75 + 0.16, abs=0.01)
    # 24e9 / 117e6 = 205.13 s, plus (160 + 2 x 160) collectives x 0.5 ms = 0.24 s
    assert z3.comm_s == pytest.approx(205.13 + 0.24, abs=0.01)
    assert z3.comm_s / dp.comm_s == pytest.approx(1.5, abs=0.01)
    # compute: 6 x 8e9 x 4096 / 395.6e12 = 0.497 s; the network is the bottleneck
    assert dp.compute_s == pytest.approx(0.497, abs=0.001)
    assert dp.bottleneck == "the a-b link, 117 MB/s" and dp.network_share > 0.99
    assert "; assumed 1 GbE for links not measured" in dp.line()
    # ZeRO-2 hides the reduce-scatter behind the backward, not the weights' all-gather
    assert dp.total_s == pytest.approx(0.497 + (136.75 / 2 - 0.497 * 2 / 3) + 136.75 / 2 + 0.16,
                                       abs=0.01)  # fmt: skip
    assert z3.total_s == pytest.approx(0.497 + 205.37, abs=0.01)
    assert z3.total_s > 1.4 * dp.total_s


def test_fp32_moves_twice_the_bytes_and_the_bridge_reduces_in_fp32():
    ranks = [cost.Ranks(m, 1, "cpu", 4e11) for m in ("a", "b", "c")]
    fp32 = cost.predict_step(LLAMA2_7B, "zero2", ranks, None, 512, "fp32")
    # 2 x 2/3 x 6.738e9 x 4 = 35.94 GB
    assert fp32.bytes_per_rank == pytest.approx(35.94e9, rel=1e-3)
    bridge = cost.predict_step(LLAMA2_7B, "bridge", ranks, None, 512, "bf16")
    assert bridge.bytes_per_rank == pytest.approx(fp32.bytes_per_rank)
    assert bridge.overlap.startswith("none")
    # one all-reduce, 2 hops, 0.5 ms: 35.94e9 / 117e6 + 0.001
    assert bridge.comm_s == pytest.approx(307.2 + 0.001, abs=0.1)


def test_a_link_ten_times_slower_is_named_as_the_bottleneck():
    links = cost.Links.from_records([
        {"a": "lab1", "b": "lab2", "a_to_b_bps": 117e6, "b_to_a_bps": 117e6, "rtt_s": 3e-4,
         "measured_at": 1.7e9},
        {"a": "lab2", "b": "lab3", "a_to_b_bps": 11.7e6, "b_to_a_bps": 117e6, "rtt_s": 3e-4,
         "measured_at": 1.7e9},
        {"a": "lab3", "b": "lab1", "a_to_b_bps": 117e6, "b_to_a_bps": 117e6, "rtt_s": 3e-4,
         "measured_at": 1.7e9},
    ])  # fmt: skip
    ranks = h100s("lab1", "lab2", "lab3")
    got = cost.predict_step(LLAMA2_7B, "zero2", ranks, links, 2048, "bf16")
    assert got.bottleneck == "the lab2-lab3 link, 12 MB/s"
    assert got.assumed == (cost.ASSUMED_SPEEDS,)  # every link on the ring measured
    # 2 x 2/3 x 6.738e9 x 2 B = 17.97 GB over 11.7 MB/s: 1536 s
    assert got.comm_s == pytest.approx(17.97e9 / 11.7e6, rel=0.01)
    fast = cost.predict_step(LLAMA2_7B, "zero2", ranks, cost.Links(links.links[:1]), 2048, "bf16")
    assert got.total_s > 8 * fast.total_s


def test_one_machine_has_no_network_term():
    ranks = h100s("dgx", slots=8)
    got = cost.predict_step(EIGHT_B, "zero3", ranks, None, 4096, "bf16")
    assert got.comm_s == 0 and got.network_share == 0
    assert got.total_s == pytest.approx(got.compute_s) and got.bottleneck == "compute on dgx"
    assert cost.ASSUMED_LINKS not in got.assumed


def test_the_slowest_rank_decides_compute_and_speed_balancing_evens_it():
    ranks = [cost.Ranks("fast", 1, "cuda", 4e14), cost.Ranks("slow", 1, "cuda", 1e14)]
    even = cost.predict_step(EIGHT_B, "zero2", ranks, None, 4096, "bf16")
    assert even.compute_s == pytest.approx(6 * 8e9 * 4096 / 1e14)
    balanced = cost.predict_step(EIGHT_B, "zero2", ranks, None, [6554, 1638], "bf16")
    assert balanced.compute_s == pytest.approx(6 * 8e9 * 1638 / 1e14, rel=1e-3)


def test_speeds_from_reports_the_tables_and_calibration():
    gpu = {"index": 0, "vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3",
           "memory_bytes": 80 * GIB, "compute_capability": "9.0", "driver": "580"}  # fmt: skip
    versions = {"python": "3.11.2", "torch": "2.13.0+cu130", "deepspeed": "0.19.8",
                "transformers": "5.23.0", "cuda": "13.0"}  # fmt: skip
    reports = {
        "g": rep(accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu], versions=versions,
                 torch_arch_list=["sm_90"]),
        "c": rep(cpu_count=8, cpu_quota=2.0),
    }  # fmt: skip
    gpu_plan = plan_cluster(inv("g", "c"), reports)
    (g,) = cost.job_ranks(gpu_plan, reports)
    assert g.flops == pytest.approx(989e12 * 0.4)
    cpu_plan = plan_cluster(inv("g", "c"), reports, backend="cpu", cpu_slots=2)
    (c,) = cost.job_ranks(cpu_plan, reports)
    # quota 2 cores x 50 GFLOP/s x 0.5, shared by 2 ranks
    assert c.flops == pytest.approx(25e9) and not c.calibrated
    (c,) = cost.job_ranks(cpu_plan, reports, {"c": 7e9})
    assert c.flops == 7e9 and c.calibrated
    assert cost.flops_from_tokens_per_s(100, 1_000_000) == 6e8


def test_links_records_are_unordered_pairs_and_bad_records_are_assumed():
    links = cost.Links.from_records([
        {"a": "x", "b": "y", "a_to_b_bps": 5e6, "b_to_a_bps": 7e6, "rtt_s": 0.004,
         "measured_at": 1.0},
        {"a": "y", "b": "z"},
    ])  # fmt: skip
    link = links.between("y", "x")
    assert link.bps("y", "x") == 7e6 and link.bps("x", "y") == 5e6 and not link.assumed
    assumed = links.between("y", "z")
    assert assumed.assumed and assumed.a_to_b_bps == cost.LINK_1GBE_BPS
    assert cost.Links.from_records(None).links == ()


def test_zero_inference_gathers_every_weight_per_token_over_the_lan():
    ranks = h100s("a", "b")
    weights = 140e9  # a 70B model in bf16
    zero = cost.predict_token(int(weights), "zero", ranks)
    # 140e9 x 1/2 / 117e6 = 598.3 s a token, + 140e9 / 2.01e12 = 0.07 s reading them,
    # + 69 layers x 1 hop x 0.5 ms
    assert zero.seconds == pytest.approx(598.3 + 0.07 + 0.03, abs=0.05)
    assert zero.bottleneck.startswith("the a-b link") and zero.network_share > 0.99
    assert zero.tokens_per_s == pytest.approx(2 / zero.seconds)  # each rank its own prompt
    small = 14e9  # 7B: an H100 reads it in 14e9 / (3.35e12 x 0.6) = 7.0 ms
    rep_ = cost.predict_token(int(small), "replicas", ranks)
    assert rep_.seconds == pytest.approx(14e9 / (3.35e12 * 0.6), rel=1e-3)
    tp = cost.predict_token(int(small), "tp", h100s("a", slots=4))
    assert tp.seconds < rep_.seconds and tp.network_share == 0
    assert rep_.tokens_per_s == pytest.approx(2 / rep_.seconds)  # 2 replicas
    assert tp.tokens_per_s == pytest.approx(1 / tp.seconds)  # one sequence
    assert cost.predict_token(int(small), "zero", h100s("a", slots=4)).network_share == 0
