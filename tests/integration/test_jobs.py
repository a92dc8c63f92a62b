"""Jobs a person runs on their own data: ZeRO-3 on unequal slots, Ctrl-C and resume,
local instruction data copied once, the export fetched and loaded, secrets kept out."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest
from labtools import ranks_gone, steps, train_until_step

pytestmark = pytest.mark.lab

RUN = "z3"
# lab3 sits this one out (0 slots): 2+1 processes on two machines, unequal slots
TRAIN = ["train", "--run", RUN, "--config", "zero3", "--slots", "lab1=2 lab3=0", "--steps", "40",
         "--save-every", "10", "--log-every", "5"]  # fmt: skip


@pytest.fixture(scope="module")
def interrupted(cluster):
    """A ZeRO-3 run on 2+1 processes, stopped with Ctrl-C once a checkpoint exists."""
    proc, seen = train_until_step(cluster, TRAIN, 25)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + rest


def test_ctrl_c_stops_every_rank_on_every_node(cluster, interrupted):
    code, output = interrupted
    assert code == 130, output[-3000:]
    assert "stopping every rank" in output
    assert ranks_gone(cluster) == []


def test_resume_continues_from_the_saved_step(cluster, interrupted):
    _, first = interrupted
    first_steps = steps(first)
    assert first_steps and first_steps[0][0] == 5
    result = cluster.run(*TRAIN, "--resume", timeout=1500)
    match = re.search(r"resumed from step (\d+)", result.stdout)
    assert match, result.stdout[-3000:]
    saved = int(match.group(1))
    assert saved in (20, 30), saved  # the newest checkpoint before Ctrl-C
    resumed = steps(result.stdout)
    assert resumed[0][0] == saved + 5 and resumed[-1][0] == 40
    assert resumed[-1][1] < first_steps[0][1] * 0.8, (first_steps, resumed)
    assert ", world 3," in result.stdout  # rank 0's own line: torch's world size
    code, out = cluster.node_exec(0, ["cat", f"/workspace/checkpoints/{RUN}/metrics.jsonl"])
    logged = [json.loads(line)["step"] for line in out.splitlines() if line.strip()]
    assert logged == list(range(5, 45, 5)), logged  # no step twice, none missing


def test_zero3_export_loads_with_plain_transformers(cluster, interrupted, tmp_path):
    final = f"/workspace/checkpoints/{RUN}/final"
    code, out = cluster.node_exec(
        0,
        ["python", "-c",
         "import sys; from transformers import AutoModelForCausalLM as M, AutoTokenizer as T;"
         "m = M.from_pretrained(sys.argv[1]); T.from_pretrained(sys.argv[1]);"
         "print('params', sum(p.numel() for p in m.parameters()))", final],
    )  # fmt: skip
    assert code == 0, out
    params = int(re.search(r"params (\d+)", out).group(1))
    assert params > 10_000
    dest = tmp_path / "fetched"
    cluster.run("fetch-model", "--run", RUN, "--dest", str(dest))
    assert (dest / "config.json").is_file() and (dest / "model.safetensors").is_file()
    assert json.loads((dest / "config.json").read_text())["model_type"] == "llama"


def test_a_rank_killed_on_one_node_stops_the_job_everywhere(cluster):
    """A rank dies (the OOM killer, say): one line names its node, nothing keeps running."""
    args = ["train", "--run", "killed", "--steps", "100000", "--log-every", "20"]
    proc, seen = train_until_step(cluster, args, 0, stderr=subprocess.PIPE, within=600)
    code, out = cluster.node_exec(1, ["pkill", "-KILL", "-f", "deepfleet_node.train --local_rank"])
    assert code == 0, out
    rest, err = proc.communicate(timeout=300)  # a hang here is the failure this guards
    output = "".join(seen) + rest
    assert proc.returncode != 0, output[-3000:]
    assert "a rank on lab2 exited with code -9" in output
    lines = err.strip().splitlines()
    assert lines[-1].startswith("deepfleet: lab2: deepfleet_node.train: a rank exited"), err
    assert ranks_gone(cluster) == []


def test_local_instruction_data_is_copied_once_and_trains(cluster, tmp_path):
    data = tmp_path / "sft"
    data.mkdir()
    colours = ["red", "green", "white"]
    rows = [
        {"prompt": f"Q: what colour is boat {i % 3}? A:", "completion": f" {colours[i % 3]}."}
        for i in range(60)
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--run", "sft", "--data", str(data), "--steps", "6", "--log-every", "3"]
    first = cluster.run(*args, timeout=900)
    assert "deepfleet: /workspace/data/sft: copied to lab1, lab2" in first.stdout
    second = cluster.run(*args, timeout=900)
    assert "deepfleet: /workspace/data/sft: unchanged on lab1, lab2" in second.stdout
    assert steps(second.stdout)[-1][0] == 6
