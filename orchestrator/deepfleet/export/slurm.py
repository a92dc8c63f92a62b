"""`deepfleet export slurm`: the same training job as a Slurm batch script.

Pure, like plan.py: a request (the train job's own TrainRequest, and how many nodes,
GPUs and which container runtime) becomes the text of one sbatch script, printed for the
user to read and submit. The script starts the node image on every allocated node and
runs DeepSpeed's launcher there with `--no_ssh`: each node's launcher knows its node rank
from $SLURM_NODEID and the master from the allocation's first node, so no node needs SSH
to another. The ranks' arguments are train_args' for the LAN job, so a job moved to a
cluster is the job it was.

Paths: the script's work directory (--workdir, on the cluster's shared filesystem) is the
container's /workspace, laid out as a LAN node's (models, data, checkpoints, hf-cache,
logs). A model or data path given is a path on the cluster, mounted read-only where it is.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from deepfleet.errors import DeepfleetError
from deepfleet.images.registry import parse_ref
from deepfleet.jobs import joblogs, submit
from deepfleet.jobs.jobrun import RunOptions, job_env
from deepfleet.planning import compose, flavors, plan
from deepfleet.planning.plan import BACKENDS, MASTER_PORT, RUN_DIR, WORKDIR

TRAIN_MODULE = "deepfleet_node.train"
FLAVORS = flavors.NAMES


class ExportError(DeepfleetError):
    pass


@dataclass(frozen=True)
class SlurmRequest:
    train: submit.TrainRequest
    nodes: int = 2
    gpus_per_node: int = 0  # 0: CPU ranks, cpu_slots of them per node
    cpu_slots: int = 1
    flavor: str = ""  # "": cuda with GPUs, cpu without
    runtime: str = "docker"
    image: str = ""  # "": deepfleet/<flavor>:latest
    workdir: str = "$SLURM_SUBMIT_DIR/deepfleet"  # on the shared filesystem
    partition: str = ""
    time_limit: str = ""
    account: str = ""
    master_port: int = MASTER_PORT
    sbatch: tuple[str, ...] = ()  # more #SBATCH lines, as given
    env: dict[str, str] = field(default_factory=dict)
    compose_overrides: tuple[Path, ...] = ()  # the node service as `up` has it

    def node_spec(self) -> compose.ContainerSpec:
        return compose.node_spec(self.chosen_flavor, {}, self.compose_overrides)

    @property
    def chosen_flavor(self) -> str:
        return self.flavor or ("cuda" if self.gpus_per_node else "cpu")

    @property
    def chosen_image(self) -> str:
        return self.image or flavors.get(self.chosen_flavor).image

    @property
    def slots(self) -> int:
        return self.gpus_per_node or self.cpu_slots


# --- container runtimes: each turns "run ARGV in the node image on this node" into bash ---


@dataclass(frozen=True)
class Mounts:
    workdir: str  # a bash word: the host directory that is /workspace
    read_only: tuple[str, ...] = ()  # cluster paths mounted where they are


class Runtime:
    """One way a site runs containers. `define` writes the bash function `in_node_image`
    (its arguments: the command to run in the image on this node); `srun_flags` are what
    srun itself needs for it (pyxis' container flags)."""

    name = ""

    def define(self, image: str, spec: compose.ContainerSpec, env: list[str], m: Mounts) -> str:
        raise NotImplementedError

    def srun_flags(self, image: str, m: Mounts) -> list[str]:
        return []


class DockerRuntime(Runtime):
    """The node's Docker engine, with the LAN container's settings (compose/node.yml and
    the vendor overlay): host network and IPC, memlock, the GPUs Slurm gave the job."""

    name = "docker"

    def define(self, image, spec, env, m) -> str:
        flags = ["--rm", "--init", "--network", spec.network_mode or "host"]
        if spec.ipc_mode:
            flags += ["--ipc", spec.ipc_mode]
        if spec.cgroupns:
            flags += ["--cgroupns", spec.cgroupns]
        for mount in spec.mounts:
            if mount.kind == "bind":  # an override's host folder; the volumes are $WORKDIR's
                flags += ["-v", f"{mount.source}:{mount.target}" + (":ro" * mount.read_only)]
        for name, soft, hard in spec.ulimits:
            flags += ["--ulimit", f"{name}={soft}:{hard}"]
        for device in spec.devices:
            flags += ["--device", device]
        for group in spec.group_add:
            flags += ["--group-add", group]
        for option in spec.security_opt:
            flags += ["--security-opt", option]
        for name in env:
            flags += ["-e", name]
        mounts = [f'-v "{m.workdir}:{WORKDIR}"'] + [
            f"-v {shlex.quote(f'{p}:{p}:ro')}" for p in m.read_only
        ]
        gpus, gpu_flags = "", ""
        if spec.device_requests:
            # Slurm's gres gives the job its GPUs; without gres, every GPU of the node
            gpus = (
                '  local gpus="${SLURM_STEP_GPUS:-${SLURM_JOB_GPUS:-all}}" gpu_flags=(--gpus all)\n'
                '  [ "$gpus" = all ] || gpu_flags=(--gpus "\\"device=$gpus\\"")\n'
            )
            gpu_flags = ' "${gpu_flags[@]}"'

        return (
            "in_node_image() {\n"
            '  local name="deepfleet-${SLURM_JOB_ID}-${SLURM_NODEID:-0}-${SLURM_STEP_ID:-0}"\n'
            "  # srun ends a step with signals to this shell, not to the container: take the\n"
            "  # container down with it\n"
            "  trap 'docker rm -f \"$name\" >/dev/null 2>&1' EXIT\n"
            f"{gpus}"
            f'  docker run --name "$name"{gpu_flags} {shlex.join(flags)} \\\n'
            f"    {' '.join(mounts)} \\\n"
            f'    "$IMAGE" "$@"\n'
            "}\n"
        )


class ApptainerRuntime(Runtime):
    """Apptainer (Singularity): the image from its registry (docker://) or a .sif file;
    host network and IPC are its defaults, --nv / --rocm hand it the GPUs."""

    name = "apptainer"

    def define(self, image, spec, env, m) -> str:
        flags = ["--writable-tmpfs"]
        if spec.device_requests:
            flags.append("--nv")
        elif spec.devices:
            flags.append("--rocm")
        binds = [f'--bind "{m.workdir}:{WORKDIR}"'] + [
            f"--bind {shlex.quote(f'{p}:{p}:ro')}" for p in m.read_only
        ]
        source = '"$IMAGE"' if image.endswith(".sif") else '"docker://$IMAGE"'
        return (
            "in_node_image() {\n"
            f'  apptainer exec {shlex.join(flags)} {" ".join(binds)} {source} "$@"\n'
            "}\n"
        )


class EnrootRuntime(Runtime):
    """enroot through pyxis: srun itself starts the image (--container-image), so the
    function runs the command as it is."""

    name = "enroot"

    def define(self, image, spec, env, m) -> str:
        return 'in_node_image() {\n  "$@"\n}\n'

    def srun_flags(self, image: str, m: Mounts) -> list[str]:
        ref = parse_ref(image)
        name = f"{ref.registry}#{ref.repository}" if ref.registry else ref.repository
        name += f"@{ref.digest}" if ref.digest else f":{ref.tag or 'latest'}"
        mounts = ",".join([f"{m.workdir}:{WORKDIR}", *(f"{p}:{p}:ro" for p in m.read_only)])
        return [f"--container-image={name}", f'--container-mounts="{mounts}"',
                f"--container-workdir={WORKDIR}"]  # fmt: skip


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (DockerRuntime(), ApptainerRuntime(),
                                                     EnrootRuntime())}  # fmt: skip


# --- the job ---------------------------------------------------------------------------


def check(req: SlurmRequest) -> None:
    """Refuse what the script could only fail on, before anything is printed."""
    if req.nodes < 1:
        raise ExportError(f"--nodes {req.nodes}: at least one node")
    if req.gpus_per_node < 0 or req.cpu_slots < 1:
        raise ExportError("--gpus-per-node must be 0 or more, --cpu-slots 1 or more")
    if req.runtime not in RUNTIMES:
        raise ExportError(f"--runtime {req.runtime}: one of {', '.join(RUNTIMES)}")
    if req.flavor and req.flavor not in FLAVORS:
        raise ExportError(f"--flavor {req.flavor}: one of {', '.join(FLAVORS)}")
    if req.chosen_flavor == "cpu" and req.gpus_per_node:
        raise ExportError("--gpus-per-node with the cpu image: give --flavor cuda or rocm")
    if req.chosen_flavor != "cpu" and not req.gpus_per_node:
        raise ExportError(f"the {req.chosen_flavor} image needs --gpus-per-node N")
    if req.train.bridge:
        raise ExportError("--bridge joins unlike machines of a LAN; a Slurm partition is alike")
    for what, path in (("--model", req.train.model), ("--data", req.train.data)):
        if path != submit.DEMO and submit.is_local(path) and not path.startswith("/"):
            raise ExportError(f"{what} {path}: give the absolute path it has on the cluster")
    submit.run_dir(req.train.run)  # a bad run name fails here
    for name in req.env:
        if not name.replace("_", "a").isalnum() or name[:1].isdigit():
            raise ExportError(f"--env {name}: not a variable name")


def model_and_data(req: SlurmRequest) -> tuple[str, str, tuple[str, ...]]:
    """(model, data, cluster paths to mount) as the ranks see them."""
    t = req.train
    mounts = []
    model = submit.DEMO_MODEL if t.model == submit.DEMO else t.model
    if t.model != submit.DEMO and t.model.startswith("/"):
        mounts.append(t.model)
    data = f"{submit.DEMO_DATA}/train.txt" if t.data == submit.DEMO else t.data
    if t.data != submit.DEMO:
        mounts.append(t.data)
    if t.config.startswith("/"):
        mounts.append(t.config)
    return model, data, tuple(mounts)


def rank_env(req: SlurmRequest, job: str) -> dict[str, str]:
    """What every rank reads: the node service's environment and the LAN job's launch
    environment (plan.rank_env, jobrun.job_env), then the user's --env."""
    spec_env = req.node_spec().environment
    return {
        **{k: v for k, v in spec_env.items() if k != "DEEPFLEET_AUTHORIZED_KEY" and v},
        **plan.rank_env(BACKENDS[req.chosen_flavor]),
        **job_env(RunOptions(), job),
        **req.env,
    }


def _sbatch_lines(req: SlurmRequest, job: str) -> list[str]:
    lines = [
        f"#SBATCH --job-name=deepfleet-{job}",
        f"#SBATCH --nodes={req.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output=deepfleet-{job}-%j.out",
    ]
    if req.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={req.gpus_per_node}")
    if req.partition:
        lines.append(f"#SBATCH --partition={req.partition}")
    if req.time_limit:
        lines.append(f"#SBATCH --time={req.time_limit}")
    if req.account:
        lines.append(f"#SBATCH --account={req.account}")
    return lines + [f"#SBATCH {extra}" for extra in req.sbatch]


def render(req: SlurmRequest) -> str:
    """The batch script, whole."""
    check(req)
    t = req.train
    job = joblogs.job_name(t.run)
    runtime = RUNTIMES[req.runtime]
    model, data, read_only = model_and_data(req)
    mounts = Mounts("$WORKDIR", read_only)
    env = rank_env(req, job)
    spec = req.node_spec()
    hostfile = f"{RUN_DIR}/hostfile-$SLURM_JOB_ID"
    args = submit.train_args(t, model, data, "auto", t.config)
    launcher = [
        "deepspeed", "--no_ssh", "--node_rank=$SLURM_NODEID", f"--hostfile={hostfile}",
        "--master_addr=$MASTER_ADDR", "--master_port=$MASTER_PORT",
        "--module", TRAIN_MODULE, *args,
    ]  # fmt: skip
    srun = " ".join(["srun", *runtime.srun_flags(req.chosen_image, mounts)])
    threads = ""
    if not req.gpus_per_node:  # one OpenMP pool per rank, its share of the node's cores
        threads = (
            f"export OMP_NUM_THREADS=$(( ${{SLURM_CPUS_ON_NODE:-$(nproc)}} / {req.cpu_slots} ))\n"
            '[ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1\n'
        )
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    names = [*env, *(["OMP_NUM_THREADS"] if threads else [])]
    prepare = ""
    if t.model == submit.DEMO or t.data == submit.DEMO:
        tiny = ["python", "-m", "deepfleet_node.tiny", "--out", submit.DEMO_MODEL,
                "--data-out", f"{submit.DEMO_DATA}/train.txt"]  # fmt: skip
        build = shlex.quote("in_node_image " + shlex.join(tiny))
        prepare = (
            "# the demo model and data: built once, on the first node, into the shared workdir\n"
            f'if [ ! -f "$WORKDIR/models/demo-tiny/config.json" ]; then\n'
            f"  {srun} --nodes=1 --ntasks=1 bash -c {build}\n"
            "fi\n"
        )
    elif not t.model.startswith("/"):  # a hub name: fetched once into the shared cache
        fetch = ["python", "-c", "import sys; from huggingface_hub import snapshot_download; "
                 "snapshot_download(sys.argv[1])", t.model]  # fmt: skip
        prepare = (
            "# the model from the hub, once, into the shared cache ($HF_TOKEN if the job has it)\n"
            f"{srun} --nodes=1 --ntasks=1 bash -c "
            f"{shlex.quote('HF_HUB_OFFLINE=0 in_node_image ' + shlex.join(fetch))}\n"
        )
    run_line = "in_node_image " + " ".join(
        a
        if a.startswith(("--node_rank=$", "--hostfile=", "--master_addr=$", "--master_port=$"))
        else shlex.quote(a)
        for a in launcher
    )  # the $SLURM_NODEID and $MASTER_* words are expanded on each node
    return (
        "#!/bin/bash\n"
        f"# deepfleet export slurm: training run {t.run!r} on {req.nodes} node(s),"
        f" {req.slots} rank(s) each, {req.chosen_flavor} image through {runtime.name}.\n"
        "# Submit with: sbatch THIS_FILE   (the run's output: deepfleet-<run>-<jobid>.out)\n"
        + "\n".join(_sbatch_lines(req, job))
        + "\nset -euo pipefail\n\n"
        f"export IMAGE={shlex.quote(req.chosen_image)}\n"
        f'export WORKDIR="${{DEEPFLEET_WORKDIR:-{req.workdir}}}"\n'
        'mkdir -p "$WORKDIR"/models "$WORKDIR"/data "$WORKDIR"/checkpoints "$WORKDIR"/hf-cache'
        ' "$WORKDIR"/logs "$WORKDIR"/.deepfleet\n\n'
        "# the allocation's nodes in node-rank order ($SLURM_NODEID); read whole, as `| head`\n"
        "# would end scontrol with SIGPIPE and pipefail the script\n"
        'mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")\n'
        "# the master: the first node, by the address Slurm itself reaches it on\n"
        'MASTER_ADDR=$(scontrol show node "${hosts[0]}"'
        " | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')\n"
        'export MASTER_ADDR="${MASTER_ADDR:-${hosts[0]}}"\n'
        f"export MASTER_PORT={req.master_port}\n"
        "# DeepSpeed's hostfile\n"
        f'printf "%s slots={req.slots}\\n" "${{hosts[@]}}"'
        ' >"$WORKDIR/.deepfleet/hostfile-$SLURM_JOB_ID"\n\n'
        "# what every rank reads (the LAN job's launch environment)\n"
        f"{exports}{threads}\n"
        f"{runtime.define(req.chosen_image, spec, names, mounts)}"
        "export -f in_node_image\n\n"
        f"{prepare}"
        "# one launcher per node; it starts that node's ranks, and no node needs ssh\n"
        f"{srun} --kill-on-bad-exit=1 bash -c {shlex.quote(run_line)}\n"
    )
