"""The truth check (#31 point 4) on a real run: given the operator's --predicted-step-s,
rank 0 prints measured against predicted step time once, at the first progress line after
the warm-up step, and every metrics.jsonl record carries the prediction beside the
measured step time. Without it nothing changes (test_train.py's records)."""

from __future__ import annotations

import json
import re

import pytest
from nodetools import require

require("torch")
require("deepspeed")
require("transformers")

from nodetools import LOG_LINE, TRAIN_ARGS, run_module, run_ranks  # noqa: E402

TRUTH = re.compile(
    r"^step time: measured ([\d.]+) (s|ms), predicted ([\d.]+) (s|ms) \(([\d.]+)x\)$", re.M
)


def seconds(value: str, unit: str) -> float:
    return float(value) / (1000 if unit == "ms" else 1)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rank0_prints_measured_against_predicted_after_the_warm_up(
    tmp_path, tiny_model, train_text
):
    out = tmp_path / "run"
    log = run_module(
        "train", "--model", tiny_model, "--data", train_text, "--output", out,
        "--deepspeed-config", "zero2", "--steps", "4", "--log-every", "1",
        "--predicted-step-s", "0.5", *TRAIN_ARGS,
    )  # fmt: skip
    found = TRUTH.findall(log)
    assert len(found) == 1, log[-3000:]
    lines = log.splitlines()
    at = next(i for i, line in enumerate(lines) if TRUTH.match(line))
    # after step 2's line: step 1 was the warm-up, step 2 the first measured
    assert LOG_LINE.match(lines[at - 1]) and lines[at - 1].startswith("step 2/4 "), lines
    measured_v, measured_u, predicted_v, predicted_u, ratio = found[0]
    assert seconds(predicted_v, predicted_u) == pytest.approx(0.5)
    rows = records(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["predicted_step_time_s"] == 0.5 for r in rows)
    # --log-every 1: step 2's record is that one step, the figure the line measured
    measured = seconds(measured_v, measured_u)
    assert measured == pytest.approx(rows[1]["step_time_s"], rel=0.06, abs=6e-4)
    assert float(ratio) == pytest.approx(measured / 0.5, rel=0.06, abs=0.006)
    assert len(LOG_LINE.findall(log)) == 4  # the progress lines are as they were
    print(found and next(line for line in lines if TRUTH.match(line)))


def test_two_ranks_and_no_prediction(tmp_path, tiny_model, train_text):
    out = tmp_path / "pair"
    logs = run_ranks(
        "train", 2, "--model", tiny_model, "--data", train_text, "--output", out,
        "--deepspeed-config", "zero3", "--steps", "3", "--log-every", "3",
        "--predicted-step-s", "2", *TRAIN_ARGS,
    )  # fmt: skip
    assert len(TRUTH.findall(logs[0])) == 1 and not TRUTH.findall(logs[1])
    assert all(r["predicted_step_time_s"] == 2.0 for r in records(out))
    plain = tmp_path / "plain"
    log = run_module(
        "train", "--model", tiny_model, "--data", train_text, "--output", plain,
        "--steps", "2", "--log-every", "1", *TRAIN_ARGS,
    )  # fmt: skip
    assert not TRUTH.findall(log)
    assert all("predicted_step_time_s" not in r for r in records(plain))
