"""Shared fixtures for the node-workload tests: real tiny models, real DeepSpeed, no mocks."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from nodetools import (
    IN_IMAGE,
    NEW_TOKENS,
    NODE_DIR,
    PROMPTS,
    TRAIN_ARGS,
    instruction_data,
    pair_args,
    require,
    run_module,
    run_ranks,
)

if NODE_DIR.is_dir():  # a checkout; inside the node image the package is installed
    sys.path.insert(0, str(NODE_DIR))

# Inside a node image (DEEPFLEET_IN_IMAGE=1, scripts/test-node.sh) a test may skip only for
# one of these reasons (regular expressions, searched in the skip's reason); any other
# skip fails the run, so a test that quietly stopped running is noticed.
EXPECTED_SKIPS = {
    r"the CUDA toolkit is in the cuda image only": "test_image: the cpu and rocm images",
    r"could not import 'datasets'": "test_data: save_to_disk input needs the optional datasets",
    # tests/sharedata.py: locally only; under CI a missing ../shared fails instead
    r"is absent \(shared/ is read beside the clone": "test_gpusample: no ../shared (outside CI)",
}


def skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def unexpected_skip(report) -> str | None:
    """The reason of a skip that EXPECTED_SKIPS does not list, when in a node image."""
    if not IN_IMAGE or not report.skipped or hasattr(report, "wasxfail"):
        return None
    reason = skip_reason(report.longrepr)
    if any(re.search(pattern, reason) for pattern in EXPECTED_SKIPS):
        return None
    return reason


def fail_unexpected_skip(report) -> None:
    reason = unexpected_skip(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = (
            f"unexpected skip in the node image: {reason}\n(a skip here must be one of "
            f"tests/node/conftest.py EXPECTED_SKIPS: {sorted(EXPECTED_SKIPS)})"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    fail_unexpected_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    fail_unexpected_skip(outcome.get_result())


# Tiny models on small CPUs run far slower with several OpenMP threads than with one
# (thread wake-up dominates 64-wide matmuls), and two ranks on two cores oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny model + tokenizer, and learnable training text at train.txt beside it."""
    require("torch")
    require("transformers")
    from deepfleet_node import tiny

    out = tmp_path_factory.mktemp("tiny")
    tiny.main(["--out", str(out / "model"), "--data-out", str(out / "train.txt")])
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_dir) -> Path:
    return tiny_dir / "model"


@pytest.fixture(scope="session")
def train_text(tiny_dir) -> Path:
    return tiny_dir / "train.txt"


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory, tiny_model, train_text) -> tuple[Path, str]:
    """One 40-step ZeRO-2 training run shared by the training and inference tests."""
    require("deepspeed")
    out = tmp_path_factory.mktemp("zero2")
    log = run_module(
        "train",
        "--model", tiny_model, "--data", train_text, "--output", out,
        "--deepspeed-config", "zero2", "--steps", "40", "--log-every", "5",
        "--save-every", "20", *TRAIN_ARGS,
    )  # fmt: skip
    return out, log


@pytest.fixture(scope="session")
def mixed_data(tmp_path_factory, train_text) -> Path:
    return instruction_data(tmp_path_factory.mktemp("mixed") / "data", train_text)


@pytest.fixture(scope="session")
def even_pair_run(tmp_path_factory, tiny_model, mixed_data) -> tuple[Path, list[str]]:
    """Two ZeRO-2 ranks over gloo with an explicit even split (PAIR_ARGS): what uneven
    splits, speed balancing and the bridge must reproduce step by step."""
    require("deepspeed")
    out = tmp_path_factory.mktemp("even-pair") / "run"
    logs = run_ranks("train", 2, *pair_args(tiny_model, mixed_data, out), "--shares", "2,2")
    return out, logs


@pytest.fixture(scope="session")
def model_dir(zero2_run) -> Path:
    # A trained model: its greedy continuations are text, not one repeated token, and its
    # top-1 logit leads by far more than tensor parallelism's rounding differences.
    return zero2_run[0] / "final"


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="session")
def reference(model_dir) -> list[dict]:
    """Plain single-process transformers generate(): what every inference mode must equal."""
    from deepfleet_node.infer.generate import reference_generate

    return reference_generate(str(model_dir), PROMPTS, NEW_TOKENS)
