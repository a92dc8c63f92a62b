"""links: the round schedule, records, doctor's verdicts, the tables, the lines a link that
cannot be measured ends in, and a whole measurement over loopback.

The measurement runs the node module as subprocesses of this test on 127.0.0.1 only: a
fake client's "containers" are those subprocesses, so listen, probe and stop are exercised
without Docker.
"""

from __future__ import annotations

import io
import json
import os
import selectors
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import pytest

from deepfleet.errors import DeepfleetError, PreflightError
from deepfleet.health import doctor, status
from deepfleet.inventory.nodes import NodeSpec
from deepfleet.machines import links
from deepfleet.machines.state import ClusterState, NodeState

NODE_PATH = Path(__file__).resolve().parents[2] / "images" / "node"
LOOPBACK = "127.0.0.1"
MBIT = 1e6 / 8  # bytes/s in a megabit/s


def rec(a, b, ab_mbit=940.0, ba_mbit=None, rtt_ms=0.3, at=1000.0) -> dict:
    ba_mbit = ab_mbit if ba_mbit is None else ba_mbit
    return {"a": a, "b": b, "a_to_b_bps": ab_mbit * MBIT, "b_to_a_bps": ba_mbit * MBIT,
            "rtt_s": rtt_ms / 1e3, "measured_at": at}  # fmt: skip


def full_mesh(names, slow: dict[str, float] | None = None, **kw) -> list[dict]:
    """Every pair of names; a machine in `slow` has that rate (Mbit/s) on all its links."""
    slow = slow or {}
    out = []
    for a, b in combinations(names, 2):
        rate = min(slow.get(a, 940.0), slow.get(b, 940.0))
        out.append(rec(a, b, rate, **kw))
    return out


# ---------------------------------------------------------------- the schedule


@pytest.mark.parametrize("n", range(1, 11))
def test_every_pair_once_and_no_machine_twice_in_a_round(n):
    names = [f"m{i}" for i in range(n)]
    rounds = links.schedule(names)
    pairs = [frozenset(p) for r in rounds for p in r]
    assert len(pairs) == len(set(pairs)) == n * (n - 1) // 2
    assert set(pairs) == {frozenset(p) for p in combinations(names, 2)}
    for r in rounds:
        ends = [m for p in r for m in p]
        assert len(ends) == len(set(ends)), r
    # a tournament's rounds: n - 1 for an even count, n for an odd one (each sits one out)
    assert len(rounds) == (0 if n < 2 else n - 1 if n % 2 == 0 else n)


def test_the_operator_put_first_always_probes():
    rounds = links.schedule([links.OPERATOR, "lab1", "lab2", "lab3", "lab4"])
    with_op = [p for r in rounds for p in r if links.OPERATOR in p]
    assert len(with_op) == 4 and all(p[0] == links.OPERATOR for p in with_op)


def test_eight_machines_and_the_operator_fit_the_time_budget():
    # 9 parties: 9 rounds of (2 x 0.5 s + connects) each, about 10 s
    rounds = links.schedule([links.OPERATOR, *(f"m{i}" for i in range(8))])
    assert len(rounds) == 9 and max(len(r) for r in rounds) == 4


# ---------------------------------------------------------------- records


def test_a_probe_result_becomes_a_record_of_exactly_the_cost_models_fields():
    result = {"ok": True, "rtt_s": 0.0004, "a_to_b_bps": 1.1e8, "b_to_a_bps": 1.0e8,
              "error": None, "target": "10.0.0.3:4000", "seconds": 1.1}  # fmt: skip
    record = links.parse_record(result, "lab1", "lab3", 1234.5)
    assert record == {"a": "lab1", "b": "lab3", "a_to_b_bps": 1.1e8, "b_to_a_bps": 1.0e8,
                      "rtt_s": 0.0004, "measured_at": 1234.5}  # fmt: skip
    assert tuple(record) == links.FIELDS


@pytest.mark.parametrize(
    "result",
    [
        {"ok": False, "error": "timeout"},
        {"ok": True, "rtt_s": 0.001, "a_to_b_bps": None, "b_to_a_bps": 1e8},
        {"ok": True, "rtt_s": 0.001, "a_to_b_bps": 0, "b_to_a_bps": 1e8},
        {"ok": True},
        {},
    ],
)
def test_a_result_without_both_directions_is_no_record(result):
    assert links.parse_record(result, "a", "b", 1.0) is None


def test_records_are_listed_operator_first_each_from_its_first_end():
    measured = [rec("lab3", "lab1", 100.0, 200.0), rec("operator", "lab2"), rec("lab2", "lab1")]
    ordered = links.in_order(measured, ["operator", "lab1", "lab2", "lab3"])
    assert [(r["a"], r["b"]) for r in ordered] == [
        ("operator", "lab2"), ("lab1", "lab2"), ("lab1", "lab3"),
    ]  # fmt: skip
    assert (ordered[2]["a_to_b_bps"], ordered[2]["b_to_a_bps"]) == (200.0 * MBIT, 100.0 * MBIT)
    assert all(tuple(r) == links.FIELDS for r in ordered)


def test_the_state_keeps_the_links_with_their_time_and_reads_an_older_state(tmp_path):
    spec = NodeSpec("lab1", "10.0.0.2", "root", 22, None, str(tmp_path / "kh"))
    state = ClusterState(cluster="c", image="", nodes=[NodeState(spec=spec, flavor="cpu")])
    assert state.links_age(2000.0) is None and links.stale(state, 2000.0)
    state.record_links([rec("operator", "lab1")], ["lab2 cannot ..."], 1000.0)
    again = ClusterState.from_json(state.to_json())
    assert again.links == [rec("operator", "lab1")] and again.link_failures == ["lab2 cannot ..."]
    assert again.links_age(1090.0) == 90.0
    assert not links.stale(again, 1090.0, limit=3600) and links.stale(again, 5000.0, limit=3600)
    older = json.loads(state.to_json())
    for key in ("links", "link_failures", "links_measured_at"):
        del older[key]
    assert ClusterState.from_json(json.dumps(older)).links == []


def test_the_max_age_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(links.MAX_AGE_ENV, "60")
    assert links.max_age() == 60.0
    monkeypatch.setenv(links.MAX_AGE_ENV, "soon")
    assert links.max_age() == links.DEFAULT_MAX_AGE


# ---------------------------------------------------------------- verdicts


def test_a_uniform_lan_has_nothing_to_mark():
    records = full_mesh(["operator", "lab1", "lab2", "lab3"])
    assert links.assess(records) == []
    checks = doctor.links_checks(records, [], 30.0)
    assert [c.level for c in checks] == ["ok"]
    assert "6 links measured 30 s ago; the slowest" in checks[0].detail


def test_a_machine_on_a_slow_port_is_named_not_every_link_it_is_on():
    records = full_mesh(["operator", "lab1", "lab2", "lab3"], slow={"lab3": 94.0})
    verdicts = links.assess(records)
    assert [v.node for v in verdicts] == ["lab3"]
    assert "every link of lab3 is slow: 11.8 MB/s at best against 117.5 MB/s" in verdicts[0].detail
    assert "100Mb/s" in verdicts[0].fix and "Wi-Fi" in verdicts[0].fix
    checks = doctor.links_checks(records, [], 30.0)
    assert [(c.node, c.level, c.name) for c in checks] == [("lab3", "warn", "links")]
    rendered = doctor.render(checks, ascii=True)
    assert "fix: check lab3's connection: a cable instead of Wi-Fi" in rendered


def test_a_slow_operator_is_this_machine():
    records = full_mesh(["lab1", "lab2", "lab3"]) + [
        rec("operator", n, 20.0) for n in ("lab1", "lab2", "lab3")
    ]
    verdicts = links.assess(records)
    assert [v.node for v in verdicts] == ["operator"]
    assert verdicts[0].detail.startswith("every link of this machine (the operator) is slow")


def test_one_slow_link_between_fast_machines_is_named_itself():
    records = full_mesh(["lab1", "lab2", "lab3", "lab4"])
    records[1] = rec("lab1", "lab3", 940.0, 90.0)  # one direction: a bad cable on the way
    verdicts = links.assess(records)
    assert len(verdicts) == 1
    assert verdicts[0].detail.startswith("link lab1 <-> lab3 is slow: 11.2 MB/s while both")


def test_a_link_just_slower_than_the_others_is_not_marked():
    records = full_mesh(["lab1", "lab2", "lab3"], slow={"lab3": 400.0})
    assert links.assess(records) == []


def test_a_high_round_trip_is_marked():
    records = full_mesh(["lab1", "lab2", "lab3"])
    records[0] = rec("lab1", "lab2", rtt_ms=12.0)
    verdicts = links.assess(records)
    assert [v.detail for v in verdicts] == ["link lab1 <-> lab2 has a round-trip time of 12.0 ms"]
    assert "Wi-Fi" in verdicts[0].fix


def test_a_link_not_measured_is_a_warning_naming_the_machine():
    line = links.failure_line("lab1", "lab3", "10.0.0.4:4100", "timeout")
    checks = doctor.links_checks([], [line], None)
    assert [(c.node, c.level) for c in checks] == [("lab1", "warn")]
    op = links.failure_line("operator", "lab3", "10.0.0.4:4100", "refused")
    assert doctor.links_checks([], [op], None)[0].node == "operator"
    assert not doctor.blocks_up(checks)


# ---------------------------------------------------------------- lines and tables


def test_refusal_lines_name_both_ends_like_the_preflight():
    assert links.failure_line("lab1", "lab3", "10.0.0.4:4100", "timeout") == (
        "lab1 cannot measure the link to lab3 (10.0.0.4:4100): no answer in 3 s "
        "(a firewall dropping it?)"
    )
    assert links.failure_line("operator", "lab2", "10.0.0.3:4100", "refused") == (
        "this machine (the operator) cannot measure the link to lab2 (10.0.0.3:4100): "
        "connection refused (a firewall rejecting it?)"
    )


def test_the_link_table():
    text = links.render([rec("lab1", "lab2", 940.0, 900.0, 0.25)], [], 95.0)
    assert text.splitlines() == [
        "links (measured 95 s ago):",
        "  LINK           A->B MB/s  B->A MB/s  RTT ms",
        "  lab1 <-> lab2      117.5      112.5    0.25",
    ]
    assert links.render([], [], None) == "links: never measured (`deepfleet links` measures them)"
    text = links.render([], ["lab1 cannot measure the link to lab2 (x): y"], 7200.0)
    assert text.splitlines()[-1] == "  not measured: lab1 cannot measure the link to lab2 (x): y"
    assert "measured 2 h ago" in text


def test_status_shows_the_stored_table_with_its_age(tmp_path):
    spec = NodeSpec("lab1", "10.0.0.2", "root", 22, None, str(tmp_path / "kh"))
    state = ClusterState(cluster="c", image="", nodes=[NodeState(spec=spec, flavor="cpu")])
    state.record_links([rec("operator", "lab1", 200.0)], [], 1000.0)
    table = status.stored_links(state, 1000.0 + 600)
    assert table["age_s"] == 600.0 and table["links"][0]["a"] == "operator"
    sample = {"cluster": "c", "image": "", "nodes": [], "job": None, "service": None,
              "links": table}  # fmt: skip
    text = status.render(sample)
    assert "links (measured 10 min ago):" in text
    assert "  operator <-> lab1       25.0       25.0    0.30" in text


# ---------------------------------------------------------------- a measurement on loopback


class _Proc:
    """A listener subprocess standing in for an exec's stream."""

    def __init__(self, proc):
        self.proc = proc

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(5)
        self.proc.stdout.close()


def _local_env(env) -> dict:
    return {**os.environ, "PYTHONPATH": str(NODE_PATH), **(env or {})}


def _local_argv(argv) -> list[str]:
    assert argv[:2] == ["python", "-m"]
    return [sys.executable, "-S", *argv[1:]]


@pytest.fixture
def loopback(monkeypatch, tmp_path):
    """Machines whose containers are subprocesses here, all at 127.0.0.1."""
    started: list[subprocess.Popen] = []
    kills: list[list[str]] = []
    refuse: set[str] = set()

    def start_helper(client, container_id, node, argv, what, module, env=None):
        if node in refuse:
            raise PreflightError(f"{node}: cannot start the {what}: its engine said no", node)
        proc = subprocess.Popen(
            _local_argv([*argv, "--host", LOOPBACK]), env=_local_env(env),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        started.append(proc)
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(10), "the listener printed nothing"
        return json.loads(proc.stdout.readline()), _Proc(proc)

    def exec_text(container, argv, node, env=None):
        done = subprocess.run(_local_argv(argv), env=_local_env(env), capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    class Container:
        def exec_run(self, argv):
            kills.append(list(argv))
            return 0, b""

    client = SimpleNamespace(containers=SimpleNamespace(get=lambda cid: Container()))
    monkeypatch.setattr(links, "start_helper", start_helper)
    monkeypatch.setattr(links, "exec_text", exec_text)
    names = ["lab1", "lab2", "lab3"]
    nodes = [
        NodeState(spec=NodeSpec(n, LOOPBACK, "root", 22, None, str(tmp_path / "kh")),
                  flavor="cpu", container_id=f"id-{n}")
        for n in names
    ]  # fmt: skip
    state = ClusterState(cluster="c", image="", nodes=nodes)
    yield SimpleNamespace(
        state=state, clients=dict.fromkeys(names, client), kills=kills, refuse=refuse
    )
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def test_every_link_and_the_operators_measured_over_loopback(loopback):
    begun = time.monotonic()
    m = links.measure(loopback.state, loopback.clients, seconds=0.1, max_bytes=8 * 2**20)
    took = time.monotonic() - begun
    assert m.failures == []
    pairs = {frozenset((r["a"], r["b"])) for r in m.links}
    assert pairs == {frozenset(p) for p in combinations(["operator", "lab1", "lab2", "lab3"], 2)}
    for r in m.links:
        assert tuple(r) == links.FIELDS
        assert r["a_to_b_bps"] > 10e6 and r["b_to_a_bps"] > 10e6 and 0 <= r["rtt_s"] < 0.05
    assert took < 15, took
    assert [(r["a"], r["b"]) for r in m.links] == [
        ("operator", "lab1"), ("operator", "lab2"), ("operator", "lab3"),
        ("lab1", "lab2"), ("lab1", "lab3"), ("lab2", "lab3"),
    ]  # fmt: skip
    assert len(loopback.kills) == 3 and all(k[0] == "kill" for k in loopback.kills)
    loopback.state.record_links(m.links, m.failures, m.measured_at)
    assert "6 links measured" in m.summary()
    assert links.render(loopback.state.links, [], 1.0).count(" <-> ") == 6


def test_a_machine_whose_listener_fails_is_one_line_and_the_rest_is_measured(loopback):
    loopback.refuse.add("lab3")
    m = links.measure(loopback.state, loopback.clients, seconds=0.1, max_bytes=2**20)
    assert m.failures == [
        "lab3: cannot start the link listener: its engine said no (its links are not measured)"
    ]
    pairs = {frozenset((r["a"], r["b"])) for r in m.links}
    assert pairs == {frozenset(p) for p in combinations(["operator", "lab1", "lab2"], 2)}


def test_refresh_records_and_says_one_line(loopback, monkeypatch):
    saved = []
    store = SimpleNamespace(save=lambda state: saved.append(state.to_json()))
    out = io.StringIO()
    measure = links.measure
    monkeypatch.setattr(
        links, "measure", lambda state, clients: measure(state, clients, 0.05, max_bytes=2**20)
    )
    m = links.refresh(loopback.state, loopback.clients, store, out)
    assert m is not None and len(saved) == 1
    assert json.loads(saved[0])["links_measured_at"] == m.measured_at
    assert out.getvalue().startswith("deepfleet: links: 6 links measured in ")
    assert "; slowest " in out.getvalue()


def test_refresh_that_cannot_measure_is_a_warning_line(monkeypatch):
    def fail(state, clients):
        raise DeepfleetError("cannot connect", "lab2")

    monkeypatch.setattr(links, "measure", fail)
    out = io.StringIO()
    assert links.refresh(SimpleNamespace(), {}, None, out) is None
    assert out.getvalue() == "deepfleet: warning: links not measured: lab2: cannot connect\n"
