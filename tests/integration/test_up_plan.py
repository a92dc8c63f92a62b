"""`up --dry-run` prints the request `up` sends: checked against the engines themselves.

The dry run probes the session cluster's machines (changing nothing) and prints, per
machine, the docker-py create request of its container; each running node container, as
its machine's engine reports it, must be exactly that request (with the cluster's own id
and key where a dry run can only print stand-ins for what `up` makes fresh).
"""

from __future__ import annotations

import json
import subprocess

import pytest
from labtools import DEEPFLEET, ROOT

from deepfleet.cluster import upplan

pytestmark = pytest.mark.lab


def _dry_run(cluster) -> dict:
    done = subprocess.run(
        [*DEEPFLEET, "up", "--dry-run", "--json", *cluster.up_args],
        cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "flavors: lab1 cpu, lab2 cpu, lab3 cpu" in done.stderr, done.stderr
    return json.loads(done.stdout)


def _with(value, cluster_id: str, key: str):
    text = json.dumps(value).replace(upplan.NEW_CLUSTER, cluster_id).replace(upplan.NEW_KEY, key)
    return json.loads(text)


def test_the_dry_run_prints_the_container_request_up_sent(cluster):
    state = cluster.state()
    before = {n["spec"]["name"]: n["container_id"] for n in state["nodes"]}
    plan = _dry_run(cluster)
    assert [m["name"] for m in plan["machines"]] == ["lab1", "lab2", "lab3"]
    assert "/root/.ssh/deepfleet_cluster" in plan["machines"][0]["files"]
    assert "/root/.ssh/deepfleet_cluster" not in plan["machines"][1]["files"]
    for index, machine in enumerate(plan["machines"]):
        assert machine["image_action"] == "present", machine
        real = json.loads(cluster.machine_docker(index, "inspect", "deepfleet-node"))[0]
        key = next(e for e in real["Config"]["Env"] if e.startswith("DEEPFLEET_AUTHORIZED_KEY="))
        request = _with(machine["container"], state["cluster"], key.split("=", 1)[1])
        host = real["HostConfig"]
        assert real["Name"] == "/" + request["name"]
        assert real["Config"]["Image"] == request["image"]
        assert real["Config"]["Cmd"] == request["command"]
        env = set(real["Config"]["Env"])
        assert {f"{k}={v}" for k, v in request["environment"].items()} <= env
        assert request["labels"].items() <= real["Config"]["Labels"].items()
        assert (host["NetworkMode"], host["IpcMode"]) == (
            request["network_mode"],
            request["ipc_mode"],
        )
        assert host.get("CgroupnsMode") == request.get("cgroupns", host.get("CgroupnsMode"))
        mounts = {(m["Destination"], m.get("Name") or m["Source"], m["Type"])
                  for m in real["Mounts"]}  # fmt: skip
        assert mounts == {(m["Target"], m["Source"], m["Type"]) for m in request["mounts"]}
        assert host["Ulimits"] == request["ulimits"]
    # and it changed nothing: the same containers still run
    after = {n["spec"]["name"]: n["container_id"] for n in cluster.state()["nodes"]}
    assert after == before
    status = json.loads(cluster.run("status", "--json").stdout)
    assert {n["state"] for n in status["nodes"]} == {"running"}
