"""The registry path on the lab: push the node image to the lab's registry, `up` by digest.

The lab's registry (docker/labregistry.py) is Debian's docker-registry on the operator,
over HTTPS from a CA the lab's engines trust. The session cluster is taken down, its
machines lose the node image, and `up --image REGISTRY/deepfleet/cpu@sha256:...` makes all
three pull it at once; then, with the registry stopped, a machine without the image is
streamed to and says why. The cluster is put back as it was for the tests after these.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from labtools import DEEPFLEET, ROOT, lab_module

pytestmark = [pytest.mark.lab, pytest.mark.slow]
NODE_IMAGE = "deepfleet/cpu:latest"


@pytest.fixture(scope="module")
def lab_registry(lab, outer_docker):
    registry = lab_module.start_registry(lab.dir, outer_docker)
    yield registry
    container = outer_docker.containers.get(registry.container)
    container.remove(force=True, v=True)


@pytest.fixture(scope="module")
def pushed(cluster, lab_registry, tmp_path_factory):
    """The node image pushed with `deepfleet push-image`; its record, which the operator's
    `up` also reads (to find its own copy of a digest reference, for streaming)."""
    record = tmp_path_factory.mktemp("published") / "published.json"
    before = os.environ.get("DEEPFLEET_PUBLISHED")
    os.environ["DEEPFLEET_PUBLISHED"] = str(record)
    try:
        done = subprocess.run(
            [*DEEPFLEET, "push-image", lab_registry.address, "--cert-dir",
             str(lab_registry.trust_dir)],
            cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        entry = json.loads(record.read_text())["images"][-1]
        assert entry["ref"].startswith(f"{lab_registry.address}/deepfleet/cpu@sha256:")
        assert f"up --image {entry['ref']}" in done.stdout
        yield entry
    finally:
        if before is None:
            os.environ.pop("DEEPFLEET_PUBLISHED", None)
        else:
            os.environ["DEEPFLEET_PUBLISHED"] = before


def _image_id(outer_docker) -> str:
    return outer_docker.images.get(NODE_IMAGE).id


def _without_node_image(cluster, indices, image_id: str) -> None:
    """The machines lose the image, every name of it and its layers (no container holds
    it after down)."""
    for index in indices:
        cluster.machine_docker(index, "rmi", "-f", image_id, check=False)


def _held(cluster, index: int, image_id: str) -> bool:
    out = cluster.machine_docker(index, "images", "-q", "--no-trunc")
    return image_id in out.split()


def test_up_pulls_the_image_by_digest_onto_every_machine(cluster, outer_docker, pushed):
    image_id = _image_id(outer_docker)
    assert pushed["image_id"] == image_id
    cluster.run("down")
    _without_node_image(cluster, range(3), image_id)
    assert not any(_held(cluster, i, image_id) for i in range(3))
    out = cluster.run("up", "--image", pushed["ref"], *cluster.up_args, timeout=1800).stdout
    assert "image: lab1, lab2, lab3 pull it" in out, out
    for index, name in enumerate(("lab1", "lab2", "lab3")):
        assert re.search(rf"^\[{name}\] image pulled", out, re.M), out
        assert _held(cluster, index, image_id), name  # the image ID is the operator's
        digests = cluster.machine_docker(index, "inspect", "-f", "{{json .RepoDigests}}",
                                         image_id)  # fmt: skip
        assert pushed["ref"] in json.loads(digests), digests
    assert "streaming" not in out and "relayed" not in out, out
    status = json.loads(cluster.run("status", "--json").stdout)
    assert {n["state"] for n in status["nodes"]} == {"running"}


def test_a_registry_that_is_down_means_streaming_with_one_line(
    cluster, outer_docker, lab_registry, pushed
):
    image_id = _image_id(outer_docker)
    cluster.run("down")
    _without_node_image(cluster, [2], image_id)  # lab3 has nothing; lab1 and lab2 keep the image
    lab_module.labregistry.stop(outer_docker, lab_registry)
    try:
        out = cluster.run("up", "--image", pushed["ref"], *cluster.up_args, timeout=1800).stdout
    finally:
        lab_module.labregistry.start_again(outer_docker, lab_registry)
    said = [line for line in out.splitlines() if "cannot pull" in line]
    assert said == [
        f"[lab3] cannot pull from {lab_registry.address}: connection refused; "
        "streaming the image from here instead"
    ], out
    assert re.search(r"^\[lab3\] image streamed", out, re.M), out
    assert _held(cluster, 2, image_id)
    status = json.loads(cluster.run("status", "--json").stdout)
    assert {n["state"] for n in status["nodes"]} == {"running"}


@pytest.fixture(scope="module", autouse=True)
def _cluster_back_as_it_was(cluster, outer_docker):
    """After this module: the node image under its usual name on every machine, and the
    session cluster up from it again."""
    yield
    image_id = _image_id(outer_docker)
    cluster.run("down", check=False)
    for index in range(3):
        cluster.machine_docker(index, "tag", image_id, NODE_IMAGE, check=False)
    out = cluster.run("up", *cluster.up_args, timeout=1800).stdout
    assert "streamed" not in out and "relayed" not in out, out
