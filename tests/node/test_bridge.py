"""deepfleet_node.train.bridge: data parallelism over gloo without DeepSpeed's engine, two CPU
ranks (no GPU here: the cuda/bf16 path is not exercised)."""

from __future__ import annotations

import shutil

import pytest
from nodetools import require

torch = require("torch")
require("deepspeed")  # its lr schedulers, and train to compare with
require("transformers")

from nodetools import logged, pair_args, read_jsonl, run_ranks  # noqa: E402


@pytest.fixture(scope="module")
def bridge_run(tmp_path_factory, tiny_model, mixed_data):
    out = tmp_path_factory.mktemp("bridge") / "run"
    args = pair_args(tiny_model, mixed_data, out)
    logs = run_ranks("train.bridge", 2, *args, "--balance", "speed", "--save-every", "3")
    return out, logs


def test_bridge_steps_like_train_py(bridge_run, even_pair_run):
    out, logs = bridge_run
    rows, reference = (
        read_jsonl(out / "metrics.jsonl"),
        read_jsonl(even_pair_run[0] / "metrics.jsonl"),
    )
    assert [set(r) for r in rows] == [set(r) for r in reference]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert "ranks cpu/fp32, cpu/fp32, gloo" in logs[0]
    assert "balance: micro-batch per rank" in logs[0] and "from calibration" in logs[0]
    assert logged(logs[0]) == {r["step"]: pytest.approx(r["loss"], abs=1e-4) for r in rows}
    assert not logged(logs[1])
    losses = [r["loss"] for r in rows]
    print("bridge vs train losses:", list(zip(losses, [r["loss"] for r in reference], strict=True)))
    # Before any update the loss depends on weights and data alone.
    assert losses[0] == pytest.approx(reference[0]["loss"], rel=1e-6)
    # Same AdamW, clipping and DeepSpeed schedule: the whole run follows train's.
    assert losses == pytest.approx([r["loss"] for r in reference], rel=1e-4)
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in reference])
    assert losses[-1] < losses[0] - 0.05


def test_bridge_exports_a_loadable_hf_model(bridge_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = bridge_run[0] / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.use_cache is True
    ids = tok("The keeper", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_bridge_resumes_where_it_stopped(tmp_path, bridge_run, tiny_model, mixed_data):
    """Back to the step-3 checkpoint of the same run: steps 4 and 5 come out the same."""
    straight, _ = bridge_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "checkpoints" / "latest").write_text("global_step3")
    shutil.rmtree(out / "final")
    logs = run_ranks("train.bridge", 2, *pair_args(tiny_model, mixed_data, out), "--resume")
    assert "resumed from step 3" in logs[0]
    assert sorted(logged(logs[0])) == [4, 5]
    rows, before = read_jsonl(out / "metrics.jsonl"), read_jsonl(straight / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in before], rel=1e-5)
    assert (out / "final" / "model.safetensors").is_file()


def test_precision_is_one_value_or_one_per_rank():
    from deepfleet_node.train import bridge

    base = ["--model", "m", "--data", "d", "--output", "o"]
    assert bridge.parse_args(base).precision == ["auto"]
    assert bridge.parse_args([*base, "--precision", "bf16"]).precision == ["bf16"]
    per_rank = bridge.parse_args([*base, "--precision", "bf16,fp32,fp32"]).precision
    assert per_rank == ["bf16", "fp32", "fp32"]
    for refused in ("fp16", "bf16,fp16", "bf17", "bf16,,fp32"):
        with pytest.raises(SystemExit):
            bridge.parse_args([*base, "--precision", refused])
    cpu = torch.device("cpu")
    assert [bridge.rank_precision(per_rank, r, 3, cpu) for r in range(3)] == per_rank
    assert bridge.rank_precision(["bf16"], 2, 3, cpu) == "bf16"
    assert bridge.rank_precision(["auto"], 0, 1, cpu) == "fp32"  # the node's rule: a CPU
    with pytest.raises(SystemExit, match="2 values for 3 ranks"):
        bridge.rank_precision(["bf16", "fp32"], 0, 3, cpu)
    assert bridge.compute_dtype("fp32") is None
    assert bridge.compute_dtype("bf16") is torch.bfloat16
