import json

import pytest
from unitdata import detect_report, inv, rep

from deepfleet.errors import PlanError, ReportError
from deepfleet.planning import hostfile, reports
from deepfleet.planning.plan import check_versions, plan_cluster


def gpu(i, name="NVIDIA H100 80GB HBM3"):
    return {"index": i, "vendor": "nvidia", "name": name, "memory_bytes": 80 << 30}


def test_cpu_plan_and_hostfile():
    plan = plan_cluster(inv("a", "b"), {"a": rep(), "b": rep()}, cpu_slots=2)
    assert plan.backend == "gloo"
    assert plan.master_addr == "10.0.0.1" and plan.world_size == 4
    assert hostfile.render_hostfile(plan) == "10.0.0.1 slots=2\n10.0.0.2 slots=2\n"
    env = hostfile.render_deepspeed_env(plan.env)
    assert "DEEPFLEET_BACKEND=gloo\n" in env and env.endswith("\n")
    assert "OMP_NUM_THREADS=4\n" in env  # 8 cores, 2 ranks per node


def test_gpu_slots_come_from_the_reports_and_overrides_win():
    reports_ = {
        "a": rep(accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu(0), gpu(1)]),
        "b": rep(accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu(0)]),
    }
    plan = plan_cluster(inv("a", "b"), reports_)
    assert [n.slots for n in plan.nodes] == [2, 1] and plan.backend == "nccl"
    plan = plan_cluster(inv("a", "b"), reports_, slots={"a": 1})
    assert [n.slots for n in plan.nodes] == [1, 1]


def amd(i, memory=192 << 30):
    return {"index": i, "vendor": "amd", "name": "AMD Instinct MI300X", "memory_bytes": memory,
            "gfx_target": "gfx942"}  # fmt: skip


def test_a_gpu_and_a_cpu_machine_run_on_the_gpu_with_the_other_left_out_and_why():
    reports_ = {"a": rep(accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu(0)]), "b": rep()}
    plan = plan_cluster(inv("a", "b"), reports_)
    assert [n.name for n in plan.nodes] == ["a"] and plan.backend == "nccl"
    assert [(x.name, x.override) for x in plan.left_out] == [("b", "--backend cpu")]
    assert plan.left_out[0].reason == "cpu while the job runs on cuda (one job needs one backend)"
    cpu_only = plan_cluster(inv("a", "b"), reports_, backend="cpu")
    assert [n.name for n in cpu_only.nodes] == ["b"] and cpu_only.backend == "gloo"
    assert cpu_only.left_out[0].name == "a"


def test_the_backend_group_with_the_most_gpu_memory_times_speed_runs():
    nvidia = rep(accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu(i) for i in range(8)])
    mi250 = [dict(amd(i, 128 << 30), name="AMD Instinct MI250X") for i in range(4)]
    radeon = rep(accelerator="rocm", gpu_vendor="amd", gpus=mi250)
    laptop = rep()
    plan = plan_cluster(inv("n", "r", "c"), {"n": nvidia, "r": radeon, "c": laptop})
    # 640 GiB x 989 TFLOPS against 512 GiB x 362
    assert [n.name for n in plan.nodes] == ["n"] and plan.world_size == 8
    assert {x.name for x in plan.left_out} == {"r", "c"}
    big_amd = rep(accelerator="rocm", gpu_vendor="amd", gpus=[amd(i, 256 << 30) for i in range(4)])
    plan = plan_cluster(inv("n", "r", "c"), {"n": nvidia, "r": big_amd, "c": laptop})
    assert [n.name for n in plan.nodes] == ["r"] and plan.master_addr == "10.0.0.2"


def test_slots_given_to_a_machine_of_another_backend_are_refused_naming_it():
    reports_ = {"a": rep(accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu(0)]), "b": rep()}
    with pytest.raises(PlanError, match=r"a=cuda, b=cpu.*give b 0 slots or choose --backend"):
        plan_cluster(inv("a", "b"), reports_, slots={"b": 2})
    with pytest.raises(PlanError, match="--backend rocm: no machine of the job runs it"):
        plan_cluster(inv("a", "b"), reports_, backend="rocm")


def test_version_mismatch_names_nodes_and_versions():
    versions = dict(detect_report()["versions"], deepspeed="0.18.0")
    with pytest.raises(PlanError) as err:
        check_versions({"a": rep(), "b": rep(), "c": rep(versions=versions)})
    text = err.value.one_line()
    assert "deepspeed 0.19.8 on a, b vs 0.18.0 on c" in text


def test_flavour_suffixes_and_python_patch_do_not_count_as_mismatch():
    cuda = dict(detect_report()["versions"], torch="2.13.0+cu128", python="3.11.9")
    check_versions({"a": rep(), "b": rep(versions=cuda)})


def test_missing_report_and_bad_slots():
    with pytest.raises(PlanError, match="no detect report from b"):
        plan_cluster(inv("a", "b"), {"a": rep()})
    with pytest.raises(PlanError, match="unknown nodes: zz"):
        plan_cluster(inv("a"), {"a": rep()}, slots={"zz": 1})
    with pytest.raises(PlanError, match="nothing would run"):
        plan_cluster(inv("a"), {"a": rep()}, slots={"a": 0})
    with pytest.raises(PlanError, match="negative"):
        plan_cluster(inv("a"), {"a": rep()}, slots={"a": -1})


def test_zero_slots_leave_a_node_out_and_move_the_master():
    plan = plan_cluster(inv("a", "b"), {"a": rep(), "b": rep()}, slots={"a": 0, "b": 2})
    assert [n.name for n in plan.nodes] == ["b"]
    assert plan.master_addr == "10.0.0.2" and plan.world_size == 2


def test_env_file_refuses_what_deepspeed_cannot_carry():
    with pytest.raises(PlanError):
        hostfile.render_deepspeed_env({"BAD KEY": "1"})
    with pytest.raises(PlanError):
        hostfile.render_deepspeed_env({"K": "a\nb"})


def test_report_parsing_errors_name_the_node():
    with pytest.raises(ReportError, match="no JSON") as err:
        reports.parse("Traceback (most recent call last):", "lab2")
    assert err.value.one_line().startswith("lab2: ")
    with pytest.raises(ReportError, match="schema"):
        reports.parse(json.dumps(detect_report(schema=9)), "lab2")
    with pytest.raises(ReportError, match="bad field"):
        reports.parse(json.dumps({k: v for k, v in detect_report().items() if k != "cpu_count"}))


def test_report_gpu_summary():
    r = rep(gpus=[gpu(0), gpu(1), gpu(2, "NVIDIA A100-SXM4-40GB")], accelerator="cuda")
    assert r.gpu_summary == "2x NVIDIA H100 80GB HBM3, 1x NVIDIA A100-SXM4-40GB"
    assert rep().gpu_summary == "none"


def test_gpus_of_another_vendor_are_not_slots():
    amd_igpu = {"index": 0, "vendor": "amd", "name": "AMD Radeon Graphics", "memory_bytes": None}
    r = rep(accelerator="cuda", gpu_vendor="nvidia", gpus=[gpu(0), amd_igpu])
    plan = plan_cluster(inv("a"), {"a": r})
    assert plan.nodes[0].slots == 1 and plan.nodes[0].gpus == 1


def test_precision_is_one_for_the_whole_job():
    a100 = dict(gpu(0, "A100"), compute_capability="8.0")
    v100 = dict(gpu(0, "V100"), compute_capability="7.0")
    both = {"a": rep(accelerator="cuda", gpus=[a100]), "b": rep(accelerator="cuda", gpus=[a100])}
    assert plan_cluster(inv("a", "b"), both).precision == "bf16"
    mixed = {**both, "b": rep(accelerator="cuda", gpus=[v100])}
    assert plan_cluster(inv("a", "b"), mixed).precision == "fp16"
    mi300 = {"index": 0, "vendor": "amd", "name": "MI300X", "gfx_target": "gfx942"}
    mi50 = {"index": 0, "vendor": "amd", "name": "MI50", "gfx_target": "gfx906"}
    assert plan_cluster(inv("a"), {"a": rep(accelerator="rocm", gpus=[mi300])}).precision == "bf16"
    assert plan_cluster(inv("a"), {"a": rep(accelerator="rocm", gpus=[mi50])}).precision == "fp16"
    assert plan_cluster(inv("a"), {"a": rep()}).precision == "fp32"
