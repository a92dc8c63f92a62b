from pathlib import Path

import pytest

from deepfleet import compose
from deepfleet.containers import run_kwargs
from deepfleet.errors import ContainerError


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


def test_interpolation_forms():
    env = {"SET": "x", "EMPTY": ""}
    assert compose.interpolate("${SET}-${MISSING:-d}-${EMPTY:-e}-${EMPTY-f}-$$", env) == "x-d-e--$"


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
