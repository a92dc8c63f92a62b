"""Unlike machines on the lab: CPU quotas 0.9/0.5/0.3 and a memory limit on lab3.

- a model that does not fit lab3's limit under ZeRO-2 is refused before anything is
  copied, naming lab3, the need, the room and what would fit; CONFIG=auto then finds no
  ZeRO stage that fits lab3 (on three small CPU machines ZeRO-3's gathered working set
  outweighs what its partitions save), leaves lab3 out naming why, and trains to the end
  on the other two;
- the speed-balanced split gives the fastest machine the most samples per micro-step;
- a --bridge job trains across all three machines.

The limits are lifted at the end; the next job's fresh reports see the lab as it was.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from labtools import lab_index, lab_module, steps

pytestmark = pytest.mark.lab

GiB = 1 << 30
CPUS = (0.9, 0.5, 0.3)
LAB3_MEMORY = int(1.5 * GiB)
# an 85M-parameter Llama (the demo tokenizer's 512-token vocabulary). Measured peaks per
# rank over three machines: ZeRO-2 1.6 GiB, ZeRO-3 2.3 GiB (memfit: 2.0 and 2.4)
MEDIUM = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=256)  # fmt: skip
BUILD = """
import sys
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from deepfleet_node import tiny
tiny.main(["--out", "/out/tiny", "--data-out", "/out/train.txt"])
tok = AutoTokenizer.from_pretrained("/out/tiny")
config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **%r)
LlamaForCausalLM(config).save_pretrained("/out/medium")
tok.save_pretrained("/out/medium")
"""


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    out = tmp_path_factory.mktemp("medium")
    subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "-v", f"{out}:/out",
         "deepfleet/cpu:latest", "python", "-c", BUILD % (MEDIUM,)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def unlike(cluster):
    nodes = cluster.lab.nodes
    try:
        for node, cores in zip(nodes, CPUS, strict=True):
            memory = LAB3_MEMORY if node is nodes[2] else None
            lab_module.set_limits(lab_index(node), cores, memory)
        yield cluster  # each job takes every machine's report afresh: no `up` again
    finally:
        for node in nodes:
            lab_module.set_limits(lab_index(node), None, None)


def test_a_model_too_big_for_lab3_is_refused_before_anything_is_copied(unlike, medium):
    model = str(medium / "medium")
    result = unlike.run(
        "train", "--model", model, "--data", str(medium / "train.txt"), "--run", "toobig",
        "--steps", "3", "--micro-batch", "1", "--config", "zero2", check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("deepfleet: lab3: medium"), line
    assert "does not fit with zero2" in line and "lab3 RAM needs" in line
    assert "has 1.5 GiB" in line and "would fit: SLOTS=lab3=0 (leave lab3 out)" in line
    for index in range(3):
        code, _ = unlike.node_exec(index, ["test", "-e", "/workspace/models/medium"])
        assert code != 0, f"the weights reached {unlike.lab.nodes[index].name}"


def test_the_saved_plan_shows_the_limits_and_the_estimated_split(unlike):
    # the refused job above took the reports afresh; `plan` reads what it saved
    result = unlike.run("plan", "--json")
    train = json.loads(result.stdout)["train"]
    shares = [r["micro_batch"] for r in train["ranks"]]
    assert shares[0] > shares[1] > shares[2] >= 1, shares


def test_config_auto_leaves_lab3_out_and_trains_to_the_end(unlike, medium):
    result = unlike.run(  # -v: the launcher's command line shows the config it was given
        "-v", "train", "--model", str(medium / "medium"), "--data", str(medium / "train.txt"),
        "--run", "auto", "--steps", "4", "--log-every", "1", "--micro-batch", "1",
        "--config", "auto", timeout=1800,
    )  # fmt: skip
    out = result.stdout
    assert "memory: fits with zero2" in out, out[-3000:]
    assert re.search(r"lab3 +left out: lab3 RAM needs [\d.]+ GiB, has 1\.5 GiB", out), out[-3000:]
    assert "2 ranks on 2 machine(s)" in out and "--deepspeed-config zero2" in out
    assert [s for s, _ in steps(out)][-1] == 4
    assert "exported" in out


def test_speed_balance_gives_the_fastest_machine_the_most(unlike):
    result = unlike.run(
        "train", "--run", "balanced", "--steps", "8", "--log-every", "2", "--micro-batch", "6",
        "--balance", "speed", timeout=1200,
    )  # fmt: skip
    found = re.findall(r"balance: micro-batch per rank (\d+)/(\d+)/(\d+)", result.stdout)
    assert found, result.stdout[-3000:]
    first = [int(x) for x in found[0]]
    assert sum(first) == 18 and first[0] > first[2], first


def test_bridge_trains_one_model_across_every_machine(unlike):
    result = unlike.run(  # -v: the launcher's command line shows the module it runs
        "-v", "train", "--bridge", "--run", "bridge", "--steps", "6", "--log-every", "2",
        timeout=1200,
    )  # fmt: skip
    out = result.stdout
    assert "deepfleet_node.train.bridge" in out and "3 ranks on 3 machine(s), backend gloo" in out
    losses = [loss for _, loss in steps(out)]
    assert len(losses) == 3 and losses[-1] < losses[0], out[-3000:]
    code, _ = unlike.node_exec(0, ["test", "-f", "/workspace/checkpoints/bridge/final/config.json"])
    assert code == 0
