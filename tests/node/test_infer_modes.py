"""deepfleet_node.infer --mode replicas|tp|zero: every mode's greedy text must equal plain
transformers generate(), on real multi-rank DeepSpeed jobs over gloo."""

from __future__ import annotations

from pathlib import Path

import pytest
from nodetools import require

require("torch")
require("deepspeed")
require("transformers")

from nodetools import NEW_TOKENS, free_port, read_jsonl, run_launcher, run_ranks  # noqa: E402

from deepfleet_node.infer import cli  # noqa: E402

# The stop string ends some sampled continuations early, so in zero mode the two ranks'
# prompts finish at different steps and synced_gpus must carry the early one along.
SAMPLING = ("--temperature", "1.5", "--top-p", "0.95", "--seed", "7", "--stop", " the")


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, model_dir, prompts_file):
    """Sampled text from one process: what every mode must reproduce with the same seed."""
    out = tmp_path_factory.mktemp("sampled") / "one.jsonl"
    cli.main(["--model", str(model_dir), "--prompts", str(prompts_file), "--output",
                str(out), "--max-new-tokens", str(NEW_TOKENS), *SAMPLING])  # fmt: skip
    rows = read_jsonl(out)
    assert len({r["tokens"] for r in rows}) > 1, "pick a stop string that ends some rows early"
    return rows


def common(model_dir, prompts_file, out):
    return ("--model", model_dir, "--prompts", prompts_file, "--output", out,
            "--max-new-tokens", NEW_TOKENS)  # fmt: skip


def test_replicas_on_three_ranks_equal_reference(tmp_path, model_dir, prompts_file, reference):
    out = tmp_path / "replicas.jsonl"
    logs = run_ranks("infer", 3, *common(model_dir, prompts_file, out))
    assert read_jsonl(out) == reference
    assert "=>" in logs[0] and all("=>" not in log for log in logs[1:])


def test_tp_on_two_ranks_under_the_launcher_equals_reference(
    tmp_path, model_dir, prompts_file, reference
):
    # The launcher sets LOCAL_SIZE, so the all-reduce runs on DeepSpeed's shm op.
    out = tmp_path / "tp.jsonl"
    port = free_port()
    log = run_launcher("infer", 2, "--mode", "tp", *common(model_dir, prompts_file, out), port=port)
    assert read_jsonl(out) == reference
    assert "AutoTP, tp_size 2" in log
    assert "self_attn.o_proj" in log  # DeepSpeed's AutoTP report of the layers it split
    assert log.count("deepspeed_shm_comm_op built") == 2
    # ...and its 66 MiB per rank of /dev/shm is gone again.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_tp_sampling_over_gloo_is_seeded_like_one_process(
    tmp_path, model_dir, prompts_file, sampled, reference
):
    # No LOCAL_SIZE here, as for ranks on several nodes: DeepSpeed's shm all-reduce would
    # crash, so infer must route AutoTP's all-reduce through gloo.
    out = tmp_path / "tp-sampled.jsonl"
    logs = run_ranks("infer", 2, "--mode", "tp", *common(model_dir, prompts_file, out), *SAMPLING)
    assert "AutoTP, tp_size 2" in logs[0]
    assert not any("shm_comm_op" in log for log in logs)
    assert read_jsonl(out) == sampled
    assert sampled != reference  # it really sampled


def test_zero_on_two_ranks_equals_reference(tmp_path, model_dir, prompts_file, reference):
    out = tmp_path / "zero.jsonl"
    logs = run_ranks("infer", 2, "--mode", "zero", *common(model_dir, prompts_file, out))
    assert read_jsonl(out) == reference
    # Built partitioned (no rank held the whole model), not loaded whole and split after.
    assert "ZeRO-3 inference" in logs[0] and "built under zero.Init" in logs[0]
    assert "=>" not in logs[1]


def test_zero_sampling_is_seeded_like_one_process(tmp_path, model_dir, prompts_file, sampled):
    out = tmp_path / "zero-sampled.jsonl"
    run_ranks("infer", 2, "--mode", "zero", *common(model_dir, prompts_file, out), *SAMPLING)
    assert read_jsonl(out) == sampled


def test_mode_flags():
    args = cli.parse_args(["--model", "m", "--prompt", "p", "--output", "o"])
    assert args.mode == "replicas"
    with pytest.raises(SystemExit):
        cli.parse_args(["--model", "m", "--prompt", "p", "--output", "o", "--mode", "pp"])
    with pytest.raises(SystemExit):
        cli.parse_args(
            ["--model", "m", "--prompt", "p", "--output", "o", "--mode", "tp", "--no-deepspeed"]
        )
