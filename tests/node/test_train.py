"""deepfleet_node.train end to end: real DeepSpeed on CPU over gloo, tiny model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from nodetools import require

torch = require("torch")
require("deepspeed")
require("transformers")

from nodetools import (  # noqa: E402
    LOG_LINE,
    TRAIN_ARGS,
    instruction_data,
    logged,
    run_module,
    run_ranks,
)

METRIC_KEYS = {
    "step", "loss", "lr", "tokens_per_s", "samples_per_s", "step_time_s", "eta_s", "micro_batches"
}  # fmt: skip


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def block_loss(model_dir, train_text, n_tokens=256):
    """Mean LM loss of a saved model on the start of the training text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(train_text.read_text(), return_tensors="pt")["input_ids"][:, :n_tokens]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_zero2_training_lowers_loss(zero2_run, tiny_model, train_text):
    out, log = zero2_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert all(set(r) == METRIC_KEYS for r in rows)
    assert all(r["micro_batches"] == [4] for r in rows)
    assert "balance: micro-batch per rank 4 (even split)" in log
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, rows
    assert logged(log) == {r["step"]: pytest.approx(r["loss"], abs=1e-4) for r in rows}
    assert all(m[2] == "40" for m in LOG_LINE.finditer(log))
    assert re.search(rf"^final loss {rows[-1]['loss']:.4f}$", log, re.M)
    assert f"exported {out / 'final'}" in log
    assert (out / "checkpoints" / "latest").read_text().strip() == "global_step40"
    assert (out / "checkpoints" / "global_step20").is_dir()
    assert block_loss(out / "final", train_text) < block_loss(tiny_model, train_text) - 1.0


def test_export_is_a_complete_hf_model(zero2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = zero2_run[0] / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert (final / "model.safetensors").is_file()
    assert model.config.use_cache is True
    assert tok.eos_token_id == model.config.eos_token_id


def constant_lr_config(tmp_path):
    """zero2 with a warmup-then-constant schedule, so the total step count cannot change
    the learning rate and an interrupted run can be compared with a straight one."""
    from importlib import resources

    cfg = json.loads((resources.files("deepfleet_node") / "configs" / "zero2.json").read_text())
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_type": "linear"}}
    path = tmp_path / "constant.json"
    path.write_text(json.dumps(cfg))
    return path


def test_resume_continues_where_it_stopped(tmp_path, tiny_model, train_text):
    config = constant_lr_config(tmp_path)
    common = ("--model", tiny_model, "--data", train_text, "--deepspeed-config", config,
              "--log-every", "5", "--save-every", "10", *TRAIN_ARGS)  # fmt: skip
    run_module("train", *common, "--output", tmp_path / "a", "--steps", "20")
    resumed = run_module("train", *common, "--output", tmp_path / "a", "--steps", "30", "--resume")
    straight = run_module("train", *common, "--output", tmp_path / "b", "--steps", "30")

    assert "resumed from step 20" in resumed
    after = logged(resumed)
    assert min(after) > 20 and max(after) == 30
    # Same weights, optimizer moments, schedule position and batches as the straight run.
    assert after == pytest.approx({s: logged(straight)[s] for s in after}, abs=2e-4)
    assert [r["step"] for r in metrics(tmp_path / "a")] == [5, 10, 15, 20, 25, 30]


def test_resume_without_checkpoint_starts_fresh(tmp_path, tiny_model, train_text):
    log = run_module(
        "train", "--model", tiny_model, "--data", train_text, "--output", tmp_path,
        "--steps", "2", "--log-every", "1", "--resume", *TRAIN_ARGS,
    )  # fmt: skip
    assert "starting from step 0" in log
    assert sorted(logged(log)) == [1, 2]


def test_zero3_with_activation_checkpointing_exports_gathered_weights(
    tmp_path, tiny_model, train_text
):
    log = run_module(
        "train", "--model", tiny_model, "--data", train_text, "--output", tmp_path,
        "--deepspeed-config", "zero3", "--steps", "12", "--log-every", "4",
        "--activation-checkpointing", *TRAIN_ARGS,
    )  # fmt: skip
    assert sorted(logged(log)) == [4, 8, 12]
    assert block_loss(tmp_path / "final", train_text) < block_loss(tiny_model, train_text) - 0.3


def test_two_ranks_zero3_over_gloo(tmp_path, tiny_model, train_text):
    data_dir = instruction_data(tmp_path / "data", train_text)
    out = tmp_path / "run"
    logs = run_ranks(
        "train", 2, "--model", tiny_model, "--data", data_dir, "--output", out,
        "--deepspeed-config", "zero3", "--steps", "6", "--log-every", "3",
        "--seq-len", "64", "--micro-batch", "2", "--global-batch", "8", "--lr", "3e-3",
        "--shares", "3,1",  # uneven micro-batches under ZeRO-3's per-layer gathers
    )  # fmt: skip
    assert "world 2, micro-batch 2, grad-accum 2, global batch 8" in logs[0]
    assert "balance: micro-batch per rank 3/1 (from --shares)" in logs[0]
    assert [r["micro_batches"] for r in metrics(out)] == [[3, 1], [3, 1]]
    assert "shared checkpoint storage" in logs[0]
    assert sorted(logged(logs[0])) == [3, 6]
    assert not logged(logs[1])  # only global rank 0 reports
    assert [r["step"] for r in metrics(out)] == [3, 6]
    shards = sorted(p.name for p in (out / "checkpoints" / "global_step6").iterdir())
    assert any("rank_1" in name for name in shards), shards
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final").config.vocab_size > 0


def test_resume_with_a_disk_per_node(tmp_path, tiny_model, train_text):
    """deepfleet nodes do not share a filesystem: every node must hold what its ranks
    need to resume, not only the node of global rank 0."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    common = ("train", 2, "--model", tiny_model, "--data", train_text, "--output", "run",
              "--deepspeed-config", "zero2", "--log-every", "2", "--save-every", "2",
              "--seq-len", "64", "--micro-batch", "2")  # fmt: skip
    first = run_ranks(*common, "--steps", "4", node_dirs=nodes)
    assert "node-local checkpoint storage" in first[0]
    for node in nodes:
        assert (node / "run" / "checkpoints" / "latest").read_text() == "global_step4"
        assert (
            node / "run" / "checkpoints" / "global_step4" / "mp_rank_00_model_states.pt"
        ).is_file()
    second = run_ranks(*common, "--steps", "6", "--resume", node_dirs=nodes)
    assert "resumed from step 4" in second[0]
    assert sorted(logged(second[0])) == [6]
    assert (nodes[0] / "run" / "final" / "model.safetensors").is_file()
    assert not (nodes[1] / "run" / "final").exists()  # the export is rank 0's alone


def cpu_adam_built() -> bool:
    """zero3-offload trains with DeepSpeed's cpu_adam op, which takes minutes to compile
    on a small CPU; run the test only where it is already built (e.g. the node image)."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("cpu_adam") or os.environ.get("DEEPFLEET_SLOW_TESTS") == "1":
        return True
    cache = Path.home() / ".cache" / "torch_extensions"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", cache))
    return any(root.glob("*/cpu_adam/*.so")) or any(root.glob("cpu_adam/*.so"))


@pytest.mark.skipif(not cpu_adam_built(), reason="cpu_adam op not built; DEEPFLEET_SLOW_TESTS=1")
def test_zero3_offload(tmp_path, tiny_model, train_text):
    log = run_module(
        "train", "--model", tiny_model, "--data", train_text, "--output", tmp_path,
        "--deepspeed-config", "zero3-offload", "--steps", "12", "--log-every", "4", *TRAIN_ARGS,
    )  # fmt: skip
    losses = logged(log)
    assert sorted(losses) == [4, 8, 12] and losses[12] < losses[4]
    assert block_loss(tmp_path / "final", train_text) < block_loss(tiny_model, train_text) - 0.3
