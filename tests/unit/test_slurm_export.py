"""deepfleet export slurm: the LAN's training job as an sbatch script.

The lab's real Slurm runs the script (tests/integration/test_slurm_lab.py); here the text
is checked, and bash runs it with recording stand-ins for srun, scontrol and docker so the
quoting is proven down to the argv each node's container gets.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from deepfleet.errors import DeepfleetError
from deepfleet.export import slurm
from deepfleet.export.slurm import SlurmRequest
from deepfleet.jobs import submit

ROOT = Path(__file__).resolve().parents[2]


def script(**kw) -> str:
    train = kw.pop("train", submit.TrainRequest(run="sl", steps=30))
    return slurm.render(SlurmRequest(train=train, **kw))


def test_the_ranks_get_the_lan_jobs_own_arguments():
    req = submit.TrainRequest(run="sl", steps=30, config="zero3", micro_batch=2, seq_len=32)
    text = script(train=req)
    line = next(x for x in text.splitlines() if x.startswith("srun --kill-on-bad-exit"))
    inner = shlex.split(shlex.split(line)[-1])  # bash -c '<this>'
    args = submit.train_args(
        req, submit.DEMO_MODEL, f"{submit.DEMO_DATA}/train.txt", "auto", "zero3"
    )
    assert inner[inner.index("--module") + 2 :] == args
    assert inner[:3] == ["in_node_image", "deepspeed", "--no_ssh"]
    assert "--node_rank=$SLURM_NODEID" in inner and "--master_addr=$MASTER_ADDR" in inner


def test_cpu_ranks_use_gloo_and_a_share_of_the_cores():
    text = script(nodes=3, cpu_slots=2)
    assert "#SBATCH --nodes=3" in text and "--gpus-per-node" not in text
    assert "export DEEPFLEET_BACKEND=gloo" in text
    assert 'printf "%s slots=2\\n"' in text
    assert "OMP_NUM_THREADS=$(( ${SLURM_CPUS_ON_NODE:-$(nproc)} / 2 ))" in text
    assert "--gpus" not in text


def test_cuda_gets_the_gpus_slurm_gave_and_nccl():
    text = script(gpus_per_node=4)
    assert "#SBATCH --gpus-per-node=4" in text and "slots=4" in text
    assert "export DEEPFLEET_BACKEND=nccl" in text
    assert "IMAGE=deepfleet/cuda:latest" in text
    assert '"${gpu_flags[@]}"' in text and "SLURM_STEP_GPUS" in text
    assert "-e NVIDIA_DRIVER_CAPABILITIES" in text  # the NVIDIA overlay's environment


def test_rocm_with_docker_takes_the_amd_overlays_devices():
    text = script(gpus_per_node=2, flavor="rocm")
    for flag in ("--device /dev/kfd", "--device /dev/dri", "--group-add video"):
        assert flag in text
    assert "IMAGE=deepfleet/rocm:latest" in text


def test_apptainer_and_enroot():
    text = script(gpus_per_node=1, runtime="apptainer", image="/sites/images/cuda.sif")
    assert 'apptainer exec --writable-tmpfs --nv --bind "$WORKDIR:/workspace" "$IMAGE"' in text
    digest = "sha256:" + "a" * 64
    text = script(gpus_per_node=1, runtime="enroot", image=f"reg.lan:5000/deepfleet/cuda@{digest}")
    assert f"--container-image=reg.lan:5000#deepfleet/cuda@{digest}" in text
    assert "docker run" not in text and "apptainer" not in text


def test_cluster_paths_are_mounted_read_only_where_they_are():
    req = submit.TrainRequest(run="sl", model="/lustre/m/llama", data="/lustre/d/train.jsonl")
    text = script(train=req)
    assert "-v /lustre/m/llama:/lustre/m/llama:ro" in text
    assert "-v /lustre/d/train.jsonl:/lustre/d/train.jsonl:ro" in text
    assert "deepfleet_node.tiny" not in text  # no demo to build


@pytest.mark.parametrize(
    ("kw", "said"),
    [
        ({"gpus_per_node": 2, "flavor": "cpu"}, "--gpus-per-node with the cpu image"),
        ({"flavor": "cuda"}, "needs --gpus-per-node"),
        ({"nodes": 0}, "--nodes 0"),
        ({"env": {"1BAD": "x"}}, "--env 1BAD"),
        ({"train": submit.TrainRequest(model="./here")}, "absolute path it has on the cluster"),
        ({"train": submit.TrainRequest(run="../x")}, "bad run name"),
    ],
)
def test_what_cannot_run_is_refused_in_one_line(kw, said):
    with pytest.raises(DeepfleetError) as info:
        script(**kw)
    assert said in str(info.value) and "\n" not in str(info.value)


def test_the_cli_prints_the_script_or_one_line(tmp_path):
    cli = [sys.executable, "-m", "deepfleet.cli", "export", "slurm"]
    done = subprocess.run([*cli, "--steps", "5"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("#!/bin/bash\n") and "--steps 5 " in done.stdout
    bad = subprocess.run([*cli, "--model", "./rel"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "deepfleet: --model ./rel: give the absolute path it has on the cluster"
    ]


STUB = """#!/bin/bash
printf '%s\\0' "$(basename "$0")" "$@" >>"$RECORD"; printf '\\n' >>"$RECORD"
case "$(basename "$0")" in
  scontrol) if [ "$2" = hostnames ]; then printf 'n1\\nn2\\n'; else
              echo "NodeName=n1 Arch=x86_64 NodeAddr=10.9.0.1 NodeHostName=n1"; fi ;;
  srun) while [ "${1#-}" != "$1" ]; do shift; done
        for id in 0 1; do SLURM_NODEID=$id SLURM_STEP_ID=$id "$@" || exit $?; done ;;
esac
"""


def test_bash_runs_it_and_each_node_starts_its_own_rank(tmp_path):
    """srun here runs its command once per node (SLURM_NODEID 0 and 1) on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("scontrol", "srun", "docker"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    path = tmp_path / "job.sbatch"
    path.write_text(
        script(train=submit.TrainRequest(run="sl", steps=7, model="/m/tiny", data="/d/train.txt"))
    )
    record = tmp_path / "record"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
        "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_CPUS_ON_NODE": "8",
    }  # fmt: skip
    subprocess.run(["bash", str(path)], env=env, check=True, cwd=tmp_path)
    calls = [c.split("\0") for c in record.read_text().split("\0\n") if c]
    runs = [c for c in calls if c[0] == "docker" and c[1] == "run"]
    assert len(runs) == 2, calls
    for node_rank, argv in enumerate(runs):
        assert argv[argv.index("--name") + 1] == f"deepfleet-42-{node_rank}-{node_rank}"
        assert f"{tmp_path}/deepfleet:/workspace" in argv
        assert "/m/tiny:/m/tiny:ro" in argv
        ds = argv[argv.index("deepfleet/cpu:latest") + 1 :]
        assert ds[:2] == ["deepspeed", "--no_ssh"]
        assert f"--node_rank={node_rank}" in ds
        assert "--master_addr=10.9.0.1" in ds and "--master_port=29500" in ds
        assert "--hostfile=/workspace/.deepfleet/hostfile-42" in ds
        assert ds[ds.index("--steps") + 1] == "7"
    hostfile = tmp_path / "deepfleet" / ".deepfleet" / "hostfile-42"
    assert hostfile.read_text() == "n1 slots=1\nn2 slots=1\n"
