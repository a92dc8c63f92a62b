"""The operator's memory fit (orchestrator/deepfleet/planning/memory.py) against DeepSpeed's own
estimators and against a real model: the transcription must not drift from DeepSpeed.

Runs inside the node image, where DeepSpeed is installed; scripts/test-node.sh mounts the
orchestrator's source read-only at /orchestrator.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
from nodetools import require

require("deepspeed")

ORCHESTRATOR = next(
    (p for p in (Path("/orchestrator"), Path(__file__).resolve().parents[2] / "orchestrator")
     if (p / "deepfleet" / "planning" / "memory.py").is_file()),
    None,
)  # fmt: skip
if ORCHESTRATOR is None:
    pytest.skip("the orchestrator's source is not mounted", allow_module_level=True)
sys.path.insert(0, str(ORCHESTRATOR))

from deepfleet.planning import memory as memfit  # noqa: E402

LLAMA2_7B = 6_738_415_616
SIZES = [(LLAMA2_7B, 131_072_000), (1_100_048_384, 65_536_000), (125_000_000, 38_597_376)]


@pytest.mark.parametrize("params,largest", SIZES)
def test_zero2_transcription_equals_deepspeeds_estimator(params, largest):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for per_node, nodes, offload in itertools.product((1, 2, 8), (1, 3, 16), (True, False)):
        args = dict(num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=offload)
        assert memfit.estimate_zero2_model_states_mem_needs(params, **args) == (
            estimate_zero2_model_states_mem_needs(params, **args)
        ), args


@pytest.mark.parametrize("params,largest", SIZES)
def test_zero3_transcription_equals_deepspeeds_estimator(params, largest):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    for per_node, nodes, offload, offload_params, zero_init in itertools.product(
        (1, 2, 8), (1, 3, 16), (True, False), (True, False), (True, False)
    ):
        args = dict(
            num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=offload,
            cpu_offload_params=offload_params, zero_init=zero_init,
        )  # fmt: skip
        ours = memfit.estimate_zero3_model_states_mem_needs(params, largest, **args)
        assert ours == estimate_zero3_model_states_mem_needs(params, largest, **args), args


def test_shape_from_a_real_llama2_7b_config_matches_deepspeeds_live_count():
    """modelinfo's counts on the meta device are what DeepSpeed's _all_live estimator reads
    off a real model: total parameters and the largest layer (the embedding here)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from deepfleet_node import modelinfo

    config = LlamaConfig()
    info = modelinfo.model_info(config)
    shape = memfit.ModelShape.from_info(info)
    assert shape.params == LLAMA2_7B
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert shape.largest_layer_params == largest == 32000 * 4096
