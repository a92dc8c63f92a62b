"""Images: put the node image on every node.

Pull where the reference names a registry the node can reach; otherwise stream the
operator's copy over the node's SSH connection (docker save | docker load), skipped when
the node already holds that exact image ID. An image with no registry host in its name
(deepfleet/cpu:latest) is never pulled: that would ask Docker Hub for a local build.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from docker.errors import APIError, ImageNotFound

from .errors import ImageError

CHUNK = 4 << 20


@dataclass(frozen=True)
class ImageResult:
    node: str
    action: str  # present | pulled | streamed
    image_id: str
    seconds: float
    bytes_sent: int = 0

    def describe(self) -> str:
        if self.action == "streamed":
            mb = self.bytes_sent / 1e6
            rate = mb / self.seconds if self.seconds else 0.0
            return f"streamed {mb:.0f} MB in {self.seconds:.1f}s ({rate:.0f} MB/s)"
        return f"{self.action} ({self.seconds:.1f}s)"


def names_registry(ref: str) -> bool:
    """True when the first path component is a registry host (has '.' or ':' or is localhost)."""
    first, sep, _ = ref.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def local_image_id(local, ref: str) -> str | None:
    try:
        return local.images.get(ref).id
    except ImageNotFound:
        return None


def _node_image_id(client, ref: str) -> str | None:
    try:
        return client.images.get(ref).id
    except ImageNotFound:
        return None


class _Counter:
    """Wraps docker save's chunk stream to count what crosses the wire."""

    def __init__(self, chunks):
        self.chunks = chunks
        self.sent = 0

    def __iter__(self):
        for chunk in self.chunks:
            self.sent += len(chunk)
            yield chunk


def stream_image(local, client, ref: str, node: str) -> int:
    counter = _Counter(local.api.get_image(ref, chunk_size=CHUNK))
    try:
        for message in client.api.load_image(counter):
            if "error" in message:
                raise ImageError(f"loading {ref} failed: {message['error']}", node)
    except APIError as exc:
        raise ImageError(f"loading {ref} failed: {exc.explanation or exc}", node) from exc
    return counter.sent


def ensure_image(local, client, ref: str, node: str, pull: str = "auto") -> ImageResult:
    """Make `ref` present on the node's engine with the operator's image ID."""
    start = time.monotonic()
    want = local_image_id(local, ref) if local is not None else None
    have = _node_image_id(client, ref)
    if have and (want is None or have == want):
        return ImageResult(node, "present", have, time.monotonic() - start)
    if pull == "always" or (pull == "auto" and names_registry(ref)):
        try:
            client.images.pull(ref)
            got = _node_image_id(client, ref)
            if got and (want is None or got == want):
                return ImageResult(node, "pulled", got, time.monotonic() - start)
        except APIError as exc:
            if want is None:
                raise ImageError(f"cannot pull {ref}: {exc.explanation or exc}", node) from exc
    if want is None:
        raise ImageError(
            f"image {ref} is neither on the node nor on this machine to stream "
            f"(build it with `make images`)",
            node,
        )
    sent = stream_image(local, client, ref, node)
    got = _node_image_id(client, ref)
    if got != want:
        raise ImageError(f"after streaming, {ref} is {got} on the node, not {want}", node)
    return ImageResult(node, "streamed", got, time.monotonic() - start, sent)
