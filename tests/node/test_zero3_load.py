"""ZeRO-3 loads the weights already partitioned: no rank ever holds the whole model.

transformers builds the model under deepspeed.zero.Init when HfDeepSpeedConfig says
stage 3 and `accelerate` is installed (the image pins it in versions.env), or, without
accelerate, when zero3's stand-in is registered instead; either way each of two gloo
ranks must then hold about half of every large weight, and nothing in full.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from nodetools import require

require("deepspeed")
require("accelerate")

from nodetools import SUBPROCESS_TIMEOUT_S, free_port, node_env  # noqa: E402

SCRIPT = r"""
import json, sys
if sys.argv[2] == "without-accelerate":
    sys.modules["accelerate"] = None  # importing it fails, as when it is not installed
import deepspeed, torch
import transformers.integrations
from transformers import AutoModelForCausalLM
from deepfleet_node import zero3
from deepfleet_node.train import config as train_config

if sys.argv[2] == "without-accelerate":
    def missing(config):  # what HfDeepSpeedConfig raises when accelerate is not installed
        import importlib.metadata
        raise importlib.metadata.PackageNotFoundError("accelerate")
    transformers.integrations.HfDeepSpeedConfig = missing

deepspeed.init_distributed(dist_backend="gloo")
config = json.loads(train_config.resolve_config("zero3").read_text())
config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
              train_batch_size=2)
keep = zero3.zero3_loading(config)
print("LOADER " + type(keep).__name__, flush=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
rows = [(n, p.ds_numel, p.ds_tensor.numel(), p.numel()) for n, p in model.named_parameters()
        if hasattr(p, "ds_id")]
plain = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
print("ZERO3 " + json.dumps({"rows": rows, "plain": plain}), flush=True)
# leave the group together: a rank that exits with gloo's threads still up may abort
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize(
    ("accelerate", "loader"),
    [("with-accelerate", "HfDeepSpeedConfig"), ("without-accelerate", "ZeroLoading")],
)
def test_two_ranks_each_hold_half_of_every_weight(tmp_path, tiny_model, accelerate, loader):
    script = tmp_path / "load.py"
    script.write_text(SCRIPT)
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tiny_model), accelerate],
            env=node_env(rank, 2, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=SUBPROCESS_TIMEOUT_S)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]
        assert "loads full weights" not in out
        assert f"LOADER {loader}" in out
    for out in outputs:
        line = next(x for x in out.splitlines() if x.startswith("ZERO3 "))
        seen = json.loads(line.removeprefix("ZERO3 "))
        assert seen["plain"] == [] and seen["rows"]
        total = sum(full for _, full, _, _ in seen["rows"])
        held = sum(part for _, _, part, _ in seen["rows"])
        # each rank's partitions: half of everything (padding adds at most one per tensor)
        assert total / 2 <= held <= total / 2 + len(seen["rows"])
        # and no parameter is materialised whole outside a forward pass
        assert all(local == 0 for _, _, _, local in seen["rows"])
