from pathlib import Path

import pytest

from deepfleet.cli import common
from deepfleet.cli import main as cli


def test_every_job_option_the_makefile_passes_parses():
    args = cli.parser().parse_args(
        ["infer", "--run", "r", "--prompts", "p.jsonl", "--output", "o.jsonl",
         "--max-new-tokens", "8", "--slots", "lab1=2 lab2=1", "--mode", "tp"]
    )  # fmt: skip
    assert common.parse_slots(args.slots) == {"lab1": 2, "lab2": 1} and args.mode == "tp"
    args = cli.parser().parse_args(
        ["train", "--model", "m", "--data", "d", "--config", "zero3", "--run", "r",
         "--epochs", "2", "--slots", "a=1", "--save-every", "5", "--resume"]
    )  # fmt: skip
    assert args.epochs == 2.0 and args.resume and common.parse_slots(args.slots) == {"a": 1}


def test_bad_slots_are_one_clear_error(capsys, tmp_path: Path):
    code = cli.main(["--state-dir", str(tmp_path), "train", "--slots", "lab1:2"])
    assert code == 1
    assert capsys.readouterr().err.strip() == "deepfleet: --slots expects NODE=N, got 'lab1:2'"


def test_commands_without_a_cluster_say_so(capsys, tmp_path: Path):
    assert cli.main(["--state-dir", str(tmp_path / "none"), "status"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no cluster is up" in err[0]


@pytest.mark.parametrize("node", ["x:99999", "@x", "x=tpu", "[fe80::1"])
def test_bad_inventory_exits_1_with_one_line(capsys, tmp_path: Path, node):
    code = cli.main(["--state-dir", str(tmp_path / "s"), "up", "--ssh-config", "/dev/null", node])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepfleet: ")
    assert not (tmp_path / "s").exists()


def test_an_unforeseen_failure_is_one_line_without_a_traceback(capsys, monkeypatch, tmp_path):
    from deepfleet.cli import cluster as cluster_cli
    from deepfleet.cli import main as cli

    def broken(args):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(cluster_cli, "cmd_status", broken)
    monkeypatch.delenv("DEEPFLEET_DEBUG", raising=False)
    parser = cli.parser()
    monkeypatch.setattr(cli, "parser", lambda: parser)
    for action in parser._subparsers._group_actions[0].choices.values():
        if action.get_default("func") is not None and action.prog.endswith(" status"):
            action.set_defaults(func=broken)
    assert cli.main(["--state-dir", str(tmp_path), "status"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deepfleet: unexpected RuntimeError: first line (DEEPFLEET_DEBUG=1 shows where)"]


def test_plan_from_report_files_names_who_sits_out_and_the_override(tmp_path, capsys):
    import json

    from unitdata import detect_report

    from deepfleet.cli import main as cli

    gpu = {"index": 0, "vendor": "nvidia", "name": "NVIDIA GeForce RTX 4090",
           "memory_bytes": 24 << 30, "compute_capability": "8.9", "driver": "580.65"}  # fmt: skip
    versions = dict(detect_report()["versions"], torch="2.13.0+cu130", cuda="13.0")
    (tmp_path / "desktop.json").write_text(json.dumps(detect_report(
        ips=["192.0.2.10"], accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu],
        versions=versions, torch_arch_list=["sm_89"],
    )))  # fmt: skip
    (tmp_path / "laptop.json").write_text(json.dumps(detect_report(ips=["192.0.2.11"])))
    files = [str(tmp_path / "desktop.json"), str(tmp_path / "laptop.json")]
    assert cli.main(["plan", "--reports", *files]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("plan: 1 ranks on 1 machine(s), backend nccl, bf16, master desktop")
    assert out[2] == (
        "  laptop       left out: cpu while the job runs on cuda (one job needs one backend); "
        "to use it: --backend cpu"
    )
    assert cli.main(["plan", "--reports", *files, "--backend", "cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [n["name"] for n in plan["nodes"]] == ["laptop"] and plan["backend"] == "gloo"
    assert plan["left_out"][0]["name"] == "desktop"


def test_plan_with_a_model_shape_gives_the_memory_verdict_and_auto_config(tmp_path, capsys):
    import json

    from unitdata import detect_report

    from deepfleet.cli import main as cli

    for name, limit in (("big", None), ("small", 2 << 30)):
        (tmp_path / f"{name}.json").write_text(json.dumps(detect_report(
            ips=[f"192.0.2.{len(name)}"], cpu_count=2, memory_limit_bytes=limit,
        )))  # fmt: skip
    # a 100M-parameter Llama shape, as modelinfo prints it
    info = {"params": 100_000_000, "largest_layer_params": 32000 * 512, "layers": 8,
            "hidden_size": 512, "heads": 8, "vocab_size": 32000}  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps(info))
    files = [str(tmp_path / "big.json"), str(tmp_path / "small.json")]
    args = ["plan", "--reports", *files, "--model-info", str(tmp_path / "m.json")]
    assert cli.main(args + ["--micro-batch", "2", "--seq-len", "128"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("deepfleet: small: m (0.10B params) does not fit with zero2")
    assert "SLOTS=small=0 (leave small out)" in err and len(err.splitlines()) == 1
    auto = args + ["--micro-batch", "2", "--seq-len", "128", "--config", "auto", "--json"]
    assert cli.main(auto) == 0
    plan = json.loads(capsys.readouterr().out)
    train = plan["train"]
    assert train["config"] == "zero2" and train["memory"]["fits"]
    assert [r["machine"] for r in train["ranks"]] == ["big"]
    (out,) = plan["left_out"]
    assert out["name"] == "small" and "small RAM needs" in out["reason"]
    assert cli.main(["plan", "--reports", *files, "--model-info", files[0]]) == 1
    assert "is not modelinfo's JSON" in capsys.readouterr().err


def save_desk_and_laptop(state_dir, laptop: dict) -> None:
    """A saved cluster of a desktop with an RTX 4090 and a laptop without a GPU."""
    from unitdata import detect_report, inv

    from deepfleet.machines.state import ClusterState, NodeState, StateStore

    gpu = {"index": 0, "vendor": "nvidia", "name": "NVIDIA GeForce RTX 4090",
           "memory_bytes": 24 << 30, "compute_capability": "8.9", "driver": "580.65"}  # fmt: skip
    versions = dict(detect_report()["versions"], torch="2.13.0+cu130", cuda="13.0")
    desk = detect_report(accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu], versions=versions,
                         torch_arch_list=["sm_89"])  # fmt: skip
    specs = inv("desk", "laptop").nodes
    state = ClusterState("c0ffee", "deepfleet/cpu:latest", [
        NodeState(specs[0], "cuda", report=desk), NodeState(specs[1], "cpu", report=laptop),
    ])  # fmt: skip
    StateStore(state_dir).save(state)


def test_train_dry_run_prints_the_split_and_the_launch_a_bridge_job_would_run(tmp_path, capsys):
    from unitdata import detect_report

    save_desk_and_laptop(tmp_path, detect_report(cpu_count=4))
    base = ["--state-dir", str(tmp_path), "train", "--dry-run", "--micro-batch", "3"]
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert "laptop       left out: cpu while the job runs on cuda" in out
    assert "deepspeed --hostfile" in out and "--module deepfleet_node.train" in out
    assert "micro-batch per rank: desk 3" in out and "--balance speed" in out
    assert cli.main(base + ["--bridge"]) == 0
    out = capsys.readouterr().out
    assert "2 ranks on 2 machine(s), backend gloo, precision per rank bf16,fp32" in out
    assert "micro-batch per rank: desk 5, laptop 1" in out
    assert "--module deepfleet_node.train.bridge" in out and "--deepspeed-config" not in out
    assert "--precision bf16,fp32" in out  # the operator's decision, one per rank


def test_serve_dry_run_puts_a_replica_on_the_gpu_desk_and_the_laptop(tmp_path, capsys):
    from unitdata import detect_report

    save_desk_and_laptop(tmp_path, detect_report())
    assert cli.main(["--state-dir", str(tmp_path), "serve", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "serve: 2 replica(s) on 2 machine(s); model size unknown" in out
    assert "  desk/0       GPU 0      http://10.0.0.1:8760" in out
    assert "  laptop/0     CPU        http://10.0.0.2:8760" in out
    assert "gateway: http://127.0.0.1:8000/v1" in out
    refused = ["--state-dir", str(tmp_path), "serve", "--dry-run", "--listen", "10.0.0.9"]
    assert cli.main(refused) == 1
    assert "--listen 10.0.0.9: an endpoint other machines can reach needs --api-key" in (
        capsys.readouterr().err
    )


def test_plan_predicts_each_config_and_reads_measured_links(tmp_path, capsys):
    import json

    from unitdata import detect_report

    gpu = {"index": 0, "vendor": "nvidia", "name": "NVIDIA GeForce RTX 4090",
           "memory_bytes": 24 << 30, "compute_capability": "8.9", "driver": "580.65"}  # fmt: skip
    versions = dict(detect_report()["versions"], torch="2.13.0+cu130", cuda="13.0")
    for i, name in enumerate(("desk1", "desk2")):
        (tmp_path / f"{name}.json").write_text(json.dumps(detect_report(
            ips=[f"192.0.2.{10 + i}"], accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu],
            versions=versions, torch_arch_list=["sm_89"], memory_bytes=64 << 30,
        )))  # fmt: skip
    # TinyLlama's shape: 1.1B parameters
    info = {"params": 1_100_048_384, "largest_layer_params": 32000 * 2048, "layers": 22,
            "hidden_size": 2048, "heads": 32, "vocab_size": 32000}  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps(info))
    files = [str(tmp_path / "desk1.json"), str(tmp_path / "desk2.json")]
    args = ["plan", "--reports", *files, "--model-info", str(tmp_path / "m.json"),
            "--seq-len", "512", "--micro-batch", "1", "--config", "auto"]  # fmt: skip
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    # 2 x 1/2 x 1.1e9 x 2 bytes = 2.2 GB over 1 GbE (117 MB/s): 18.8 s
    assert (
        "predicted: 18.8 s per step with zero2 (100% on the network; bottleneck: the "
        "desk1-desk2 link, 117 MB/s); assumed 1 GbE for links not measured" in out
    )
    assert " *zero2" in out and "  zero3           28.3 s, 100% network" in out
    links = {"links": [{"a": "desk2", "b": "desk1", "a_to_b_bps": 11.5e6, "b_to_a_bps": 112e6,
                        "rtt_s": 0.002, "measured_at": 1.7e9}]}  # fmt: skip
    (tmp_path / "links.json").write_text(json.dumps(links))
    assert cli.main(args + ["--links", str(tmp_path / "links.json"), "--json"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert train["prediction"]["bottleneck"] == "the desk2-desk1 link, 12 MB/s"
    assert train["prediction"]["step_s"] == pytest.approx(2.2e9 / 11.5e6, rel=0.01)
    assert [c["config"] for c in train["candidates"]][1:] == ["zero2", "zero3", "zero3-offload"]


def test_train_dry_run_with_a_model_shape_shows_every_candidate(tmp_path, capsys):
    import json

    from unitdata import detect_report

    save_desk_and_laptop(tmp_path, detect_report(cpu_count=4))
    info = {"params": 100_000_000, "largest_layer_params": 32000 * 512, "layers": 8,
            "hidden_size": 512, "heads": 8, "vocab_size": 32000}  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps(info))
    base = ["--state-dir", str(tmp_path), "train", "--dry-run", "--config", "auto"]
    assert cli.main(base + ["--model-info", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "memory: fits with zero2" in out and "predicted: " in out
    assert "candidates (predicted time per step; memory):" in out
    for config in ("zero1", "zero2", "zero3", "zero3-offload"):
        assert f"{config} " in out
    assert "deepspeed --hostfile" in out and "--deepspeed-config zero2" in out
    assert cli.main(base) == 0
    assert "--model-info FILE judges it here" in capsys.readouterr().out
