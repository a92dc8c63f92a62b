"""Link measurement on the lab: `up` records the link table, a link shaped with tc to a
known rate is measured within +-20 %, and a machine whose link is 10x slower is the one
`doctor` marks. Every cap is taken off again at the end (lab.unshape_links)."""

from __future__ import annotations

import json
import time

import pytest
from labtools import lab_module

from deepfleet.machines import links

pytestmark = pytest.mark.lab

RATE = "200mbit"
RATE_BPS = 200e6 / 8  # what tc counts: bytes on the wire per second
SLOW = "20mbit"
SLOW_BPS = 20e6 / 8
TOLERANCE = 0.20


def shape_machine(client, container: str, rate: str) -> list[str]:
    """One lab machine's link (its eth0 and its veth's host end) at `rate`."""
    shaped = []
    for prefix, device, what in lab_module._lab_devices(client):
        if what == container or what.startswith(f"{container}'s veth"):
            lab_module._host_run([*prefix, *lab_module._tbf(device, rate)], what)
            shaped.append(what)
    assert len(shaped) == 2, shaped
    return shaped


def measure(cluster) -> dict:
    result = cluster.run("links", "--json", timeout=120)
    return json.loads(result.stdout)


def pairs(table: dict) -> dict[frozenset, dict]:
    return {frozenset((r["a"], r["b"])): r for r in table["links"]}


def test_up_measured_every_link_and_recorded_it(cluster):
    assert "deepfleet: links: 6 links measured in " in cluster.up_output, cluster.up_output
    state = cluster.state()
    names = [n.name for n in cluster.lab.nodes]
    assert {frozenset((r["a"], r["b"])) for r in state["links"]} == {
        frozenset(p) for p in [(a, b) for i, a in enumerate(["operator", *names])
                               for b in names[i:] if a != b]
    }  # fmt: skip
    assert all(set(r) == set(links.FIELDS) for r in state["links"])
    assert state["links_measured_at"] <= time.time()
    status = json.loads(cluster.run("status", "--json").stdout)
    assert len(status["links"]["links"]) == 6 and status["links"]["age_s"] >= 0


def test_a_shaped_link_is_measured_and_a_10x_slower_one_is_marked(cluster, outer_docker):
    names = [n.name for n in cluster.lab.nodes]
    slow = cluster.lab.nodes[2]
    try:
        lab_module.shape_links(outer_docker, RATE)
        began = time.monotonic()
        table = measure(cluster)
        took = time.monotonic() - began
        assert table["failures"] == [] and len(table["links"]) == 6, table
        for r in table["links"]:
            for key in ("a_to_b_bps", "b_to_a_bps"):
                assert abs(r[key] / RATE_BPS - 1) <= TOLERANCE, (r, key)
        assert table["verdicts"] == []
        print(f"shaped {RATE} ({RATE_BPS / 1e6:.1f} MB/s) measured in {took:.1f} s:")
        print(links.render(table["links"], [], 0.0))

        shape_machine(outer_docker, slow.container, SLOW)
        table = measure(cluster)
        print(f"{slow.name} at {SLOW} ({SLOW_BPS / 1e6:.2f} MB/s), the others at {RATE}:")
        print(links.render(table["links"], table["failures"], 0.0))
        measured = pairs(table)
        for other in ["operator", *names]:
            if other == slow.name:
                continue
            r = measured[frozenset((other, slow.name))]
            # the tbf's burst (512 kB) lets the first half-second run a little fast
            assert SLOW_BPS * 0.8 <= links.rate(r) <= RATE_BPS / 4, r
        fast = measured[frozenset((names[0], names[1]))]
        assert abs(links.rate(fast) / RATE_BPS - 1) <= TOLERANCE, fast
        assert [v["node"] for v in table["verdicts"]] == [slow.name], table["verdicts"]

        doctor = cluster.run("doctor", check=False, timeout=300)
        rows = [line for line in doctor.stdout.splitlines() if " links " in line]
        assert rows and all(line.split()[0] == slow.name for line in rows), doctor.stdout
        assert f"every link of {slow.name} is slow" in rows[0]
        assert "warn" in rows[0] or "!" in rows[0]
        assert "fix: check " + slow.name in doctor.stdout

        status = cluster.run("status").stdout
        assert "links (measured " in status and f"{names[0]} <-> {slow.name}" in status
    finally:
        lab_module.unshape_links(outer_docker)
        cluster.run("links", check=False, timeout=120)  # the state as the lab is again


def test_a_job_measures_again_when_the_table_is_older_than_the_max_age(cluster):
    before = cluster.state()["links_measured_at"]
    result = cluster.run(
        "--links-max-age", "0", "train", "--run", "links-age", "--steps", "2",
        "--log-every", "1", timeout=600,
    )  # fmt: skip
    line = next(x for x in result.stdout.splitlines() if x.startswith("deepfleet: links ("))
    assert "6 links measured in " in line, result.stdout
    assert cluster.state()["links_measured_at"] > before
    # within the max age (1 h by default) a job does not measure again
    result = cluster.run("train", "--run", "links-age2", "--steps", "2", timeout=600)
    assert "deepfleet: links" not in result.stdout, result.stdout
