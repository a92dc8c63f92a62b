import json

import pytest
from unitdata import detect_report

from deepfleet.errors import PlanError
from deepfleet.inventory.nodes import Inventory, NodeSpec
from deepfleet.planning import reports
from deepfleet.planning.inferplan import choose
from deepfleet.planning.plan import plan_cluster

GB = 10**9


def gpu(i, mem_gb):
    return {"index": i, "vendor": "nvidia", "name": "GPU", "memory_bytes": mem_gb * GB}


def cluster(*gpu_counts, mem_gb=24):
    names = [f"n{i}" for i in range(len(gpu_counts))]
    inv = Inventory(
        tuple(
            NodeSpec(n, f"10.0.0.{i + 1}", "root", 22, None, "/dev/null")
            for i, n in enumerate(names)
        ),
        None,
    )
    reps = {
        n: reports.parse(
            json.dumps(
                detect_report(
                    accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu(i, mem_gb) for i in range(c)]
                )
            )
        )
        for n, c in zip(names, gpu_counts, strict=True)
    }
    return plan_cluster(inv, reps), reps


def test_small_model_gets_a_replica_per_gpu():
    plan, reps = cluster(2, 1)
    got = choose(plan, reps, 7 * GB, "auto")
    assert got.mode == "replicas" and got.slots == {"n0": 2, "n1": 1}
    assert "smallest device has 24.0 GB" in got.reason


def test_model_larger_than_a_gpu_goes_tensor_parallel_on_the_biggest_node():
    plan, reps = cluster(1, 4)
    got = choose(plan, reps, 40 * GB, "auto")
    assert got.mode == "tp" and got.slots == {"n0": 0, "n1": 4}
    assert "n1's 4 devices" in got.reason


def test_model_larger_than_any_node_goes_zero_across_all():
    plan, reps = cluster(2, 2)
    got = choose(plan, reps, 70 * GB, "auto")
    assert got.mode == "zero" and got.slots == {"n0": 2, "n1": 2}


def test_model_larger_than_the_cluster_is_refused():
    plan, reps = cluster(1, 1)
    with pytest.raises(PlanError, match="whole cluster has 48.0 GB"):
        choose(plan, reps, 100 * GB, "auto")


def test_cpu_replicas_are_one_per_node_and_explicit_modes_win():
    inv = Inventory(
        tuple(
            NodeSpec(n, f"10.0.0.{i}", "root", 22, None, "/dev/null") for i, n in enumerate("ab")
        ),
        None,
    )
    reps = {n: reports.parse(json.dumps(detect_report())) for n in "ab"}
    assert choose(plan_cluster(inv, reps), reps, 10**6, "auto").slots == {"a": 1, "b": 1}
    plan = plan_cluster(inv, reps, cpu_slots=2)
    assert choose(plan, reps, 10**6, "auto").slots == {"a": 2, "b": 2}
    assert choose(plan, reps, None, "auto").mode == "replicas"
    assert choose(plan, reps, 10**6, "zero").slots == {"a": 2, "b": 2}
    assert choose(plan, reps, 10**6, "tp").slots == {"a": 2, "b": 0}
    with pytest.raises(PlanError, match="unknown inference mode"):
        choose(plan, reps, 1, "pipeline")


def test_auto_never_keeps_a_mode_twenty_times_slower_than_another_that_fits():
    # n0: one 80 GB GPU, n1: one 24 GB GPU; a 40 GB model fits n0 alone: ZeRO-3 across the
    # two machines would gather 50 GB... every token over 1 GbE, the order's old choice
    inv = Inventory(
        tuple(NodeSpec(n, f"10.0.0.{i + 1}", "root", 22, None, "/dev/null")
              for i, n in enumerate(("n0", "n1"))),
        None,
    )  # fmt: skip
    reps = {
        n: reports.parse(json.dumps(detect_report(
            accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu(0, mem)])))
        for n, mem in (("n0", 80), ("n1", 24))
    }  # fmt: skip
    plan = plan_cluster(inv, reps)
    got = choose(plan, reps, 40 * GB, "auto")
    assert got.mode == "replicas" and got.slots == {"n0": 1, "n1": 0}
    assert "one copy per device on n0, not zero (predicted" in got.reason
    assert "x slower" in got.reason and got.prediction.mode == "replicas"
    # 40e9 / (0.5e12 x 0.6) = 0.133 s a token on a GPU of unknown bandwidth
    assert got.prediction.seconds == pytest.approx(40e9 / 0.3e12, rel=1e-3)
    assert choose(plan, reps, 40 * GB, "zero").prediction.bottleneck == "the n0-n1 link, 117 MB/s"


def test_zero_when_nothing_else_fits_says_its_predicted_time_per_token():
    plan, reps = cluster(2, 2)
    got = choose(plan, reps, 70 * GB, "auto")
    assert got.mode == "zero"
    # 70e9 x 3/4 / 117e6 = 449 s a token, gathered over the n0-n1 link
    assert got.prediction.seconds == pytest.approx(449, abs=1)
    assert "predicted 449 s per token" in got.reason and "the n0-n1 link" in got.reason


def test_serve_shows_each_replicas_predicted_time_per_token():
    from deepfleet.planning.serveplan import describe, plan_service

    plan, reps = cluster(1, 1)
    sp = plan_service(plan, reps, 7 * GB)
    # 7e9 bytes read per token at 0.5e12 x 0.6 B/s (a GPU of unknown bandwidth): 23.3 ms
    assert sp.per_token["n0/0"] == pytest.approx(7e9 / 0.3e12)
    assert "http://10.0.0.1:8760  ~23.3 ms per token (predicted)" in describe(sp)
    assert plan_service(plan, reps, None).per_token == {}
