"""The record of node images pushed to registries, by digest.

Two files, one schema (schemas/published.schema.json): images/published.json, which the
release workflow writes for the images it publishes, and this machine's own record of
`deepfleet push-image` ($DEEPFLEET_PUBLISHED, default ~/.config/deepfleet/published.json),
read first. `up` reads them for two things: `--image published` (the newest image of a
flavor whose versions are the manifest's), and the fallback when a machine cannot reach the
registry (the digest's image ID tells which local image to stream in its place).
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path

import jsonschema

from deepfleet.errors import ImageError
from deepfleet.images.manifest import images_dir

PUBLISHED = "published"  # `up --image published`


def released_path() -> Path:
    return images_dir() / "published.json"


def own_path() -> Path:
    if os.environ.get("DEEPFLEET_PUBLISHED"):
        return Path(os.environ["DEEPFLEET_PUBLISHED"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "deepfleet" / "published.json"


def _schema() -> dict:
    text = resources.files("deepfleet").joinpath("schemas/published.schema.json").read_text()
    return json.loads(text)


def read(path: Path) -> list[dict]:
    """The records in one file; [] when it does not exist."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: not a published-images record ({exc})") from None
    try:
        jsonschema.validate(data, _schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "top level"
        raise ImageError(f"{path}: {where}: {exc.message}") from None
    return data["images"]


def records() -> list[dict]:
    """This machine's pushes, newest first, then the released images."""
    return [*reversed(read(own_path())), *reversed(read(released_path()))]


def lookup(ref: str) -> dict | None:
    return next((r for r in records() if r["ref"] == ref), None)


def record(entry: dict, path: Path | None = None) -> Path:
    """Add (or move to the end, as the newest) one pushed image in this machine's record."""
    path = path or own_path()
    jsonschema.validate({"images": [entry]}, _schema())
    kept = [r for r in read(path) if r["ref"] != entry["ref"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    with os.fdopen(fd, "w") as fh:
        json.dump({"images": [*kept, entry]}, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def newest(flavor: str, manifest: dict[str, str]) -> dict:
    """The newest published image of a flavor built from this manifest's versions."""
    for entry in records():
        versions = entry["versions"]
        if entry["flavor"] == flavor and all(manifest.get(k) == v for k, v in versions.items()):
            return entry
    raise ImageError(
        f"no published {flavor} image matches images/versions.env "
        f"(none in {own_path()} or {released_path()}): build it (`make images`) "
        f"or push one (`deepfleet push-image REGISTRY`)"
    )
