"""Shared fixtures for the node-workload tests: real tiny models, real DeepSpeed, no mocks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from nodetools import (
    NEW_TOKENS,
    NODE_DIR,
    PROMPTS,
    TRAIN_ARGS,
    instruction_data,
    pair_args,
    run_module,
    run_ranks,
)

if NODE_DIR.is_dir():  # a checkout; inside the node image the package is installed
    sys.path.insert(0, str(NODE_DIR))

# Tiny models on small CPUs run far slower with several OpenMP threads than with one
# (thread wake-up dominates 64-wide matmuls), and two ranks on two cores oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny model + tokenizer, and learnable training text at train.txt beside it."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
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
    pytest.importorskip("deepspeed")
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
    pytest.importorskip("deepspeed")
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
    from deepfleet_node import infer

    return infer.reference_generate(str(model_dir), PROMPTS, NEW_TOKENS)
