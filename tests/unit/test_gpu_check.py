"""scripts/gpu_check.py's pure parts: peak table and MFU, the Llama parameter count, the
trainer's progress-line parser, the step summary, the JSON's shape, the process runner's
timeouts. The checks themselves run in `scripts/gpu-check.sh --cpu` (CI, the cpu image)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclass-free, but keep imports honest
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- peak FLOP/s and MFU


@pytest.mark.parametrize(
    "name, peak, key",
    [
        ("NVIDIA H100 80GB HBM3", 989e12, "h100"),
        ("NVIDIA H100 PCIe", 756e12, "h100 pcie"),
        ("NVIDIA H100 NVL", 835e12, "h100 nvl"),
        ("NVIDIA H200", 989e12, "h200"),
        ("NVIDIA GH200 480GB", 989e12, "gh200"),
        ("NVIDIA A100-SXM4-80GB", 312e12, "a100"),
        ("NVIDIA L40S", 362e12, "l40s"),
    ],
)
def test_peak_by_gpu_name(gc, name, peak, key):
    assert gc.peak_bf16_flops(name) == (peak, key)


@pytest.mark.parametrize("name", ["Tesla T4", "", None, "AMD Instinct MI300X"])
def test_unknown_gpu_has_no_peak(gc, name):
    assert gc.peak_bf16_flops(name) == (None, None)


def test_mfu_is_six_n_tokens_over_peak(gc):
    # 1e9 params at 50_000 tok/s: 3e14 FLOP/s of 989e12
    assert gc.mfu(10**9, 50_000.0, 989e12) == pytest.approx(6 * 10**9 * 50_000 / 989e12)
    assert gc.mfu(10**9, 50_000.0, 989e12) == pytest.approx(0.30333670, rel=1e-6)


@pytest.mark.parametrize(
    "params, tps, peak",
    [
        (10**9, None, 989e12),
        (10**9, 1e4, None),
        (0, 1e4, 989e12),
        (10**9, math.nan, 1e12),
        (10**9, -5.0, 1e12),
        (10**9, math.inf, 1e12),
    ],
)
def test_mfu_is_none_without_the_figures(gc, params, tps, peak):
    assert gc.mfu(params, tps, peak) is None


# ---------------------------------------------------------------- parameters


def test_llama_param_count_matches_tinyllama(gc):
    # TinyLlama-1.1B's config: 1,100,048,384 parameters.
    cfg = {
        "hidden_size": 2048,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "intermediate_size": 5632,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    }
    assert gc.llama_param_count(cfg) == 1_100_048_384


def test_llama_param_count_matches_transformers(gc):
    # Both counted by summing LlamaForCausalLM(config).parameters() in the cpu image.
    cfg = {
        "hidden_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 700,
        "vocab_size": 999,
        "tie_word_embeddings": False,
    }
    assert gc.llama_param_count(cfg) == 2_617_600
    tied = {**cfg, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}
    assert gc.llama_param_count(tied) == 2_368_744


# ---------------------------------------------------------------- the trainer's output

LINE = "step 3/10 loss 6.2826 lr 2.50e-04 tok/s 15532 samples/s 7.6 step_time 1.05s eta 7s"


def test_parses_a_progress_line(gc):
    rec = gc.parse_step_line(LINE)
    assert rec == {
        "step": 3,
        "total": 10,
        "loss": 6.2826,
        "lr": 2.5e-4,
        "tokens_per_s": 15532.0,
        "samples_per_s": 7.6,
        "step_time_s": 1.05,
        "eta_s": 7.0,
    }


def test_progress_line_inside_a_log(gc):
    text = "\n".join(
        [
            "training /tmp/m: 42 blocks x 2048 tokens, world 1, zero stage 2, bf16",
            "[lab1] " + LINE,
            "step 4/10 loss nan lr 3.00e-04 tok/s 0 samples/s 0.0 step_time 0.90s eta 5s",
            "step four of ten",
            "final loss 6.1",
        ]
    )
    rows = gc.parse_step_lines(text)
    assert [r["step"] for r in rows] == [3, 4]
    assert math.isnan(rows[1]["loss"])


@pytest.mark.parametrize("line", ["", "final loss 6.2", "step 3/10 loss 6.2", "exported /x"])
def test_other_lines_are_not_progress(gc, line):
    assert gc.parse_step_line(line) is None


def test_summary_leaves_out_the_warmup_step(gc):
    rows = [
        {"step": 2, "loss": 5.0, "tokens_per_s": 1000.0, "step_time_s": 2.0},
        {"step": 1, "loss": 6.0, "tokens_per_s": 10.0, "step_time_s": 200.0},
        {"step": 3, "loss": 4.0, "tokens_per_s": 3000.0, "step_time_s": 1.0},
    ]
    s = gc.summarize_steps(rows, skip=1)
    assert s["steps"] == 3 and s["measured_steps"] == 2
    assert (s["first_loss"], s["last_loss"], s["losses_finite"]) == (6.0, 4.0, True)
    # (1000 x 2 + 3000 x 1) tokens in 3 s
    assert s["tokens_per_s"] == pytest.approx(5000 / 3)
    assert s["step_time_s"] == pytest.approx(1.5)


def test_summary_flags_a_nan_loss_and_no_rows(gc):
    rows = [{"step": 1, "loss": float("nan"), "tokens_per_s": 1.0, "step_time_s": 1.0}]
    assert gc.summarize_steps(rows)["losses_finite"] is False
    empty = gc.summarize_steps([])
    assert (empty["steps"], empty["losses_finite"], empty["tokens_per_s"]) == (0, False, None)


def test_read_metrics_skips_broken_rows(gc, tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.5}\n')
    assert [r["step"] for r in gc.read_metrics(path)] == [1, 2]
    assert gc.read_metrics(tmp_path / "missing.jsonl") == []


def test_ranks_line(gc):
    text = "bridge training m: 8 blocks, world 2, ranks cuda/bf16, cpu/fp32, gloo, shared"
    assert gc.parse_ranks_line(text) == [("cuda", "bf16"), ("cpu", "fp32")]
    assert gc.parse_ranks_line("no such line") is None


@pytest.mark.parametrize(
    "text, cause",
    [
        (
            'Traceback (most recent call last):\n  File "x.py", line 1\n'
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
            "[rank0]: done\n",
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        ),
        ("ok line\nSystemExit: bad\n", "SystemExit: bad"),
        ("starting\nRuntimeError: NCCL error in: x\nmore\n", "RuntimeError: NCCL error in: x"),
        ("loading\nsome error happened here\nbye\n", "some error happened here"),
        ("just\nlines\n", "lines"),
        ("", "(no output)"),
    ],
)
def test_failure_line(gc, text, cause):
    assert gc.failure_line(text) == cause


def test_one_line_is_one_short_line(gc):
    assert gc.one_line("a\n  b\tc") == "a b c"
    assert len(gc.one_line("x" * 1000)) == 300


# ---------------------------------------------------------------- the JSON


def test_report_shape(gc):
    ok = gc.check_record("detect", 45)
    ok.update(ok=True, status="ok", seconds=1.0, numbers={"gpu_count": 1})
    bad = gc.check_record("train", 270)
    bad.update(cause="deepfleet_node.train exited 1: boom", seconds=3.0)
    rep = json.loads(json.dumps(gc.report("gpu", {"detect": ok, "train": bad}, 0.0, 4.04)))
    assert set(rep) >= {"schema", "tool", "mode", "ok", "failed", "started", "seconds", "checks"}
    assert (rep["ok"], rep["failed"], rep["mode"], rep["seconds"]) == (False, ["train"], "gpu", 4.0)
    assert list(rep["checks"]) == ["detect", "train"]
    for rec in rep["checks"].values():
        assert set(rec) == {"name", "ok", "status", "cause", "seconds", "timeout_s", "numbers"}
        assert rec["status"] == ("ok" if rec["ok"] else "failed")
    assert rep["checks"]["train"]["cause"].startswith("deepfleet_node.train exited 1")
    rep_ok = gc.report("cpu", {"detect": ok}, 0.0, 1.0)
    assert rep_ok["ok"] is True and rep_ok["failed"] == []
    assert gc.report("cpu", {}, 0.0, 0.0)["ok"] is False  # no check run is no pass


def test_arguments(gc):
    args = gc.parse_args(
        ["--cpu", "--checks", "detect,train", "--shape", "layers=8,hidden_size=512"]
    )
    assert args.cpu and args.checks == ["detect", "train"]
    assert args.shape == {"layers": 8, "hidden-size": 512}
    assert gc.shape_flags(args.shape) == ["--layers", "8", "--hidden-size", "512"]
    for bad in (["--checks", "detect,nope"], ["--shape", "depth=3"], ["--shape", "layers=x"]):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)


def test_every_check_has_a_timeout_within_the_budget(gc):
    assert set(gc.TIMEOUTS) == set(gc.CHECKS) == set(gc.CHECK_FUNCS)
    assert gc.DEFAULT_BUDGET_S < 8 * 60
    assert all(0 < t <= gc.DEFAULT_BUDGET_S for pair in gc.TIMEOUTS.values() for t in pair)


def test_result_path(gc, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gc.result_path(gc.parse_args([])) == tmp_path / "gpu-check.json"
    monkeypatch.delenv("OUT")
    path = gc.result_path(gc.parse_args([]))
    assert path.name == "gpu-check.json" and path.parent.is_dir()
    path.parent.rmdir()


# ---------------------------------------------------------------- wheels


def test_pick_wheel_takes_this_pythons_build(gc):
    pytest.importorskip("packaging")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    files = [
        Path("pydantic_core-2.50.5-cp39-cp39-manylinux2014_x86_64.whl"),
        Path(f"pydantic_core-2.50.5-{tag}-{tag}-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"),
        Path("hjson-3.1.0-py3-none-any.whl"),
    ]
    assert gc.pick_wheel(files, "hjson") == files[2]
    assert gc.pick_wheel(files, "py-cpuinfo") is None
    if sys.platform == "linux" and __import__("platform").machine() == "x86_64":
        assert gc.pick_wheel(files, "pydantic-core") == files[1]
    assert gc.wheel_dists(files) == {"pydantic_core", "hjson"}


# ---------------------------------------------------------------- processes


def test_run_procs_kills_at_the_deadline(gc, tmp_path):
    argv = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"]
    start = time.monotonic()
    ((code, text),) = gc.run_procs([(argv, {}, tmp_path / "a.log")], start + 1.5)
    assert code is None and "up" in text
    assert time.monotonic() - start < 10


def test_run_procs_stops_the_peers_of_a_failed_process(gc, tmp_path):
    fail = [sys.executable, "-c", "raise SystemExit('rank died')"]
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    start = time.monotonic()
    results = gc.run_procs(
        [(fail, {}, tmp_path / "r0.log"), (hang, {}, tmp_path / "r1.log")],
        start + 60,
        linger_s=1.0,
    )
    assert results[0][0] == 1 and "rank died" in results[0][1]
    assert results[1][0] is None
    assert time.monotonic() - start < 15


def test_run_one_reports_the_failure_line(gc, tmp_path):
    argv = [sys.executable, "-c", "import sys; print('working'); sys.exit('ValueError: no data')"]
    with pytest.raises(gc.CheckFailed, match=r"^demo exited 1: ValueError: no data$"):
        gc.run_one(argv, {}, tmp_path / "x.log", time.monotonic() + 30, "demo")
    ok = [sys.executable, "-c", "print('fine')"]
    assert "fine" in gc.run_one(ok, {}, tmp_path / "y.log", time.monotonic() + 30, "demo")


def test_flags_and_corpus_copies(gc):
    assert gc.flags(seq_len=2048, data_out=Path("/t/d.txt")) == [
        "--seq-len", "2048", "--data-out", "/t/d.txt",
    ]  # fmt: skip
    # 4 micro-batches of 8 x 2048 tokens at ~1300 tokens a copy
    assert gc.corpus_copies(2048, 8) == 52
    assert gc.corpus_copies(64, 2) == 8
