"""One home for each fact: the orchestrator's layout and flavors agree with the image's
and the node service's own statements of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deepfleet import layout
from deepfleet.planning import compose, flavors, plan

ROOT = Path(__file__).resolve().parents[2]


def test_the_containers_sshd_listens_on_the_ssh_port():
    config = (ROOT / "images/common/sshd_config").read_text()
    assert re.search(rf"^Port {layout.SSH_PORT}$", config, re.M)


@pytest.mark.parametrize("flavor", flavors.NAMES)
def test_each_image_states_the_layout(flavor):
    dockerfile = (ROOT / f"images/Dockerfile.{flavor}").read_text()
    assert f"HF_HOME={layout.HF_HOME}" in dockerfile
    assert f"TORCH_EXTENSIONS_DIR={layout.TORCH_EXTENSIONS_DIR}" in dockerfile
    assert re.search(rf"^WORKDIR {layout.WORKDIR}$", dockerfile, re.M)
    assert re.search(rf"^EXPOSE {layout.SSH_PORT}$", dockerfile, re.M)


@pytest.mark.parametrize("flavor", flavors.NAMES)
def test_the_node_service_mounts_the_layout_and_names_the_image(flavor):
    spec = compose.node_spec(flavor, {})
    assert spec.name == layout.CONTAINER_NAME
    assert spec.image == flavors.get(flavor).image
    assert spec.environment["HF_HOME"] == layout.HF_HOME
    targets = {m.target for m in spec.mounts}
    assert {layout.MODELS, layout.DATA, layout.CHECKPOINTS, layout.HF_HOME} <= targets
    for overlay in flavors.get(flavor).overlays:
        assert (compose.compose_dir() / overlay).is_file()


def test_every_flavor_has_a_backend_an_image_and_its_own_devices():
    assert plan.BACKENDS["cpu"] == "gloo"
    assert {plan.BACKENDS[f] for f in ("cuda", "rocm")} == {"nccl"}
    assert [f.image for f in flavors.FLAVORS.values()] == [
        "deepfleet/cpu:latest", "deepfleet/cuda:latest", "deepfleet/rocm:latest"
    ]  # fmt: skip
    assert compose.node_spec("cuda", {}).device_requests
    assert "/dev/kfd" in compose.node_spec("rocm", {}).devices
    with pytest.raises(ValueError, match="unknown flavor 'tpu'"):
        flavors.get("tpu")
