"""The one version manifest (images/versions.env) shared by every image flavor."""

from __future__ import annotations

from pathlib import Path

from deepfleet.errors import ImageError


def images_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "images"


def read_manifest(path: Path | None = None) -> dict[str, str]:
    path = path or images_dir() / "versions.env"
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ImageError(f"cannot read version manifest {path}: {exc.strerror}") from exc
    values: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ImageError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        values[key.strip()] = value.strip()
    return values


def torch_index(values: dict[str, str], flavor: str) -> str:
    """The manifest's torch wheel index for a flavor (TORCH_INDEX_CUDA, ...)."""
    key = f"TORCH_INDEX_{flavor.upper()}"
    if key not in values:
        raise ImageError(f"the version manifest has no {key}")
    return values[key]
