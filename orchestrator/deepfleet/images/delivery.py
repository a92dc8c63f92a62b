"""Images: put the node image on every node.

Pull where the reference names a registry the node can reach; otherwise stream the
operator's copy over the node's SSH connection (docker save | docker load), skipped when
the node already holds that exact image ID. An image with no registry host in its name
(deepfleet/cpu:latest) is never pulled: that would ask Docker Hub for a local build.

Streaming sends only the layers the node lacks: `docker load` reads a layer's tar only
when the engine has no layer with that chain ID, so a rebuilt image whose lower layers
the node already holds crosses the wire as its changed top layers alone.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import paramiko
from docker.errors import DockerException, ImageNotFound

from deepfleet import progress
from deepfleet.errors import ImageError
from deepfleet.images import published, registry
from deepfleet.images.manifest import read_manifest
from deepfleet.machines.connect import host_channel, stall_timeout

CHUNK = 4 << 20


class LoadStalled(ImageError):
    """The node stopped taking or unpacking the image: sending it again would stall too."""


@dataclass(frozen=True)
class ImageResult:
    node: str
    action: str  # present | pulled | streamed | relayed
    image_id: str
    seconds: float
    bytes_sent: int = 0  # from this machine
    bytes_received: int = 0  # by the node, when it came through a relay
    route: str = ""  # the relay chain

    def describe(self) -> str:
        if self.action == "relayed":
            mb = self.bytes_received / 1e6
            rate = mb / self.seconds if self.seconds else 0.0
            return f"relayed {mb:.0f} MB in {self.seconds:.1f}s ({rate:.0f} MB/s; {self.route})"
        if self.action == "streamed":
            mb = self.bytes_sent / 1e6
            rate = mb / self.seconds if self.seconds else 0.0
            return f"streamed {mb:.0f} MB in {self.seconds:.1f}s ({rate:.0f} MB/s)"
        return f"{self.action} ({self.seconds:.1f}s)"


def names_registry(ref: str) -> bool:
    """True when the first path component is a registry host (has '.' or ':' or is localhost)."""
    return bool(registry.parse_ref(ref).registry)


def local_source(local, ref: str) -> tuple[str, str] | None:
    """This machine's name and ID for the image `ref` names: the ref itself, or, for a
    digest reference in the published record, the local image it was pushed from (the
    image ID is the same wherever the image lives)."""
    try:
        return ref, local.images.get(ref).id
    except ImageNotFound:
        pass
    entry = published.lookup(ref) if "@" in ref else None
    if entry is None:
        return None
    for name in (entry.get("source"), entry["image_id"]):
        try:
            image = local.images.get(name) if name else None
        except ImageNotFound:
            continue
        if image is not None and image.id == entry["image_id"]:
            return name, image.id
    return None


def local_image_id(local, ref: str) -> str | None:
    found = local_source(local, ref)
    return found[1] if found else None


# Set by images/Dockerfile.cuda from the manifest: the CUDA release its torch is built for.
CUDA_LABEL = "ai.deepfleet.cuda"


def local_labels(local, ref: str) -> dict[str, str]:
    """The labels of an image on this machine ({} when it is not here)."""
    if local is None:
        return {}
    try:
        return dict(local.images.get(ref).labels or {})
    except DockerException:  # not here, or the engine would not say: nothing to go on
        return {}


def node_image_id(client, ref: str) -> str | None:
    try:
        return client.images.get(ref).id
    except ImageNotFound:
        return None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("DEEPFLEET_IMAGE_CACHE", Path(base) / "deepfleet" / "images"))


_save_lock = threading.Lock()


def saved_image(local, ref: str, image_id: str, keep: int = 2) -> Path:
    """`docker save` of the image, once per image ID, kept in the cache for every node."""
    directory = cache_dir()
    path = directory / f"{image_id.split(':')[-1]}.tar"
    with _save_lock:  # nodes stream in parallel; one of them saves
        if path.exists():
            return path
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            for chunk in local.api.get_image(ref, chunk_size=CHUNK):
                fh.write(chunk)
        os.replace(tmp, path)
        old = sorted(directory.glob("*.tar"), key=lambda p: p.stat().st_mtime)[:-keep]
        for stale in old:
            stale.unlink(missing_ok=True)
    return path


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Docker's layer chain IDs: the layer's identity together with everything below it."""
    chains = []
    for diff in diff_ids:
        chains.append(
            diff if not chains else "sha256:" + sha256(f"{chains[-1]} {diff}".encode()).hexdigest()
        )
    return chains


def node_chains(client) -> set[str]:
    held: set[str] = set()
    for image in client.images.list(all=True):
        held.update(chain_ids(image.attrs.get("RootFS", {}).get("Layers") or []))
    return held


def layer_plan(archive: Path) -> list[tuple[str, str]]:
    """(layer directory in the archive, chain ID) from the bottom layer up."""
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))[0]
        config = json.load(tar.extractfile(manifest["Config"]))
    chains = chain_ids(config["rootfs"]["diff_ids"])
    return [(Path(p).parts[0], c) for p, c in zip(manifest["Layers"], chains, strict=True)]


def delta_archive(archive: Path, skip: set[str]) -> Path:
    """A copy of the save archive without the layer directories in `skip`."""
    fd, tmp = tempfile.mkstemp(dir=archive.parent, suffix=".delta.tar")
    os.close(fd)
    with tarfile.open(archive) as src, tarfile.open(tmp, "w") as out:
        for member in src.getmembers():
            top = Path(member.name).parts[0]
            if top in skip:
                continue
            if member.issym() or member.islnk():
                # a deduplicated layer may point into a skipped directory: send the bytes
                data = src.extractfile(member)
                if data is None:
                    continue
                payload = data.read()
                copy = tarfile.TarInfo(member.name)
                copy.size, copy.mode, copy.mtime = len(payload), 0o644, member.mtime
                out.addfile(copy, io.BytesIO(payload))
                continue
            out.addfile(member, src.extractfile(member) if member.isfile() else None)
    return Path(tmp)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def held_layers(archive: Path, held: set[str]) -> set[str]:
    """The archive's layer directories whose chain IDs are in `held` (not to be sent)."""
    return {directory for directory, chain in layer_plan(archive) if chain in held}


def stream_image(local, client, ref: str, node: str, image_id: str, board=None) -> int:
    stall = stall_timeout()
    archive = saved_image(local, ref, image_id)
    skip = held_layers(archive, node_chains(client))
    if skip:
        delta = delta_archive(archive, skip)
        try:
            return _load(client, delta, ref, node, stall, board)
        except LoadStalled:
            raise
        except ImageError:
            pass  # an engine that wants every layer (containerd image store): send them all
        finally:
            delta.unlink(missing_ok=True)
    return _load(client, archive, ref, node, stall, board)


def _load(client, archive: Path, ref: str, node: str, stall: float, board=None) -> int:
    """`docker load` on the machine itself, fed over an SSH channel of its own.

    The engine's HTTP API over `docker system dial-stdio` moved about half the bytes per
    second of a plain `docker save | ssh docker load` here; this is that plain path. Every
    write waits at most `stall` seconds, however large the image or slow the disk.
    """
    bar = board.bar(f"[{node}] image", archive.stat().st_size) if board is not None else None
    channel = host_channel(client, "docker load")
    channel.settimeout(stall)
    sent, started = progress.Counted(_file_chunks(archive), bar), time.monotonic()
    try:
        for chunk in sent:
            channel.sendall(chunk)
        channel.shutdown_write()
        if not channel.status_event.wait(stall):  # every byte sent; the load never ended
            raise TimeoutError(f"docker load did not end {stall:.0f} s after the last byte")
        code = channel.recv_exit_status()
        said = (channel.makefile_stderr("rb").read() or b"").decode(errors="replace")
    except (OSError, paramiko.SSHException) as exc:  # a write or read that waited
        raise LoadStalled(
            f"loading {ref} made no progress for {stall:.0f} s "
            f"({sent.done / 1e6:.0f} MB sent in {time.monotonic() - started:.0f} s); "
            "is the machine's disk full or its engine stuck? (--stall-timeout to wait longer)",
            node,
        ) from exc
    finally:
        channel.close()
        if bar is not None:
            bar.close()
    if code != 0:
        cause = " ".join(said.split())[:300] or f"docker load exited {code}"
        raise ImageError(f"loading {ref} failed: {cause}", node)
    return sent.done


def ensure_image(
    local, client, ref: str, node: str, pull: str = "auto", board=None, say=None
) -> ImageResult:
    """Make `ref` present on the node's engine with the operator's image ID: pulled where
    it names a registry, else (or when the pull fails, saying why) streamed from here."""
    start = time.monotonic()
    source = local_source(local, ref) if local is not None else None
    want = source[1] if source else None
    have = node_image_id(client, ref)
    if have and (want is None or have == want):
        return ImageResult(node, "present", have, time.monotonic() - start)
    say = say or (board.line if board is not None else lambda _line: None)
    if pull == "always" or (pull == "auto" and names_registry(ref)):
        try:
            got = registry.pull(client, ref, node, board, read_manifest())
        except registry.PullFailed as exc:
            if want is None:
                raise
            say(f"[{node}] {exc}; streaming the image from here instead")
        else:
            if want is None or got == want:
                return ImageResult(node, "pulled", got, time.monotonic() - start)
            say(f"[{node}] the registry's {ref} is {got}, not this machine's {want}: streaming")
    if source is None:
        raise ImageError(
            f"image {ref} is neither on the node nor on this machine to stream "
            f"(build it with `make images`)",
            node,
        )
    name = source[0]
    sent = stream_image(local, client, name, node, want, board)
    got = node_image_id(client, name)
    if got != want:
        raise ImageError(f"after streaming, {name} is {got} on the node, not {want}", node)
    return ImageResult(node, "streamed", got, time.monotonic() - start, sent)
