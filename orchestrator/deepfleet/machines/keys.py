"""Keys: the per-cluster SSH keypair the DeepSpeed launcher uses between containers.

Made with `cryptography` (paramiko's own dependency) so the operator needs no ssh-keygen;
written 0600 before any byte of the private key lands on disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True)
class KeyPair:
    private_openssh: bytes
    public_openssh: str  # "ssh-ed25519 AAAA... comment"


def generate(comment: str) -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return KeyPair(private, f"{public.decode()} {comment}")


def write_private(path: Path, key: KeyPair) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_openssh)
    path.with_name(path.name + ".pub").write_text(key.public_openssh + "\n")


def read(path: Path) -> KeyPair:
    return KeyPair(path.read_bytes(), path.with_name(path.name + ".pub").read_text().strip())


def known_hosts_line(address: str, port: int, host_key: str) -> str:
    """OpenSSH's known_hosts form; a non-22 port is written [addr]:port."""
    kind, blob = host_key.split()[:2]
    host = address if port == 22 else f"[{address}]:{port}"
    return f"{host} {kind} {blob}"
