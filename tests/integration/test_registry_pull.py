"""The registry path with real parts and no lab: Debian's docker-registry on loopback (the
engine trusts 127.0.0.1 without TLS), skopeo pushing a small labelled image from this
machine's engine, and the engine pulling it back by digest through registry.pull."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time

import docker
import pytest
import requests

from deepfleet.errors import ImageError
from deepfleet.images import delivery, published, registry
from deepfleet.images.manifest import read_manifest

pytestmark = pytest.mark.lab


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def loopback_registry(tmp_path):
    if not shutil.which("docker-registry") or not shutil.which("skopeo"):
        pytest.fail("docker-registry and skopeo are missing: run scripts/ensure-docker.sh")
    port = _free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
        f"{tmp_path / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(100):
            try:
                if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _image(client, tag: str, **labels) -> str:
    m = read_manifest()
    wanted = {"ai.deepfleet.flavor": "cpu", **registry.expected_labels(m, "cpu"), **labels}
    lines = ["FROM deepfleet/base:bookworm", f"RUN echo {tag} > /which"]
    lines += [f'LABEL {k}="{v}"' for k, v in wanted.items()]
    image, _ = client.images.build(
        fileobj=io.BytesIO("\n".join(lines).encode()), tag=tag, rm=True, forcerm=True
    )
    return image.id


def test_push_then_pull_by_digest_keeps_the_image_id(loopback_registry, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPFLEET_PUBLISHED", str(tmp_path / "published.json"))
    client = docker.from_env(timeout=300)
    source = "deepfleet-test/pushed:1"
    image_id = _image(client, source)
    try:
        entry = registry.push(client, source, loopback_registry, "cpu", read_manifest(),
                              tls_verify=False)  # fmt: skip
        published.record(entry)
        assert entry["image_id"] == image_id and entry["ref"].startswith(loopback_registry)
        # this machine finds its own image for the digest, for the fallback stream
        assert delivery.local_source(client, entry["ref"]) == (source, image_id)
        assert registry.pull(client, entry["ref"], "here", None, read_manifest()) == image_id
        digests = client.images.get(image_id).attrs["RepoDigests"]
        assert entry["ref"] in digests
        elsewhere = entry["ref"].replace(loopback_registry, f"127.0.0.1:{_free_port()}")
        with pytest.raises(registry.PullFailed, match="connection refused"):
            registry.pull(client, elsewhere, "here")
    finally:
        client.images.remove(image_id, force=True)


def test_an_image_whose_labels_disagree_with_the_manifest_is_refused(loopback_registry, tmp_path):
    client = docker.from_env(timeout=300)
    source = "deepfleet-test/old:1"
    image_id = _image(client, source, **{"ai.deepfleet.torch": "1.0.0"})
    try:
        with pytest.raises(ImageError, match="torch 1.0.0 where the manifest says"):
            registry.push(client, source, loopback_registry, "cpu", read_manifest(),
                          tls_verify=False)  # fmt: skip
        # pushed anyway (by someone else's tool): the pull is what refuses it
        target = f"{loopback_registry}/deepfleet-test/old:1"
        argv = registry.push_command(source, target, tmp_path / "digest", None, tls_verify=False)
        subprocess.run(argv, check=True, capture_output=True, timeout=300)
        ref = f"{loopback_registry}/deepfleet-test/old@{(tmp_path / 'digest').read_text().strip()}"
        with pytest.raises(ImageError, match="does not match images/versions.env"):
            registry.pull(client, ref, "here", None, read_manifest())
    finally:
        client.images.remove(image_id, force=True)
