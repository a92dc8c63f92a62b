"""Transfer: files between the operator and node containers, and between containers.

Everything moves as tar streams through the Docker API of each node (over its SSH
connection), so nodes need no extra ports or credentials. A directory is copied only when
its content digest differs on the target.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
import time
from pathlib import Path

from .containers import exec_text
from .errors import ContainerError

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


def copy_between(src, dst, path: str, src_node: str, dst_node: str) -> bool:
    """Make dst's `path` a copy of src's; False when it already was."""
    want = digest(src, path, src_node)
    if want == "missing":
        raise ContainerError(f"{path} does not exist", src_node)
    if digest(dst, path, dst_node) == want:
        return False
    parent = posixpath.dirname(path.rstrip("/"))
    exec_text(dst, ["sh", "-c", 'rm -rf "$1" && mkdir -p "$2"', "rm", path, parent], dst_node)
    stream, _ = src.get_archive(path)
    if not dst.put_archive(parent, stream):
        raise ContainerError(f"could not write {path}", dst_node)
    return True


def _local_files(local: Path) -> list[tuple[str, Path]]:
    """(path relative to the target directory, file), in the byte order `sort -z` gives."""
    if local.is_file():
        return [(local.name, local)]
    files = [(str(p.relative_to(local)), p) for p in local.rglob("*") if p.is_file()]
    return sorted(files, key=lambda item: item[0].encode())


def local_digest(local: Path) -> str:
    lines = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{rel}\n" for rel, p in _local_files(local)
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def push_local(container, local: Path, target: str, node: str) -> bool:
    """Make directory `target` in the container hold `local` (a file lands inside it).

    Skipped when the digests already match, so a large model crosses the wire once.
    """
    if not local.exists():
        raise ContainerError(f"{local} does not exist on this machine")
    if digest(container, target, node) == local_digest(local):
        return False
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel, path in _local_files(local):
            tar.add(str(path), arcname=rel)
    exec_text(container, ["sh", "-c", 'rm -rf "$1" && mkdir -p "$1"', "rm", target], node)
    if not container.put_archive(target, buf.getvalue()):
        raise ContainerError(f"could not write {target}", node)
    return True


def fetch_file(container, path: str, node: str) -> bytes:
    stream, _ = container.get_archive(path)
    buf = io.BytesIO(b"".join(stream))
    with tarfile.open(fileobj=buf) as tar:
        member = tar.next()
        if member is None or not member.isfile():
            raise ContainerError(f"{path} is not a file", node)
        return tar.extractfile(member).read()
