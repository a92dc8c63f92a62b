"""`deepfleet export slurm` on a real Slurm: the lab's slurmctld and slurmd (Debian's
slurm-wlm, munge), two compute nodes, the lab's /shared as the cluster's filesystem.

The exported script is submitted with `sbatch --wait` on the controller, as a user would;
it starts the node image on both nodes' engines and DeepSpeed's launcher there with
--no_ssh. The job must train across both, the loss fall, and the export land in the
shared work directory.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from labtools import DEEPFLEET, ROOT, lab_module

pytestmark = pytest.mark.lab
RUN = "slurm-it"
STEPS = 16
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss ([0-9.]+)", re.M)


@pytest.fixture(scope="module")
def controller(cluster):
    """Slurm on lab1 and lab2, the session cluster's machines (they hold the node image)."""
    node = lab_module.start_slurm(2)
    yield node
    for container in lab_module.machines(lab_module._client())[:2]:
        container.exec_run(["pkill", "-x", "(slurmd|slurmctld|munged)"])


def test_the_exported_job_trains_on_slurm_across_two_machines(cluster, controller):
    shared = cluster.lab.dir / "shared"
    workdir = f"{lab_module.SHARED}/{RUN}"
    script = subprocess.run(
        [*DEEPFLEET, "export", "slurm", "--nodes", "2", "--run", RUN, "--steps", str(STEPS),
         "--workdir", workdir, "--compose-override", str(cluster.lab.override)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (shared / "job.sbatch").write_text(script)
    code, said = lab_module.labslurm.sbatch_wait(controller, f"{lab_module.SHARED}/job.sbatch", 900)
    job_id = re.search(r"Submitted batch job (\d+)", said).group(1)
    output = (shared / f"deepfleet-{RUN}-{job_id}.out").read_text()
    assert code == 0, output[-4000:]
    assert "WORLD INFO DICT: {'lab1': [0], 'lab2': [0]}" in output, output[-4000:]
    assert "node_rank=0" in output and "node_rank=1" in output
    losses = [float(m.group(3)) for m in STEP_LINE.finditer(output)]
    assert len(losses) >= 2 and losses[-1] < losses[0], output[-4000:]
    assert f"step {STEPS}/{STEPS}" in output
    final = shared / RUN / "checkpoints" / RUN / "final"
    assert json.loads((final / "config.json").read_text())["model_type"]
    assert any(final.glob("*.safetensors")), list(final.iterdir())
    # both nodes' ranks wrote their job logs to the shared workdir, and no container is left
    logs = sorted(p.name for p in (shared / RUN / "logs" / RUN).glob("rank*.log"))
    assert logs == ["rank0.log", "rank1.log"], logs
    for index in (0, 1):
        left = cluster.machine_docker(index, "ps", "-aq", "--filter", f"name=deepfleet-{job_id}-")
        assert left.strip() == "", left
