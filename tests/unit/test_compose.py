import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deepfleet.errors import ContainerError
from deepfleet.machines.containers import run_kwargs
from deepfleet.planning import compose


def test_cpu_spec_from_the_shipped_file():
    spec = compose.node_spec("cpu", {"DEEPFLEET_CLUSTER": "c1", "DEEPFLEET_NODE": "lab1"})
    assert spec.image == "deepfleet/cpu:latest"
    assert spec.name == "deepfleet-node"
    assert spec.network_mode == "host" and spec.ipc_mode == "host"
    assert ("memlock", -1, -1) in spec.ulimits
    targets = {m.target: m for m in spec.mounts}
    assert set(targets) == {
        "/workspace/models",
        "/workspace/data",
        "/workspace/checkpoints",
        "/workspace/hf-cache",
    }
    assert targets["/workspace/models"].source == "deepfleet-models"
    assert targets["/workspace/models"].kind == "volume"
    assert spec.labels == {"deepfleet.cluster": "c1", "deepfleet.node": "lab1"}
    assert spec.device_requests == ()


def test_nvidia_overlay_requests_all_gpus():
    spec = compose.node_spec("cuda", {"DEEPFLEET_IMAGE": "reg.local/deepfleet/cuda:1"})
    assert spec.image == "reg.local/deepfleet/cuda:1"
    (req,) = spec.device_requests
    assert (req.driver, req.count, req.capabilities) == ("nvidia", -1, ("gpu",))
    kwargs = run_kwargs(spec)
    (dr,) = kwargs["device_requests"]
    assert dr["Driver"] == "nvidia" and dr["Count"] == -1 and dr["Capabilities"] == [["gpu"]]
    assert kwargs["environment"]["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"


def test_amd_overlay_passes_kfd_and_dri():
    spec = compose.node_spec("rocm", {})
    assert spec.devices == ("/dev/kfd", "/dev/dri")
    assert spec.group_add == ("video", "render")
    kwargs = run_kwargs(spec)
    assert kwargs["devices"] == ["/dev/kfd:/dev/kfd:rwm", "/dev/dri:/dev/dri:rwm"]
    assert "device_requests" not in kwargs


def test_override_replaces_ulimit_and_merges_env(tmp_path: Path):
    override = tmp_path / "o.yml"
    override.write_text(
        "services:\n  node:\n    ulimits:\n      memlock: 65536\n"
        "    environment:\n      - EXTRA=1\n"
        "    volumes:\n      - /srv/models:/workspace/models:ro\n"
    )
    spec = compose.node_spec("cpu", {}, [override])
    assert ("memlock", 65536, 65536) in spec.ulimits
    assert spec.environment["EXTRA"] == "1" and spec.environment["HF_HOME"]
    models = [m for m in spec.mounts if m.target == "/workspace/models"]
    assert models == [compose.Mount("/srv/models", "/workspace/models", "bind", True)]
    assert len(spec.mounts) == 4


ENV = {"SET": "x", "EMPTY": ""}


@pytest.mark.parametrize(
    "template, expected",
    [
        ("${SET}", "x"),
        ("$SET", "x"),
        ("$SET-y.z", "x-y.z"),
        ("${SET}${SET}", "xx"),
        ("${MISSING}|$MISSING", "|"),
        # `-`: default when unset; `:-`: when unset or empty
        ("${MISSING-d}|${EMPTY-d}|${SET-d}", "d||x"),
        ("${MISSING:-d}|${EMPTY:-d}|${SET:-d}", "d|d|x"),
        # `+`: alt when set; `:+`: when set and not empty
        ("${MISSING+a}|${EMPTY+a}|${SET+a}", "|a|a"),
        ("${MISSING:+a}|${EMPTY:+a}|${SET:+a}", "||a"),
        ("${SET?m}|${EMPTY?m}|${SET:?m}", "x||x"),
        # nested: defaults, alts and messages are interpolated too, only when used
        ("${MISSING:-${SET}}", "x"),
        ("${MISSING:-${ALSO-deep}}/y", "deep/y"),
        ("${MISSING-$SET/y}", "x/y"),
        ("${SET:+[${SET}]}", "[x]"),
        ("${SET:-${MISSING?unused}}", "x"),
        ("${MISSING:-a}-${SET}", "a-x"),
        ("${MISSING:-{x}", "{x"),
        # $$ is a literal $, and a $ that starts no name is left as it is
        ("$$|$${SET}|$$SET", "$|${SET}|$SET"),
        ("cost $5, $ and $", "cost $5, $ and $"),
    ],
)
def test_interpolation_forms(template, expected):
    assert compose.interpolate(template, ENV) == expected


@pytest.mark.parametrize(
    "template, message",
    [
        ("${MISSING?need it}", "compose: MISSING is required: need it"),
        ("${EMPTY:?}", "compose: EMPTY is required"),
        ("${MISSING:?${SET} is missing}", "compose: MISSING is required: x is missing"),
        ("${MISSING:-${ALSO?nested}}", "compose: ALSO is required: nested"),
        ("a ${1}", "compose: invalid interpolation in 'a ${1}'"),
        ("${SET", "compose: invalid interpolation in '${SET'"),
        ("${SET:x}", "compose: invalid interpolation in '${SET:x}'"),
        ("${}", "compose: invalid interpolation in '${}'"),
    ],
)
def test_interpolation_errors(template, message):
    with pytest.raises(ContainerError) as err:
        compose.interpolate(template, ENV)
    assert err.value.one_line() == message


def test_interpolation_walks_values_only():
    doc = {"$SET": ["$SET", {"k": "${SET:+y}"}], "n": 3, "b": True, "none": None}
    assert compose.interpolate(doc, ENV) == {"$SET": ["x", {"k": "y"}], "n": 3, "b": True,
                                              "none": None}  # fmt: skip


def test_load_names_the_file_in_interpolation_errors(tmp_path: Path):
    bad = tmp_path / "o.yml"
    bad.write_text("services:\n  node:\n    image: ${IMG:?set IMG to the node image}\n")
    with pytest.raises(ContainerError) as err:
        compose.load([bad], {})
    assert err.value.one_line() == f"compose file {bad}: IMG is required: set IMG to the node image"
    service, _ = compose.load([bad], {"IMG": "reg/x:1"})
    assert service["image"] == "reg/x:1"


def test_unknown_keys_are_refused(tmp_path: Path):
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  node:\n    image: x\n    healthcheck: {}\n")
    with pytest.raises(ContainerError, match="unsupported keys"):
        compose.load([bad], {})


def test_missing_service_is_refused(tmp_path: Path):
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  web:\n    image: x\n")
    with pytest.raises(ContainerError, match="no services.node"):
        compose.load([bad], {})


def test_cgroup_key_becomes_cgroupns(tmp_path: Path):
    assert "cgroupns" not in run_kwargs(compose.node_spec("cpu", {}))  # the engine's default
    override = tmp_path / "o.yml"
    override.write_text("services:\n  node:\n    cgroup: host\n")
    spec = compose.node_spec("cpu", {}, [override])
    assert spec.cgroupns == "host"
    assert run_kwargs(spec)["cgroupns"] == "host"
    override.write_text("services:\n  node:\n    cgroup: shared\n")
    with pytest.raises(ContainerError, match="cgroup is 'shared', not host or private"):
        compose.node_spec("cpu", {}, [override])


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


# docker-compose 1.x (Debian's package) predates the `+` forms and nested defaults, and
# refuses a `$` that starts no name
REAL_COMPOSE_V1 = {
    "PLAIN": "${SET}",
    "BARE": "$SET-suffix",
    "SOFT_EMPTY": "${EMPTY:-soft}",
    "SOFT_UNSET": "${UNSET:-soft}",
    "HARD_EMPTY": "${EMPTY-hard}",
    "HARD_UNSET": "${UNSET-hard}",
    "REQUIRED": "${SET:?must be set}",
    "REQUIRED_EMPTY_OK": "${EMPTY?may be empty}",
    "ESCAPED": "$$SET and $${SET}",
}
REAL_COMPOSE_V2 = {
    "ALT_SET": "${SET:+alt}",
    "ALT_EMPTY": "${EMPTY:+alt}",
    "ALT_EMPTY_HARD": "${EMPTY+alt}",
    "ALT_UNSET": "${UNSET+alt}",
    "NESTED": "${UNSET:-${SET}-n}",
    "NESTED_DEEP": "${UNSET:-${UNSET2:-deep}}",
    "LONE_DOLLAR": "cost $5 and $",
}


def test_interpolation_matches_real_compose(tmp_path: Path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    version = subprocess.run([*cli, "version", "--short"], capture_output=True, text=True)
    major = int(re.search(r"\d+", version.stdout).group())
    templates = {**REAL_COMPOSE_V1, **(REAL_COMPOSE_V2 if major >= 2 else {})}
    doc = {"services": {"node": {"image": "${REG:-docker.io}/deepfleet/${FLAVOR-cpu}:$TAG",
                                 "environment": templates}}}  # fmt: skip
    path = tmp_path / "compose.yml"
    path.write_text(yaml.safe_dump(doc))
    env = {"SET": "x", "EMPTY": "", "TAG": "7"}

    def real(env: dict) -> subprocess.CompletedProcess:
        # only these variables, and no .env or user config, may reach compose
        run_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env}
        argv = [*cli, "-p", "dftest", "--project-directory", str(tmp_path), "-f", str(path)]
        return subprocess.run([*argv, "config"], env=run_env, capture_output=True, text=True)

    done = real(env)
    assert done.returncode == 0, done.stderr
    theirs = yaml.safe_load(done.stdout)["services"]["node"]
    ours, _ = compose.load([path], env)
    # `config` writes a literal $ back as $$
    unescape = {k: str(v).replace("$$", "$") for k, v in theirs["environment"].items()}
    assert ours["environment"] == unescape
    assert ours["image"] == theirs["image"] == "docker.io/deepfleet/cpu:7"

    env.pop("SET")  # ${SET:?must be set} now stops both
    assert real(env).returncode != 0
    with pytest.raises(ContainerError, match="SET is required: must be set"):
        compose.load([path], env)
