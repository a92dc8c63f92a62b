from pathlib import Path

import pytest

from deepfleet import cli


def test_every_job_option_the_makefile_passes_parses():
    args = cli.parser().parse_args(
        ["infer", "--run", "r", "--prompts", "p.jsonl", "--output", "o.jsonl",
         "--max-new-tokens", "8", "--slots", "lab1=2 lab2=1", "--mode", "tp"]
    )  # fmt: skip
    assert cli._slots(args.slots) == {"lab1": 2, "lab2": 1} and args.mode == "tp"
    args = cli.parser().parse_args(
        ["train", "--model", "m", "--data", "d", "--config", "zero3", "--run", "r",
         "--epochs", "2", "--slots", "a=1", "--save-every", "5", "--resume"]
    )  # fmt: skip
    assert args.epochs == 2.0 and args.resume and cli._slots(args.slots) == {"a": 1}


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
    from deepfleet import cli

    def broken(args):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(cli, "cmd_status", broken)
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

    from deepfleet import cli

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
