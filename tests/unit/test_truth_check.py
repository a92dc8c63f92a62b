"""The truth check's plumbing (#31 point 4): the plan's predicted seconds per step reach
the ranks as train's --predicted-step-s, only when a prediction exists; the node's own
side (the measured-vs-predicted line, metrics.jsonl) is tested in tests/node/test_truth.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
from unitdata import inv, rep

from deepfleet.jobs import submit
from deepfleet.planning import memory, trainplan
from deepfleet.planning.plan import plan_cluster

SMALL = memory.ModelShape(125_000_000, 50257 * 768, 12, 768, 12, 50257, "small")


def cpu_plan(shape=SMALL, names=("a", "b"), **kw):
    reports = {n: rep(cpu_count=8) for n in names}
    cluster = plan_cluster(inv(*names), reports)
    return trainplan.plan_training(cluster, reports, shape, "zero2", 64, 4, **kw)


def test_train_args_carry_the_prediction_only_when_there_is_one():
    req = submit.TrainRequest(run="t", steps=5, extra=["--verbose"])
    plain = submit.train_args(req, "/m", "/d", "fp32", "zero2")
    assert "--predicted-step-s" not in plain
    args = submit.train_args(req, "/m", "/d", "fp32", "zero2", predicted_step_s=12.34567891)
    i = args.index("--predicted-step-s")
    assert args[i + 1] == "12.3457" and float(args[i + 1]) == pytest.approx(12.3457)
    assert args[-1] == "--verbose"  # the user's own extra arguments still come last
    assert args[:i] == plain[:-1]
    tiny = submit.train_args(req, "/m", "/d", predicted_step_s=1.5e-5)
    assert float(tiny[tiny.index("--predicted-step-s") + 1]) == pytest.approx(1.5e-5)


def test_the_node_parses_what_the_operator_passes():
    from deepfleet_node.train import args as node_args
    from deepfleet_node.train import bridge

    req = submit.TrainRequest(run="t", steps=5)
    argv = submit.train_args(req, "/m", "/d", "fp32", "zero2", predicted_step_s=0.25)
    assert node_args.parse_args(argv).predicted_step_s == pytest.approx(0.25)
    assert node_args.parse_args(submit.train_args(req, "/m", "/d")).predicted_step_s is None
    bridged = submit.train_args(replace(req, bridge=True), "/m", "/d", "fp32,bf16",
                                predicted_step_s=3.0)  # fmt: skip
    assert bridge.parse_args(bridged).predicted_step_s == pytest.approx(3.0)
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            node_args.parse_args([*argv[:-1], bad])


def test_step_seconds_is_the_prediction_times_the_micro_steps_of_a_global_batch():
    tp = cpu_plan()
    assert tp.prediction is not None
    assert tp.step_seconds() == tp.prediction.total_s
    assert tp.step_seconds(4 * 2) == tp.prediction.total_s  # micro 4 x world 2: one
    assert tp.step_seconds(4 * 2 * 3) == pytest.approx(3 * tp.prediction.total_s)
    assert tp.step_seconds(5) == tp.prediction.total_s  # not a multiple: the node refuses
    assert cpu_plan(shape=None).step_seconds() is None  # shape unknown: nothing to check


def test_train_passes_the_plans_prediction_to_the_ranks(monkeypatch):
    tp = cpu_plan()
    seen = {}
    monkeypatch.setattr(submit, "ready_cluster", lambda *a, **k: None)
    monkeypatch.setattr(submit, "_ensure_demo_assets", lambda *a, **k: None)
    monkeypatch.setattr(submit, "plan_train", lambda *a, **k: tp)

    def run_job(session, module, args, out, slots, *rest, **kw):
        seen["args"] = args
        return []

    monkeypatch.setattr(submit, "run_job", run_job)
    submit.train(None, submit.TrainRequest(run="t", steps=5, global_batch=16), environ={})
    args = seen["args"]
    value = float(args[args.index("--predicted-step-s") + 1])
    assert value == pytest.approx(2 * tp.prediction.total_s, rel=1e-5)  # 16 / (4 x 2)

    monkeypatch.setattr(submit, "plan_train", lambda *a, **k: replace(tp, prediction=None))
    submit.train(None, submit.TrainRequest(run="t", steps=5), environ={})
    assert "--predicted-step-s" not in seen["args"]


def test_the_node_says_measured_against_predicted_once_after_the_warm_up():
    from deepfleet_node.train.metrics import StepTruth, truth_line

    truth = StepTruth(0.5)
    truth.add(3.0)  # the warm-up step: allocations, lazy inits
    assert truth.line() is None  # nothing measured after it yet
    truth.add(0.4)
    truth.add(0.6)
    assert truth.line() == "step time: measured 0.50 s, predicted 0.50 s (1.00x)"
    truth.add(9.0)
    assert truth.line(last=True) is None  # said once
    assert truth_line(11.8, 12.3) == "step time: measured 11.8 s, predicted 12.3 s (0.96x)"
    assert truth_line(0.012, 0.004) == "step time: measured 12 ms, predicted 4 ms (3.00x)"

    only = StepTruth(2.0)
    only.add(1.0)
    assert only.line() is None
    assert only.line(last=True) == "step time: measured 1.0 s, predicted 2.0 s (0.50x)"
    unknown = StepTruth(None)
    unknown.add(1.0)
    unknown.add(1.0)
    assert unknown.line(last=True) is None


def test_metrics_record_the_prediction_beside_the_step_time():
    from deepfleet_node.train.metrics import Window, log_line, metrics_record

    window = Window(steps=2, seconds=3.0)
    rec = metrics_record(4, 1e-3, window, (2.5, 100, 10), 6, [4, 4], 1.25)
    assert rec["step_time_s"] == 1.5 and rec["predicted_step_time_s"] == 1.25
    plain = metrics_record(4, 1e-3, window, (2.5, 100, 10), 6, [4, 4])
    assert "predicted_step_time_s" not in plain
    assert log_line(rec, 10) == log_line(plain, 10)  # the progress line is unchanged


def test_infer_auto_changes_its_choice_when_one_machines_link_is_10x_slower():
    """Training's CONFIG=auto never changes with the links (zero2 <= zero3 <= offload on
    any links, see tests/integration/test_cost_lab.py); infer's MODE=auto does: a 3 GB
    model that c's memory cannot hold runs ZeRO-3 across a, b and c on 1 GB/s links, and
    replicas on a and b alone when c's link is 10x slower (ZeRO-3 then 54x slower)."""
    from deepfleet.planning import cost, inferplan

    gib = 1 << 30
    reports = {
        "a": rep(cpu_count=8, memory_bytes=16 * gib),
        "b": rep(cpu_count=8, memory_bytes=16 * gib),
        "c": rep(cpu_count=8, memory_bytes=2 * gib),
    }
    cluster = plan_cluster(inv("a", "b", "c"), reports)

    def links(c_bps: float) -> cost.Links:
        return cost.Links.from_records(
            {"a": x, "b": y, "a_to_b_bps": bps, "b_to_a_bps": bps, "rtt_s": 2e-4,
             "measured_at": 1.0}
            for x, y, bps in (("a", "b", 1e9), ("b", "c", c_bps), ("a", "c", c_bps))
        )  # fmt: skip

    fast = inferplan.choose(cluster, reports, 3 * 10**9, "auto", links(1e9))
    assert fast.mode == "zero" and fast.slots == {"a": 1, "b": 1, "c": 1}, fast.reason
    slow = inferplan.choose(cluster, reports, 3 * 10**9, "auto", links(1e8))
    assert slow.mode == "replicas" and slow.slots == {"a": 1, "b": 1, "c": 0}, slow.reason
    assert "not zero (predicted 54x slower" in slow.reason
    assert "bottleneck: the b-c link, 100 MB/s" in slow.reason
