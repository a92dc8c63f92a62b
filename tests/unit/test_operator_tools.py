"""The operator's tools without a machine: what the quiet terminal leaves out, how job
logs are read and labelled, status's progress fields and schema, the shell's ssh line."""

from __future__ import annotations

import copy
import json
import subprocess

import jsonschema
import pytest
from unitdata import two_node_plan

from deepfleet.health import status
from deepfleet.inventory.nodes import NodeSpec
from deepfleet.jobs import joblogs
from deepfleet.jobs.launch import LinePrefixer
from deepfleet.machines import interactive
from deepfleet.machines.state import ClusterState, NodeState

# Lines recorded from the lab's demo (deepfleet -v), by what a person needs to see.
CHATTER = [
    "[2026-12-02 06:12:58,431] [INFO] [launch.py:174:main] Setting CUDA_VISIBLE_DEVICES=0",
    "[2026-12-02 06:13:00,165] [WARNING] [real_accelerator.py:213:get_accelerator] Setting "
    "accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
    "[W1202 06:13:08.123456 1340 ProcessGroupGloo.cpp:750] Warning: Unable to resolve hostname",
    "/opt/venv/lib/python3.11/site-packages/torch/distributed/c10d.py:120: FutureWarning: "
    "`torch.distributed._all_gather_base` is deprecated",
    "  warnings.warn(",
    "=== demo rank 1 on 3f2a9c1b started 2026-12-02 06:13:00 ===",
]
SHOWN = [
    "step 10/60 loss 4.1234 lr 3.00e-03 tok/s 6016 samples/s 94.0 step_time 0.09s eta 41s",
    "balance: micro-batch per rank 3/5 (relative speed 0.73/1.00, from calibration)",
    "[2026-11-25 16:20:40,326] [ERROR] [launch.py:259:sigkill_handler] exits with return code = -9",
    "Traceback (most recent call last):",
    "RuntimeError: CUDA out of memory",
    "exported /workspace/checkpoints/demo/final",
]


def _feed(verbose: bool) -> tuple[list[str], LinePrefixer]:
    out: list[str] = []
    prefixer = LinePrefixer(two_node_plan(), out.append, verbose=verbose)
    prefixer.feed("".join(f"10.0.0.3: {line}\n" for line in CHATTER + SHOWN).encode())
    return out, prefixer


def test_quiet_output_keeps_progress_errors_and_tracebacks_only():
    out, prefixer = _feed(verbose=False)
    assert out == [f"[lab2] {line}\n" for line in SHOWN]
    assert len(prefixer.lines) == len(CHATTER + SHOWN)  # what was hidden is still read
    assert prefixer.failed == ("lab2", -9)


def test_verbose_output_is_everything():
    out, _ = _feed(verbose=True)
    assert out == [f"[lab2] {line}\n" for line in CHATTER + SHOWN]


def test_the_source_line_under_a_warning_is_chatter_an_indented_line_elsewhere_is_not():
    out: list[str] = []
    prefixer = LinePrefixer(two_node_plan(), out.append, verbose=False)
    lines = [
        "10.0.0.3: /opt/venv/lib/python3.11/site-packages/torch/x.py:9: UserWarning: old",
        "10.0.0.2: step 1/2 loss 3.0",  # another machine's line between them
        "10.0.0.3:   return func(*args, **kwargs)",
        '10.0.0.3:   File "train.py", line 3, in <module>',
    ]
    prefixer.feed("".join(f"{line}\n" for line in lines).encode())
    assert out == ["[lab1] step 1/2 loss 3.0\n", '[lab2]   File "train.py", line 3, in <module>\n']


def _label(data: bytes, machine: str = "lab1") -> list[str]:
    out: list[str] = []
    labeller = joblogs.Labeller(machine, out.append)
    for start in range(0, len(data), 7):  # frames split anywhere
        labeller.feed(data[start : start + 7])
    labeller.close()
    return out


def test_one_rank_file_is_labelled_with_its_machine_and_keeps_its_blank_lines():
    data = b"#files 1\n==> rank0.log <==\nstep 1/2 loss 3.0\n\nstep 2/2 loss 2.0\n"
    assert _label(data) == ["[lab1] step 1/2 loss 3.0\n", "[lab1] \n", "[lab1] step 2/2 loss 2.0\n"]


def test_several_rank_files_on_one_machine_are_labelled_with_the_rank_and_no_separator():
    data = b"#files 2\n==> rank0.log <==\na\n\n==> rank1.log <==\nb\n"
    assert _label(data, "lab2") == ["[lab2/rank0] a\n", "[lab2/rank1] b\n"]


@pytest.mark.parametrize("follow", [False, True])
def test_read_commands_print_what_tail_prints(tmp_path, monkeypatch, follow):
    job_dir = tmp_path / "logs" / "demo"
    job_dir.mkdir(parents=True)
    (job_dir / "rank0.log").write_text("one\ntwo\n")
    (job_dir / "rank1.log").write_text("three\n")
    monkeypatch.setattr(joblogs, "LOGS_DIR", str(tmp_path / "logs"))
    argv = joblogs.read_argv("demo", follow=follow, lines=1)
    if follow:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            got = [proc.stdout.readline() for _ in range(6)]
        finally:
            proc.kill()
            proc.wait()
    else:
        got = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        got = got.splitlines(keepends=True)
    out: list[str] = []
    labeller = joblogs.Labeller("lab1", out.append)
    labeller.feed("".join(got).encode())
    labeller.close()
    assert [line for line in out if line.strip() != "[lab1/rank0]"] == [
        "[lab1/rank0] two\n",
        "[lab1/rank1] three\n",
    ]


def test_a_machine_without_the_jobs_log_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(joblogs, "LOGS_DIR", str(tmp_path / "logs"))
    proc = subprocess.run(joblogs.read_argv("demo", follow=False, lines=None))
    assert proc.returncode == joblogs.NO_LOG


def test_job_names_come_from_run_names():
    assert joblogs.job_name("demo") == "demo"
    assert joblogs.job_name("demo", "infer") == "demo-infer"
    assert joblogs.launch_env("demo") == {
        "DEEPFLEET_LOG_DIR": "/workspace/logs/demo",
        "DEEPFLEET_JOB": "demo",
    }
    with pytest.raises(joblogs.LogError, match="letters, digits"):
        joblogs.job_name("a b")


def test_the_last_step_line_is_the_jobs_progress():
    text = (
        "step 5/60 loss 5.1000 lr 1.00e-03 tok/s 900 samples/s 14.0 step_time 0.5s eta 30s\n"
        "step 10/60 loss 4.1234 lr 3.00e-03 tok/s 6016 samples/s 94.0 step_time 0.09s eta 41s\n"
    )
    assert status.parse_step(text) == {
        "step": 10, "steps": 60, "loss": 4.1234, "tokens_per_s": 6016.0, "eta_s": 41.0,
    }  # fmt: skip
    assert status.parse_step("")["step"] is None


SAMPLE = {
    "cluster": "c1",
    "image": "",
    "nodes": [
        {
            "node": "gpu1", "address": "10.0.0.2", "container": "deepfleet-node",
            "state": "running", "uptime_s": 3725.0, "flavor": "cuda", "cpus": 32,
            "versions": {"torch": "2.13.0", "deepspeed": "0.19.8"}, "gpu_summary": "2x H100",
            "gpus": [{"index": 0, "name": "NVIDIA H100", "memory_used_bytes": 40 * 2**30,
                      "memory_total_bytes": 80 * 2**30, "utilization_pct": 97.0}],
            "error": None,
        },
        {
            "node": "cpu1", "address": "10.0.0.3", "container": "deepfleet-node",
            "state": "unreachable", "uptime_s": None, "flavor": "cpu", "cpus": None,
            "versions": {}, "gpu_summary": "?", "gpus": [], "error": "cpu1: ssh: no route",
        },
    ],
    "job": {"name": "demo", "running": True, "held_by": "op (pid 7)", "step": 10, "steps": 60,
            "loss": 4.1234, "tokens_per_s": 6016.0, "eta_s": 41.0, "log_on": "gpu1"},
    "service": None,
    "links": {"measured_at": 1000.0, "age_s": 90.0, "failures": [], "links": [
        {"a": "gpu1", "b": "cpu1", "a_to_b_bps": 117e6, "b_to_a_bps": 112e6, "rtt_s": 0.0004,
         "measured_at": 1000.0},
    ]},
}  # fmt: skip

RECORD = {
    "id": "abc", "url": "http://127.0.0.1:8000/v1", "model": "tiny",
    "held_by": "op (pid 9) [deepfleet serve]", "started": 1000.0, "job": "demo-serve",
    "replicas": [
        {"name": "gpu1/0", "machine": "gpu1", "state": "ready", "outstanding": 2, "served": 41,
         "failed": 0, "restarts": 0, "tokens_per_s": 210.5},
        {"name": "cpu1/0", "machine": "cpu1", "state": "down", "outstanding": 0, "served": 3,
         "failed": 1, "restarts": 1, "tokens_per_s": 12.0},
    ],
}  # fmt: skip


def test_the_status_schema_accepts_a_status_and_refuses_what_breaks_it():
    schema = status.schema()
    jsonschema.validate(SAMPLE, schema)
    jsonschema.validate({**SAMPLE, "job": None}, schema)
    broken = copy.deepcopy(SAMPLE)
    broken["nodes"][0]["gpus"][0]["utilization_pct"] = 140
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = copy.deepcopy(SAMPLE)
    del broken["nodes"][1]["error"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_the_service_shows_only_while_the_service_that_wrote_it_holds_the_lease():
    text = json.dumps(RECORD)
    svc = status.service(text, "op (pid 9) [deepfleet serve]")
    assert svc["url"] == "http://127.0.0.1:8000/v1" and [r["served"] for r in svc["replicas"]] == [
        41, 3,
    ]  # fmt: skip
    jsonschema.validate({**SAMPLE, "service": svc}, status.schema())
    assert status.service(text, None) is None  # its lease lapsed: a killed service
    assert status.service(text, "op (pid 7)") is None  # a training job holds it now
    assert status.service("", "op (pid 9) [deepfleet serve]") is None
    rendered = status.render({**SAMPLE, "service": svc})
    assert (
        "service 'tiny' at http://127.0.0.1:8000/v1 (from op (pid 9) [deepfleet serve]): "
        "2 replicas, 44 requests answered" in rendered
    )
    assert (
        "  cpu1/0       down      served 3, in flight 0, failed 1, restarts 1, 12.0 tokens/s"
        in rendered
    )


def test_the_status_table():
    text = status.render(SAMPLE)
    assert "gpu1         10.0.0.2         running       1h02m cuda" in text
    assert "  gpu 0 NVIDIA H100: memory 40.0/80.0 GiB, utilisation 97%" in text
    assert "  cpu1: ssh: no route" in text
    assert "job demo: running (from op (pid 7))" in text
    assert "  step 10/60 loss 4.1234, 6016 tok/s, eta 0m41s" in text


def test_the_shell_is_ssh_with_deepfleets_own_host_user_key_and_pinned_keys(tmp_path):
    spec = NodeSpec("lab2", "172.18.0.3", "root", 2200, "/keys/id", str(tmp_path / "kh"))
    config = tmp_path / "ssh_config"
    config.write_text("Host lab2\n  HostName 172.18.0.3\n")
    state = ClusterState("c1", "", [NodeState(spec, "cpu", container_name="deepfleet-node")],
                         ssh_config=str(config))  # fmt: skip
    argv = interactive.shell_argv(state, "lab2")
    assert argv[1:] == [
        "-t", "-p", "2200", "-l", "root", "-F", str(config), "-i", "/keys/id",
        "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={tmp_path / 'kh'}",
        "-o", "HostName=172.18.0.3", "lab2", "--",
        "docker exec -it -w /workspace deepfleet-node bash",
    ]  # fmt: skip
    with pytest.raises(Exception, match="no machine 'lab9' in this cluster"):
        interactive.shell_argv(state, "lab9")


def test_init_writes_a_cluster_file_that_up_reads_as_the_nodes_it_came_from(
    tmp_path, capsys, monkeypatch
):
    from deepfleet.cli import cluster as cluster_cli
    from deepfleet.cli import main as cli

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host lab1\n  HostName 172.18.0.2\n  User root\n  IdentityFile /k/id\n"
        "Host lab2\n  HostName 172.18.0.3\n  User root\n  Port 2200\n"
    )
    words = ["lab1", "admin@lab2=cpu", "10.1.2.3:2222"]
    assert cli.main(["init", "--ssh-config", str(config), "--slots", "lab1=2", *words]) == 0
    assert "wrote cluster.yaml (3 machines)" in capsys.readouterr().out
    assert (tmp_path / "cluster.yaml").read_text().startswith("#")
    # what up would be given (a dry run probes the machines: none exist here)
    given = cli.parser().parse_args
    from_words = cluster_cli.up_request(
        given(["up", "--ssh-config", str(config), "--slots", "lab1=2", *words])
    )
    from_file = cluster_cli.up_request(given(["up", "--cluster-file", "cluster.yaml"]))
    assert from_file == from_words
    lab2 = from_words[0].nodes[1]
    assert (lab2.user, lab2.host, lab2.port, lab2.flavor) == ("admin", "172.18.0.3", 2200, "cpu")
    assert from_words[1].slots == {"lab1": 2}
    # both at once, or a second init over the file, are one-line refusals
    assert cli.main(["up", "--cluster-file", "cluster.yaml", "lab1"]) == 1
    assert cli.main(["init", "--ssh-config", str(config), "lab1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "deepfleet: give the machines as NODES or in --cluster-file, not both",
        "deepfleet: cluster.yaml exists; --force to replace it",
    ]
