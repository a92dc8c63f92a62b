"""Registries: push the node images to one, and pull them from it by digest.

A digest reference (host:port/deepfleet/cpu@sha256:...) names exactly one image: the
engine checks every blob against it as it pulls, and `pull` then checks that the image
it holds answers to that digest and that its version labels are the manifest's. The push
goes through skopeo, which reads the operator's engine and writes the registry with its
own trust (`--cert-dir`) and the user's registry logins, so no engine's configuration is
changed to publish.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from docker.errors import APIError, DockerException

from deepfleet.errors import ImageError
from deepfleet.planning import flavors

# The image labels set from the manifest (images/Dockerfile.*), by manifest key.
VERSION_LABELS = {
    "TORCH_VERSION": "ai.deepfleet.torch",
    "DEEPSPEED_VERSION": "ai.deepfleet.deepspeed",
    "TRANSFORMERS_VERSION": "ai.deepfleet.transformers",
}
FLAVOR_LABELS = {"cuda": {"CUDA_VERSION": "ai.deepfleet.cuda"}}
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Ref:
    registry: str  # host[:port]; "" for a name with no registry host
    repository: str  # deepfleet/cpu, without the registry
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or 'latest'}"


def parse_ref(ref: str) -> Ref:
    name, _, digest = ref.partition("@")
    if digest and not DIGEST.fullmatch(digest):
        raise ImageError(f"image {ref}: {digest!r} is not a sha256 digest")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return Ref(first, rest, tag, digest)
    return Ref("", name, tag, digest)


def version_tag(manifest: dict[str, str], flavor: str) -> str:
    """The tag a pushed image carries: the manifest's versions, readable in a registry's list."""
    parts = [
        f"torch{manifest['TORCH_VERSION']}",
        f"ds{manifest['DEEPSPEED_VERSION']}",
        f"tf{manifest['TRANSFORMERS_VERSION']}",
    ]
    key = flavors.get(flavor).version_key
    if key:
        parts.append(f"{flavor}{manifest[key]}")
    return "-".join(parts)


def expected_labels(manifest: dict[str, str], flavor: str) -> dict[str, str]:
    wanted = {**VERSION_LABELS, **FLAVOR_LABELS.get(flavor, {})}
    return {label: manifest[key] for key, label in wanted.items()}


def label_problems(labels: dict[str, str], manifest: dict[str, str], flavor: str) -> list[str]:
    """What in an image's labels disagrees with the version manifest (empty: all agree)."""
    found = []
    if labels.get("ai.deepfleet.flavor") not in (None, flavor):
        found.append(f"it is a {labels['ai.deepfleet.flavor']} image, not {flavor}")
    for label, want in expected_labels(manifest, flavor).items():
        got = labels.get(label)
        if got != want:
            what = label.rsplit(".", 1)[-1]
            found.append(f"{what} {got or 'unlabelled'} where the manifest says {want}")
    return found


# --- push ------------------------------------------------------------------------------


def skopeo() -> str:
    found = shutil.which("skopeo")
    if not found:
        raise ImageError("push-image needs skopeo on this machine (apt-get install skopeo)")
    return found


def push_command(
    source: str, target: str, digest_file: Path, cert_dir: Path | None, tls_verify: bool
) -> list[str]:
    argv = [skopeo(), "copy", "--quiet", "--digestfile", str(digest_file)]
    if cert_dir is not None:
        argv += ["--dest-cert-dir", str(cert_dir)]
    if not tls_verify:
        argv.append("--dest-tls-verify=false")
    return [*argv, f"docker-daemon:{source}", f"docker://{target}"]


def push(
    local,
    source: str,
    registry: str,
    flavor: str,
    manifest: dict[str, str],
    cert_dir: Path | None = None,
    tls_verify: bool = True,
    timeout: float = 3600,
) -> dict:
    """Push the operator's `source` image to `registry` under its version tag; returns
    its record (schemas/published.schema.json)."""
    try:
        image = local.images.get(source)
    except DockerException:
        raise ImageError(
            f"image {source} is not on this machine (build it: `make images`)"
        ) from None
    problems = label_problems(dict(image.labels or {}), manifest, flavor)
    if problems:
        raise ImageError(f"image {source} does not match the manifest: {'; '.join(problems)}")
    repository = parse_ref(source).repository
    tag = f"{registry}/{repository}:{version_tag(manifest, flavor)}"
    with tempfile.TemporaryDirectory() as tmp:
        digest_file = Path(tmp) / "digest"
        argv = push_command(source, tag, digest_file, cert_dir, tls_verify)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ImageError(f"pushing {source} to {registry} took over {timeout:.0f}s") from None
        if done.returncode != 0:
            raise ImageError(f"cannot push {source} to {registry}: {_skopeo_cause(done.stderr)}")
        digest = digest_file.read_text().strip()
    keys = [*VERSION_LABELS, *FLAVOR_LABELS.get(flavor, {})]
    return {
        "ref": f"{registry}/{repository}@{digest}",
        "tag": tag,
        "flavor": flavor,
        "image_id": image.id,
        "source": source,
        "versions": {k: manifest[k] for k in keys},
    }


def _skopeo_cause(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "skopeo failed"
    # skopeo's own log prefix (time="..." level=fatal msg="...") says nothing to a person
    match = re.search(r'msg="(.*)"', last)
    return " ".join((match.group(1) if match else last).split())[:300]


# --- pull ------------------------------------------------------------------------------


class PullFailed(ImageError):
    """The machine could not get the image from the registry (unreachable, refused, absent):
    the operator's own copy can still be streamed to it."""


def pull(client, ref: str, node: str, board=None, manifest: dict[str, str] | None = None) -> str:
    """Pull `ref` on the node's engine, with one progress line; returns the image ID once
    the image answers to the digest asked for and, given the manifest, carries its versions."""
    parsed = parse_ref(ref)
    bar = board.bar(f"[{node}] image (pull)", 0) if board is not None else None
    layers: dict[str, tuple[int, int]] = {}  # layer -> (bytes downloaded, size)
    try:
        events = client.api.pull(
            parsed.name, tag=parsed.digest or parsed.tag or "latest", stream=True, decode=True
        )
        for event in events:
            if "error" in event:
                raise PullFailed(_pull_cause(event.get("error", ""), parsed), node)
            detail = event.get("progressDetail") or {}
            if event.get("status") == "Downloading" and detail.get("total"):
                layers[event["id"]] = (detail.get("current", 0), detail["total"])
            elif event.get("status") in ("Download complete", "Already exists", "Pull complete"):
                done = layers.get(event.get("id", ""), (0, 0))[1]
                layers[event.get("id", "")] = (done, done)
            if bar is not None and layers:
                bar.set_total(sum(t for _, t in layers.values()))
                bar.update_to(sum(c for c, _ in layers.values()))
    except APIError as exc:
        raise PullFailed(_pull_cause(exc.explanation or str(exc), parsed), node) from None
    except DockerException as exc:
        raise PullFailed(_pull_cause(str(exc), parsed), node) from None
    finally:
        if bar is not None:
            bar.close()
    try:
        image = client.images.get(ref)
    except DockerException:
        raise ImageError(f"after pulling, {ref} is not on the machine", node) from None
    if parsed.digest and not any(
        d.endswith("@" + parsed.digest) for d in image.attrs.get("RepoDigests") or []
    ):
        raise ImageError(f"the image pulled for {ref} does not answer to its digest", node)
    labels = dict(image.labels or {})
    flavor = labels.get("ai.deepfleet.flavor", "cpu")
    problems = label_problems(labels, manifest, flavor) if manifest is not None else []
    if problems:
        raise ImageError(
            f"{ref} does not match images/versions.env: {'; '.join(problems)} "
            "(push images built from this manifest)",
            node,
        )
    return image.id


_UNREACHABLE = (
    ("connection refused", "connection refused"),
    ("no route to host", "no route to host"),
    ("i/o timeout", "timed out"),
    ("tls handshake timeout", "timed out"),
    ("no such host", "no such host"),
    ("x509", "its TLS certificate is not trusted by the machine's engine"),
    ("http response to https client", "it speaks plain HTTP; the engine wants HTTPS"),
    ("manifest unknown", "the registry has no such image"),
    ("not found", "the registry has no such image"),
    ("unauthorized", "the registry wants a login (docker login on the machine)"),
    ("denied", "the registry refused access (docker login on the machine)"),
)


def _pull_cause(text: str, ref: Ref) -> str:
    low = text.lower()
    for needle, said in _UNREACHABLE:
        if needle in low:
            return f"cannot pull from {ref.registry or 'Docker Hub'}: {said}"
    return f"cannot pull from {ref.registry or 'Docker Hub'}: {' '.join(text.split())[:200]}"
