"""The DeepSpeed config deepfleet_node.train builds from a shipped config plus the CLI."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from deepfleet_node.train import args as train_args
from deepfleet_node.train import config, metrics

NAMES = ["zero1", "zero2", "zero3", "zero3-offload"]


def build(name="zero2", *cli, world=2, precision="fp32", device="cpu", shared=True):
    base = ["--model", "m", "--data", "d", "--output", "o", "--deepspeed-config", name]
    args = train_args.parse_args([*base, *cli])
    ga = config.grad_accum_steps(args, world)
    steps = args.steps
    return config.build_ds_config(args, world, ga, precision, steps, device, shared)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_configs_are_concrete(name):
    text = (resources.files("deepfleet_node") / "configs" / f"{name}.json").read_text()
    assert '"auto"' not in text
    cfg = json.loads(text)
    stage = int(name[4])
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["optimizer"]["type"] == "AdamW"


def test_offload_config_offloads_params_and_optimizer():
    zero = build("zero3-offload")["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"


def test_batch_sizes_are_consistent():
    cfg = build("zero2", "--micro-batch", "3", "--global-batch", "24", world=2)
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 24


def test_global_batch_must_divide():
    args = train_args.parse_args(
        ["--model", "m", "--data", "d", "--output", "o", "--global-batch", "10"]
    )
    with pytest.raises(SystemExit):
        config.grad_accum_steps(args, 3)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_blocks_follow_the_runtime_choice(precision):
    cfg = build("zero2", precision=precision, device="cuda")
    assert cfg["bf16"]["enabled"] is (precision == "bf16")
    assert cfg["fp16"]["enabled"] is (precision == "fp16")
    assert cfg["fp16"].get("initial_scale_power") == 16  # the file's other settings survive


def test_cpu_uses_torch_adam_except_with_offload():
    assert build("zero2")["optimizer"]["params"]["torch_adam"] is True
    assert "torch_adam" not in build("zero3-offload")["optimizer"]["params"]
    assert "torch_adam" not in build("zero2", device="cuda")["optimizer"]["params"]


def test_lr_and_schedule_follow_the_cli():
    cfg = build("zero2", "--lr", "0.01", "--steps", "50", "--warmup-steps", "5")
    assert cfg["optimizer"]["params"]["lr"] == 0.01
    assert cfg["scheduler"]["params"] == {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 0.01,
        "warmup_num_steps": 5,
        "total_num_steps": 50,
        "warmup_type": "linear",
    }
    short = build("zero2", "--steps", "1", "--warmup-steps", "10")["scheduler"]["params"]
    assert short["warmup_num_steps"] == 1 and short["total_num_steps"] == 2


def test_cpu_adjustments_and_storage_mode():
    zero = build("zero3-offload")["zero_optimization"]
    assert zero["overlap_comm"] is False and zero["offload_param"]["pin_memory"] is False
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert build("zero2", shared=False)["checkpoint"]["use_node_local_storage"] is True
    assert build("zero2", shared=True)["checkpoint"]["use_node_local_storage"] is False


def test_config_path_and_unknown_names(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    cfg = build(str(path))
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["scheduler"]["type"] == "WarmupDecayLR"
    with pytest.raises(FileNotFoundError):
        config.resolve_config("zero9")


def test_log_line_format():
    rec = {"step": 10, "loss": 3.12344, "lr": 0.001, "tokens_per_s": 1234.4,
           "samples_per_s": 5.62, "step_time_s": 0.1234, "eta_s": 5.2}  # fmt: skip
    assert metrics.log_line(rec, 60) == (
        "step 10/60 loss 3.1234 lr 1.00e-03 tok/s 1234 samples/s 5.6 step_time 0.12s eta 5s"
    )


@pytest.mark.parametrize(
    ("asked", "total", "every"),
    [(5, 60, 5), (0, 60, 10), (0, 3, 1), (0, 1, 1), (0, 10_000, 50), (0, 100, 17)],
)
def test_progress_lines_come_about_six_a_run_unless_asked(asked, total, every):
    assert metrics.log_interval(asked, total) == every
