"""Registry references, the label check against the manifest, skopeo's push line, and the
published-images record (schemas/published.schema.json), without a registry."""

from __future__ import annotations

import json

import pytest

from deepfleet.errors import ImageError
from deepfleet.images import published, registry
from deepfleet.images.manifest import read_manifest

DIGEST = "sha256:" + "ab" * 32
IMAGE_ID = "sha256:" + "cd" * 32


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("deepfleet/cpu:latest", registry.Ref("", "deepfleet/cpu", "latest")),
        ("deepfleet/cpu", registry.Ref("", "deepfleet/cpu")),
        (
            f"10.0.0.1:5000/deepfleet/cpu@{DIGEST}",
            registry.Ref("10.0.0.1:5000", "deepfleet/cpu", "", DIGEST),
        ),
        ("registry.lan/deepfleet/cuda:v1", registry.Ref("registry.lan", "deepfleet/cuda", "v1")),
        ("localhost/x", registry.Ref("localhost", "x")),
    ],
)
def test_references_split_into_registry_repository_tag_and_digest(text, want):
    got = registry.parse_ref(text)
    assert got == want
    assert str(got) == (
        text if (":" in text.rsplit("/", 1)[-1] or "@" in text) else f"{text}:latest"
    )


def test_a_digest_that_is_not_sha256_is_refused():
    with pytest.raises(ImageError, match="not a sha256 digest"):
        registry.parse_ref("10.0.0.1:5000/deepfleet/cpu@sha256:short")


def test_labels_are_checked_against_the_manifest():
    manifest = read_manifest()
    good = {"ai.deepfleet.flavor": "cpu", **registry.expected_labels(manifest, "cpu")}
    assert registry.label_problems(good, manifest, "cpu") == []
    old = {**good, "ai.deepfleet.torch": "2.0.0"}
    assert registry.label_problems(old, manifest, "cpu") == [
        f"torch 2.0.0 where the manifest says {manifest['TORCH_VERSION']}"
    ]
    cuda = registry.label_problems(good, manifest, "cuda")
    assert any(p.startswith("it is a cpu image") for p in cuda)
    assert any(p.startswith("cuda unlabelled") for p in cuda)


def test_the_version_tag_carries_the_manifests_versions():
    manifest = read_manifest()
    tag = registry.version_tag(manifest, "cuda")
    for key in ("TORCH_VERSION", "DEEPSPEED_VERSION", "TRANSFORMERS_VERSION", "CUDA_VERSION"):
        assert manifest[key] in tag


def test_skopeo_pushes_from_the_engine_with_the_trust_given(tmp_path, monkeypatch):
    monkeypatch.setattr(registry.shutil, "which", lambda _: "/usr/bin/skopeo")
    argv = registry.push_command("deepfleet/cpu:latest", "r:5000/deepfleet/cpu:t", tmp_path / "d",
                                 tmp_path / "ca", tls_verify=True)  # fmt: skip
    assert argv[:2] == ["/usr/bin/skopeo", "copy"]
    assert argv[-2:] == ["docker-daemon:deepfleet/cpu:latest", "docker://r:5000/deepfleet/cpu:t"]
    assert ["--dest-cert-dir", str(tmp_path / "ca")] == argv[argv.index("--dest-cert-dir") :][:2]
    plain = registry.push_command("a:1", "r/a:1", tmp_path / "d", None, tls_verify=False)
    assert "--dest-tls-verify=false" in plain and "--dest-cert-dir" not in plain


def test_pull_causes_are_said_in_our_words():
    ref = registry.parse_ref(f"10.0.0.1:5000/deepfleet/cpu@{DIGEST}")
    refused = 'Get "https://10.0.0.1:5000/v2/": dial tcp 10.0.0.1:5000: connect: connection refused'
    assert (
        registry._pull_cause(refused, ref) == "cannot pull from 10.0.0.1:5000: connection refused"
    )
    assert "not trusted" in registry._pull_cause(
        "x509: certificate signed by unknown authority", ref
    )


def _entry(ref=f"r:5000/deepfleet/cpu@{DIGEST}", **versions):
    manifest = read_manifest()
    keys = ("TORCH_VERSION", "DEEPSPEED_VERSION", "TRANSFORMERS_VERSION")
    return {
        "ref": ref, "tag": "r:5000/deepfleet/cpu:t", "flavor": "cpu", "image_id": IMAGE_ID,
        "source": "deepfleet/cpu:latest", "versions": {k: manifest[k] for k in keys} | versions,
    }  # fmt: skip


def test_the_record_keeps_the_newest_push_first_and_finds_the_manifests_image(
    tmp_path, monkeypatch
):
    own = tmp_path / "published.json"
    monkeypatch.setenv("DEEPFLEET_PUBLISHED", str(own))
    published.record(_entry(TORCH_VERSION="1.0"))
    published.record(_entry(ref=f"r:5000/deepfleet/cpu@sha256:{'ef' * 32}"))
    published.record(_entry(TORCH_VERSION="1.0"))  # pushed again: it moves to the end
    assert [r["ref"][-4:] for r in json.loads(own.read_text())["images"]] == ["efef", "abab"]
    assert published.lookup(f"r:5000/deepfleet/cpu@{DIGEST}")["versions"]["TORCH_VERSION"] == "1.0"
    assert published.newest("cpu", read_manifest())["ref"].endswith("ef" * 32)
    with pytest.raises(ImageError, match="no published cuda image"):
        published.newest("cuda", read_manifest())


def test_a_record_off_its_schema_names_the_field(tmp_path, monkeypatch):
    own = tmp_path / "published.json"
    own.write_text(json.dumps({"images": [{**_entry(), "image_id": "nope"}]}))
    monkeypatch.setenv("DEEPFLEET_PUBLISHED", str(own))
    with pytest.raises(ImageError, match=r"images/0/image_id"):
        published.records()


def test_the_released_record_is_valid():
    assert isinstance(published.read(published.released_path()), list)


def test_up_image_published_is_the_newest_push_of_each_flavor(tmp_path, monkeypatch):
    from deepfleet.cluster.session import UpOptions, image_for

    monkeypatch.setenv("DEEPFLEET_PUBLISHED", str(tmp_path / "published.json"))
    published.record(_entry())
    assert image_for("cpu", UpOptions(image="published")) == f"r:5000/deepfleet/cpu@{DIGEST}"
    assert image_for("cpu", UpOptions()) == "deepfleet/cpu:latest"
    with pytest.raises(ImageError, match="no published rocm image"):
        image_for("rocm", UpOptions(image="published"))
