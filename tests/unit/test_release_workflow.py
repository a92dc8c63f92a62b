"""The release workflow builds every flavor with deepfleet's own build, which takes its
versions from images/versions.env, and writes no version of its own anywhere."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from deepfleet.images.build import FLAVORS
from deepfleet.images.manifest import read_manifest

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "release.yml"


def _steps(job: str) -> list[dict]:
    return yaml.safe_load(WORKFLOW.read_text())["jobs"][job]["steps"]


def test_every_flavor_is_built_and_pushed_by_deepfleet():
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    assert set(jobs["image"]["strategy"]["matrix"]["flavor"]) == set(FLAVORS)
    runs = [s.get("run", "") for s in _steps("image")]
    builds = [r for r in runs if "build-image" in r]
    pushes = [r for r in runs if "push-image" in r]
    assert builds == ["deepfleet build-image --flavor ${{ matrix.flavor }} --base-image vendor "
                      '--wheelhouse "" --ca-dir ""']  # fmt: skip
    assert len(pushes) == 1 and "--flavor ${{ matrix.flavor }}" in pushes[0]
    # no other way to make or send an image: the manifest's build args are the only ones
    for run in runs:
        assert not re.search(r"docker (build|push|buildx)|skopeo copy|--build-arg", run), run


def test_no_version_is_written_into_the_workflow():
    text = WORKFLOW.read_text()
    manifest = read_manifest()
    for key, value in manifest.items():
        if key.endswith("_VERSION") and key != "PYTHON_VERSION":
            assert value not in text, f"{key}={value} is written in the workflow"
    # the runner's Python is the manifest's, so the CLI it runs reads the same manifest
    assert f'python-version: "{manifest["PYTHON_VERSION"]}"' in text


def test_the_record_it_commits_is_the_file_the_cli_reads():
    from deepfleet.images import published

    text = WORKFLOW.read_text()
    assert "DEEPFLEET_PUBLISHED: published-${{ matrix.flavor }}.json" in text
    assert published.released_path().relative_to(WORKFLOW.parents[2]).as_posix() in text
