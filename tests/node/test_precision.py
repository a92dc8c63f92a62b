"""deepfleet_node.precision: the one precision rule, which the operator plans with and a
node applies to its own device when run without the operator's decision."""

from __future__ import annotations

import subprocess
import sys

import pytest
from nodetools import node_env, require

from deepfleet_node import precision


@pytest.mark.parametrize("cc", ["7.0", "7.5"])
def test_volta_and_turing_jobs_compute_in_fp16(cc):
    assert not precision.native_bf16(cc, None)
    assert precision.job_precision([(cc, None)]) == "fp16"


@pytest.mark.parametrize("cc", ["8.0", "8.6", "9.0", "10.0"])
def test_ampere_and_newer_jobs_compute_in_bf16(cc):
    assert precision.native_bf16(cc, None)
    assert precision.job_precision([(cc, None)]) == "bf16"


@pytest.mark.parametrize("gfx", ["gfx906", "gfx908", "gfx1030"])
def test_older_amd_targets_are_not_native(gfx):
    assert not precision.native_bf16(None, gfx)
    assert precision.job_precision([(None, gfx)]) == "fp16"


@pytest.mark.parametrize("gfx", ["gfx90a", "gfx942", "gfx950", "gfx1100", "gfx1201"])
def test_cdna2_and_rdna3_targets_are_native(gfx):
    assert precision.native_bf16(None, gfx)
    assert precision.native_bf16(None, gfx.upper())
    assert precision.native_bf16(None, f"{gfx}:sramecc+:xnack-")
    assert precision.job_precision([(None, gfx)]) == "bf16"


def test_unknown_or_unreadable_facts_are_not_native():
    assert not precision.native_bf16(None, None)
    assert not precision.native_bf16("", "")
    assert not precision.native_bf16("sm_80?", None)


def test_one_precision_for_the_whole_job():
    assert precision.job_precision([]) == "fp32"
    assert precision.job_precision(iter([])) == "fp32"
    assert precision.job_precision([("8.0", None), ("9.0", None), (None, "gfx942")]) == "bf16"
    assert precision.job_precision([("8.0", None), ("7.5", None)]) == "fp16"
    assert precision.job_precision([("9.0", None), (None, "gfx908")]) == "fp16"


def test_the_size_map_covers_every_precision():
    assert set(precision.BYTES) == set(precision.PRECISIONS) == {"fp32", "bf16", "fp16"}
    assert precision.BYTES == {"fp32": 4, "bf16": 2, "fp16": 2}


def test_module_imports_without_torch():
    # The operator imports it; train's package and its balance module likewise.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['deepspeed'] = None\n"
        "from deepfleet_node import precision\n"
        "from deepfleet_node.train import balance\n"
        "print(precision.job_precision([('8.0', None)]), balance.format_shares([2, 1]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=node_env(), capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "bf16 2/1", out.stderr


def test_torch_dtypes_and_the_local_rule_on_cpu():
    torch = require("torch")
    assert [precision.torch_dtype(p) for p in precision.PRECISIONS] == [
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ]
    with pytest.raises(ValueError):
        precision.torch_dtype("int8")
    assert precision.local_precision("cpu") == "fp32"
    assert precision.local_precision(torch.device("cpu")) == "fp32"
    if not torch.cuda.is_available():
        assert precision.local_precision() == "fp32"
