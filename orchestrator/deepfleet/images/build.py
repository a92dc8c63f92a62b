"""Build the node images from images/Dockerfile.<flavor> with the manifest's versions.

The build context is images/; images/context/ is staged here each build with the
extra CA certificates and the optional local wheelhouse, so Dockerfiles stay static.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deepfleet import progress
from deepfleet.errors import ImageError
from deepfleet.images.manifest import images_dir, read_manifest, torch_index
from deepfleet.machines.state import default_dir
from deepfleet.planning import flavors

FLAVORS = flavors.NAMES
# BASE_IMAGE=local makes this Debian base with debootstrap where no registry is reachable.
# The cpu image and the cuda image (whose toolkit then comes from NVIDIA's wheels) can use
# it. ROCm's compiler ships in no wheel, so for rocm "local" means the public base its
# Dockerfile names from the manifest.
LOCAL_BASE = "deepfleet/base:bookworm"
LOCAL_BASE_FLAVORS = tuple(f.name for f in flavors.FLAVORS.values() if f.local_base)
# The local version label of the torch wheels built for each flavor (torch-X+cu126-...).
TORCH_LABELS = {f.name: f.torch_label for f in flavors.FLAVORS.values()}
DEFAULT_CA_DIR = Path("/usr/local/share/ca-certificates")


RELAY_TAG = "deepfleet/relay:latest"  # the image relay (relay.py)


def image_tag(flavor: str) -> str:
    return flavors.get(flavor).image


@dataclass(frozen=True)
class BuildRequest:
    flavor: str = "cpu"
    base_image: str = "local"
    ca_dir: Path | None = DEFAULT_CA_DIR
    wheelhouse: Path | None = None
    torch_index_url: str = ""
    tag: str = ""
    extra_args: dict[str, str] = field(default_factory=dict)

    def resolved_tag(self) -> str:
        return self.tag or image_tag(self.flavor)

    def resolved_base(self) -> str:
        """The BASE_IMAGE build arg; empty leaves the Dockerfile's own default."""
        if self.base_image == "vendor":
            return ""
        if self.base_image != "local":
            return self.base_image
        return LOCAL_BASE if self.flavor in LOCAL_BASE_FLAVORS else ""

    def resolved_torch_index(self, manifest: dict[str, str]) -> str:
        if self.torch_index_url:
            return self.torch_index_url
        # cpu: the local wheelhouse, then PyPI (TORCH_INDEX_CPU only when asked for).
        return "" if self.flavor == "cpu" else torch_index(manifest, self.flavor)


def build_args(req: BuildRequest, manifest: dict[str, str]) -> dict[str, str]:
    args = dict(manifest)
    base = req.resolved_base()
    if base:
        args["BASE_IMAGE"] = base
    args["TORCH_INDEX_URL"] = req.resolved_torch_index(manifest)
    args.update(req.extra_args)
    return args


def wheel_fits(wheel: Path, flavor: str) -> bool:
    """False for a torch wheel built for another flavor (a cpu wheelhouse in a GPU build)."""
    name, _, rest = wheel.name.partition("-")
    _, plus, label = rest.split("-", 1)[0].partition("+")
    return name != "torch" or not plus or label.startswith(TORCH_LABELS[flavor])


def stage_context(req: BuildRequest, root: Path) -> Path:
    """Fill images/context with the CAs and wheels this build should use."""
    context = root / "context"
    shutil.rmtree(context, ignore_errors=True)
    (context / "ca-certificates").mkdir(parents=True)
    (context / "wheels").mkdir()
    if req.ca_dir and req.ca_dir.is_dir():
        for cert in sorted(req.ca_dir.rglob("*.crt")):
            shutil.copy2(cert, context / "ca-certificates" / cert.name)
    if req.wheelhouse and req.wheelhouse.is_dir():
        for wheel in sorted(req.wheelhouse.glob("*.whl")):
            if not wheel_fits(wheel, req.flavor):
                continue
            # hard links keep a multi-GB wheelhouse from being copied on every build
            target = context / "wheels" / wheel.name
            try:
                target.hardlink_to(wheel)
            except OSError:
                shutil.copy2(wheel, target)
    return context


def ensure_local_base(root: Path) -> None:
    result = subprocess.run([str(root / "make-base.sh"), LOCAL_BASE], check=False)
    if result.returncode != 0:
        raise ImageError(f"could not make the local base image {LOCAL_BASE} (see output above)")


def build(client, req: BuildRequest, out=sys.stdout, verbose: bool = True) -> str:
    """Build the image with docker-py's API client; returns the image ID."""
    if req.flavor not in FLAVORS:
        raise ImageError(f"unknown flavor {req.flavor!r}; choose one of {', '.join(FLAVORS)}")
    root = images_dir()
    if req.resolved_base() == LOCAL_BASE:
        ensure_local_base(root)
    stage_context(req, root)
    args = build_args(req, read_manifest(root / "versions.env"))
    tag = req.resolved_tag()
    return _run_build(client, root, f"Dockerfile.{req.flavor}", tag, args, out, verbose)


def build_relay(client, base_image: str = "local", out=sys.stdout, verbose: bool = True) -> str:
    """The image relay's own small image (images/Dockerfile.relay), from the same base."""
    root = images_dir()
    req = BuildRequest(flavor="cpu", base_image=base_image)
    base = req.resolved_base()
    if base == LOCAL_BASE:
        ensure_local_base(root)
    stage_context(BuildRequest(wheelhouse=None), root)
    manifest = read_manifest(root / "versions.env")
    args = {
        "BUSYBOX_VERSION": manifest["BUSYBOX_VERSION"],
        **({"BASE_IMAGE": base} if base else {}),
    }
    return _run_build(client, root, "Dockerfile.relay", RELAY_TAG, args, out, verbose)


# the classic builder's line for each Dockerfile instruction: "Step 3/25 : RUN ..."
_STEP = re.compile(r"^Step (\d+)/(\d+) :")


class BuildOutput:
    """Where a build's output goes: all of it to the terminal (verbose), or to a log file
    with one progress line over the Dockerfile's steps on the terminal."""

    def __init__(self, tag: str, out, verbose: bool, log_dir: Path | None = None):
        self.out, self.verbose = out, verbose
        self.log_path = (
            log_dir or default_dir()
        ) / f"build-{re.sub(r'[^A-Za-z0-9.-]', '_', tag)}.log"
        self.log = None
        self.bar = None
        if not verbose:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = self.log_path.open("w", encoding="utf-8")
            self.board = progress.Board(out)
            self.bar = self.board.bar(f"build {tag}", 0, unit="step")

    def write(self, text: str) -> None:
        if self.verbose:
            self.out.write(text)
            self.out.flush()
            return
        self.log.write(text)
        for line in text.splitlines():
            step = _STEP.match(line)
            if step:
                self.bar.set_total(int(step.group(2)))
                self.bar.update_to(int(step.group(1)))

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.board.close()

    def where(self) -> str:
        return "" if self.verbose else f" (full output: {self.log_path})"


def _run_build(
    client, root: Path, dockerfile: str, tag: str, args: dict, out, verbose: bool = True
) -> str:
    if not (root / dockerfile).is_file():
        raise ImageError(f"{root / dockerfile} is missing")
    image_id = None
    shown = BuildOutput(tag, out, verbose)
    try:
        image_id = _stream_build(client, root, dockerfile, tag, args, shown)
    finally:
        shown.close()
    if image_id is None:
        image_id = client.images.get(tag).id
    return image_id


def _stream_build(client, root: Path, dockerfile: str, tag: str, args: dict, shown) -> str | None:
    image_id = None
    stream = client.api.build(
        path=str(root),
        dockerfile=dockerfile,
        tag=tag,
        buildargs=args,
        rm=True,
        forcerm=True,
        decode=True,
    )
    for chunk in stream:
        if "stream" in chunk:
            shown.write(chunk["stream"])
        if "aux" in chunk and "ID" in chunk["aux"]:
            image_id = chunk["aux"]["ID"]
        if "error" in chunk:
            shown.write(chunk["error"])
            raise ImageError(f"building {tag} failed: {chunk['error'].strip()}{shown.where()}")
    return image_id
