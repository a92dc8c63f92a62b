"""The cost model against the lab (#31 point 4): a real job's rank 0 prints its measured
step time against the plan's prediction (and metrics.jsonl keeps both); with lab3's link
shaped 10x slower than the others and the links measured again, the plan names lab3's
link as the bottleneck; and the prediction follows the links.

Whether the choice changes with the links: training's CONFIG=auto never does, by the cost
model's own terms. zero2, zero3 and zero3-offload compute the same 6 x params x tokens;
zero2 sends 2 x (N-1)/N x params per rank, half of it hidden behind the backward, ZeRO-3
3 x, none hidden, with at least as many collectives (latency); offload adds host<->GPU
copies to ZeRO-3. So on any links zero2 <= zero3 <= zero3-offload, and auto, which takes
the fastest that fits memory, changes only with memory. What changes with the links is
the prediction: the network's time scales with the slowest hop of the ring (checked here
against the measured rates), its share of the step grows, and the bottleneck moves from
compute to the slow machine's link. (infer's MODE=auto does flip with the links, between
ZeRO-3 across every machine and replicas on those that hold the model: the planner's unit
test, tests/unit/test_truth_check.py.)

Every cap is taken off again at the end and the links measured again (the state as the
lab is)."""

from __future__ import annotations

import json
import re

import pytest
from labtools import lab_module

from deepfleet.planning import cost

pytestmark = pytest.mark.lab

RATE = "200mbit"
SLOW = "20mbit"  # lab3's link: 10x slower
# a 100M-parameter model's shape (modelinfo's JSON): on the lab's CPUs in fp32 its ZeRO-2
# volume (2 x 2/3 x 1e8 x 4 B = 0.53 GB per rank per step, about 21 s at 200 Mbit/s)
# makes the network the bottleneck at either rate, and it fits every machine's memory.
# The plan only reads it: no weights exist.
MODEL_INFO = {"params": 100_000_000, "largest_layer_params": 32000 * 768, "layers": 12,
              "hidden_size": 768, "heads": 12, "vocab_size": 32000}  # fmt: skip
TRUTH = re.compile(
    r"^\[(\S+)\] step time: measured ([\d.]+) (s|ms), predicted ([\d.]+) (s|ms) \(([\d.]+)x\)$",
    re.M,
)


def shape_machine(client, container: str, rate: str) -> None:
    """One lab machine's link (its eth0 and its veth's host end) at `rate`."""
    shaped = []
    for prefix, device, what in lab_module._lab_devices(client):
        if what == container or what.startswith(f"{container}'s veth"):
            lab_module._host_run([*prefix, *lab_module._tbf(device, rate)], what)
            shaped.append(what)
    assert len(shaped) == 2, shaped


def measure(cluster) -> dict:
    table = json.loads(cluster.run("links", "--json", timeout=120).stdout)
    assert table["failures"] == [] and len(table["links"]) == 6, table
    return table


def plan(cluster, info, config="auto") -> dict:
    result = cluster.run(
        "plan", "--json", "--model-info", str(info), "--config", config, "--micro-batch", "1"
    )
    return json.loads(result.stdout)["train"]


def slowest_hop(cluster, table) -> float:
    """The slowest crossing of the job's ring (hostfile order), as measured: bytes/s."""
    names = [n.name for n in cluster.lab.nodes]
    hop = cost.ring(names, cost.Links.from_records(table["links"])).slowest
    assert hop is not None
    return hop[1]


@pytest.fixture
def model_info(tmp_path):
    path = tmp_path / "one-b.json"
    path.write_text(json.dumps(MODEL_INFO))
    return path


def test_a_job_prints_measured_against_predicted_and_records_both(cluster):
    result = cluster.run("train", "--run", "truth", "--steps", "6", "--log-every", "2", timeout=900)
    out = result.stdout
    predicted = [line for line in out.splitlines() if line.startswith("predicted: ")]
    assert predicted, out[-3000:]
    found = TRUTH.findall(out)
    assert len(found) == 1, out[-3000:]
    line = next(x for x in out.splitlines() if TRUTH.match(x))
    print(predicted[0])
    print(line)
    code, text = cluster.node_exec(0, ["cat", "/workspace/checkpoints/truth/metrics.jsonl"])
    assert code == 0, text
    rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert r["step_time_s"] > 0 and r["predicted_step_time_s"] > 0, r
    master, measured, m_unit, said, s_unit, ratio = found[0]
    assert master == cluster.lab.nodes[0].name  # rank 0's line, on the master
    said_s = float(said) / (1000 if s_unit == "ms" else 1)
    measured_s = float(measured) / (1000 if m_unit == "ms" else 1)
    assert said_s == pytest.approx(rows[0]["predicted_step_time_s"], rel=0.06)
    assert float(ratio) == pytest.approx(measured_s / said_s, rel=0.1, abs=0.01)


def test_a_10x_slower_link_is_the_bottleneck_and_the_prediction_follows_the_links(
    cluster, outer_docker, model_info
):
    slow = cluster.lab.nodes[2]
    try:
        lab_module.shape_links(outer_docker, RATE)
        fast_table = measure(cluster)
        fast = plan(cluster, model_info)
        fast_hop = slowest_hop(cluster, fast_table)

        shape_machine(outer_docker, slow.container, SLOW)
        slow_table = measure(cluster)
        slowed = plan(cluster, model_info)
        slow_hop = slowest_hop(cluster, slow_table)

        dry = cluster.run(
            "train", "--dry-run", "--model-info", str(model_info), "--micro-batch", "1",
            "--config", "auto",
        ).stdout  # fmt: skip
        line = next(x for x in dry.splitlines() if x.startswith("predicted: "))
        print(line)
        link = rf"the ({re.escape(slow.name)}-\S+|\S+-{re.escape(slow.name)}) link"
        assert re.search(rf"bottleneck: {link}, \d+ [kM]B/s\)", line), line
        assert "assumed 1 GbE" not in line
        assert re.search(link, slowed["prediction"]["bottleneck"]), slowed["prediction"]

        # the choice: zero2 on either (see the docstring), every config fitting memory
        assert fast["config"] == slowed["config"] == "zero2"
        f, s = fast["prediction"], slowed["prediction"]
        # the network's time follows the slowest hop's measured rate
        expected = fast_hop / slow_hop
        print(
            f"slowest hop {fast_hop / 1e6:.1f} -> {slow_hop / 1e6:.2f} MB/s ({expected:.1f}x): "
            f"network {f['network_s']:.0f} -> {s['network_s']:.0f} s, step "
            f"{f['step_s']:.0f} -> {s['step_s']:.0f} s, share "
            f"{f['network_share']:.0%} -> {s['network_share']:.0%}"
        )
        assert expected >= 4, (fast_hop, slow_hop)
        assert s["network_s"] / f["network_s"] == pytest.approx(expected, rel=0.05)
        assert s["compute_s"] == pytest.approx(f["compute_s"])
        assert s["network_share"] > f["network_share"]
        # zero2: compute + the exposed half + the gather half (the reduce's overlap hides
        # at most 2/3 of the compute): the step grows with the network's time
        assert s["step_s"] - f["step_s"] == pytest.approx(s["network_s"] - f["network_s"], rel=0.35)
        # every candidate moves the same way; ZeRO-3 stays slower than zero2
        for fc, sc in zip(fast["candidates"], slowed["candidates"], strict=True):
            assert fc["config"] == sc["config"]
            assert sc["prediction"]["network_s"] / fc["prediction"]["network_s"] == (
                pytest.approx(expected, rel=0.05)
            )
        by = {c["config"]: c["prediction"]["step_s"] for c in slowed["candidates"]}
        assert by["zero2"] <= by["zero3"] <= by["zero3-offload"], by
    finally:
        lab_module.unshape_links(outer_docker)
        cluster.run("links", check=False, timeout=120)  # the state as the lab is again
