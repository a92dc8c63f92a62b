"""Transfer: files between the operator and node containers, and between containers.

Everything moves as tar streams through the Docker API of each node (over its SSH
connection), so nodes need no extra ports or credentials. A directory is copied only when
its content digest differs on the target.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import stat
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from docker.errors import APIError
from requests.exceptions import RequestException
from urllib3.exceptions import ProtocolError

from deepfleet.errors import ContainerError, InputError
from deepfleet.machines.connect import docker_cause, stall_timeout
from deepfleet.machines.containers import exec_text
from deepfleet.progress import Counted

CHUNK = 4 << 20

# Order-independent digest of a directory tree's file contents and relative paths.
_DIGEST = (
    'cd "$1" 2>/dev/null || { echo missing; exit 0; }; '
    "find . -type f -print0 | sort -z | xargs -0 -r sha256sum | sha256sum | cut -d' ' -f1"
)


def tar_files(files: dict[str, tuple[bytes, int]]) -> bytes:
    """An in-memory tar of {relative path: (content, mode)}."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def put_files(container, directory: str, files: dict[str, tuple[bytes, int]], node: str) -> None:
    exec_text(container, ["mkdir", "-p", directory], node)
    if not container.put_archive(directory, tar_files(files)):
        raise ContainerError(f"could not write files into {directory}", node)


def digest(container, path: str, node: str) -> str:
    return exec_text(container, ["sh", "-c", _DIGEST, "digest", path], node).strip()


def size_of(container, path: str, node: str) -> int:
    """Bytes under `path` in the container (0 when du cannot say): a progress line's total."""
    text = exec_text(container, ["sh", "-c", 'du -sb "$1" | cut -f1', "du", path], node)
    return int(text.strip()) if text.strip().isdigit() else 0


class GrowthWatch:
    """A progress bar fed by how much a directory in a container has grown, sampled every
    `every` seconds from a thread: for downloads whose own progress stays in the node."""

    def __init__(self, container, path: str, node: str, bar, every: float = 2.0):
        self._args = (container, path, node)
        self._bar = bar
        self._every = every
        self._stop = threading.Event()
        self._start = self._size()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _size(self) -> int:
        try:
            return size_of(*self._args)
        except ContainerError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self._bar.update_to(max(0, self._size() - self._start))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._every + 5)
        self._bar.close()


def copy_between(src, dst, path: str, src_node: str, dst_node: str, board=None) -> bool:
    """Make dst's `path` a copy of src's; False when it already was."""
    want = digest(src, path, src_node)
    if want == "missing":
        raise ContainerError(f"{path} does not exist", src_node)
    if digest(dst, path, dst_node) == want:
        return False
    parent = posixpath.dirname(path.rstrip("/"))
    exec_text(dst, ["sh", "-c", 'rm -rf "$1" && mkdir -p "$2"', "rm", path, parent], dst_node)
    bar = board.bar(f"[{dst_node}] {path}", size_of(src, path, src_node)) if board else None
    stream, _ = src.get_archive(path)
    try:
        put_stream(dst, parent, Counted(stream, bar), dst_node)
    finally:
        if bar is not None:
            bar.close()
    return True


def _sha256(path: Path) -> str:
    # In pieces: model weights run to many gigabytes.
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def local_digest(local: Path) -> str:
    """What `_DIGEST` prints for the copy push_local makes of `local`.

    files_under follows symlinks and sorts as `sort -z` does, as the copy has them.
    """
    lines = "".join(f"{_sha256(p)}  ./{rel}\n" for rel, p in files_under(local))
    return hashlib.sha256(lines.encode()).hexdigest()


def write_local_tar(local: Path, out) -> None:
    """A tar of `local`'s files, each a regular member with its (link target's) content and mode.

    The HF cache's snapshot folders are symlinks into ../blobs; a tar of the links
    themselves is refused by the Docker engine ("invalid symlink") and would dangle anyway.
    Written as a stream: a model of many gigabytes is never held in memory or on disk twice.
    """
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for rel, path in files_under(local):
            with path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                info = tarfile.TarInfo(rel)
                info.size, info.mode = st.st_size, stat.S_IMODE(st.st_mode)
                info.mtime = int(st.st_mtime)
                tar.addfile(info, fh)


def tar_chunks(local: Path) -> Iterator[bytes]:
    """write_local_tar's bytes as they are made, through a pipe from a writer thread."""
    read_fd, write_fd = os.pipe()

    def writer() -> None:
        try:
            with os.fdopen(write_fd, "wb") as out:
                write_local_tar(local, out)
        except OSError:  # the reader went away (the upload failed): nothing left to do
            pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with os.fdopen(read_fd, "rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk
    thread.join()


def local_tar(local: Path) -> bytes:
    return b"".join(tar_chunks(local))


def put_stream(container, directory: str, chunks: Iterable[bytes], node: str) -> None:
    """Upload a tar stream into `directory`, each read and write bounded by the stall timeout
    (docker-py's put_archive would wait a fixed 60 s for the engine to unpack it all)."""
    api = container.client.api
    stall = stall_timeout()
    try:
        reply = api._put(
            api._url("/containers/{0}/archive", container.id),
            params={"path": directory}, data=chunks, timeout=stall,
        )  # fmt: skip
        api._raise_for_status(reply)
    except APIError as exc:
        raise ContainerError(f"could not write {directory}: {docker_cause(exc)}", node) from exc
    except (OSError, RequestException, ProtocolError) as exc:
        raise ContainerError(
            f"copying into {directory} made no progress for {stall:.0f} s "
            "(is the machine's disk full? --stall-timeout to wait longer)",
            node,
        ) from exc


def push_local(container, local: Path, target: str, node: str, board=None) -> bool:
    """Make directory `target` in the container hold `local` (a file lands inside it).

    Skipped when the digests already match, so a large model crosses the wire once.
    """
    if not local.exists():
        raise ContainerError(f"{local} does not exist on this machine")
    if digest(container, target, node) == local_digest(local):
        return False
    exec_text(container, ["sh", "-c", 'rm -rf "$1" && mkdir -p "$1"', "rm", target], node)
    total = sum(path.stat().st_size for _, path in files_under(local))
    bar = board.bar(f"[{node}] {target}", total) if board is not None else None
    try:
        put_stream(container, target, Counted(tar_chunks(local), bar), node)
    finally:
        if bar is not None:
            bar.close()
    return True


def fetch_file(container, path: str, node: str) -> bytes:
    stream, _ = container.get_archive(path)
    buf = io.BytesIO(b"".join(stream))
    with tarfile.open(fileobj=buf) as tar:
        member = tar.next()
        if member is None or not member.isfile():
            raise ContainerError(f"{path} is not a file", node)
        return tar.extractfile(member).read()


def files_under(root: Path) -> list[tuple[str, Path]]:
    """(path relative to root, file) for each regular file a copy of `root` holds.

    Symlinks are followed, as the copy dereferences them (the HF cache links every file
    into ../blobs). A link back to a folder above it is skipped, since it would nest
    forever; a broken link is an error, since it cannot be copied. The order is the byte
    order `sort -z` gives, which the digest of the copy depends on.
    """
    if not root.is_dir():
        return [(root.name, root)]
    found: list[tuple[str, Path]] = []
    above: dict[str, frozenset[tuple[int, int]]] = {os.fspath(root): frozenset()}
    for dirpath, dirnames, filenames in os.walk(root, onerror=_unreadable, followlinks=True):
        here = above.pop(dirpath) | {_identity(dirpath)}
        dirnames[:] = [d for d in dirnames if _identity(os.path.join(dirpath, d)) not in here]
        above.update((os.path.join(dirpath, d), here) for d in dirnames)
        for name in filenames:
            path = Path(dirpath, name)
            if _is_regular(path):
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found, key=lambda item: item[0].encode())


def _identity(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    return st.st_dev, st.st_ino


def _unreadable(exc: OSError) -> None:
    raise InputError(f"cannot read {exc.filename}: {exc.strerror}") from exc


def _is_regular(path: Path) -> bool:
    """False for fifos, sockets and devices, which a copy (and `find -type f`) leaves out."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError as exc:
        if path.is_symlink():
            raise InputError(f"{path} is a broken symlink (to {os.readlink(path)})") from exc
        raise InputError(f"{path} vanished while being read") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
