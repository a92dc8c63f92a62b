"""The node image itself, checked from inside it: every flavor (cpu, cuda, rocm) must carry
the manifest's versions, a torch built for its flavor, the same node tools, and a detect
that reads vendor tools by structure and never hangs. Runs where DEEPFLEET_FLAVOR is set
(the images set it); scripts/test.sh mounts the manifest at /manifest/versions.env.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

FLAVOR = os.environ.get("DEEPFLEET_FLAVOR")
MANIFEST = Path(os.environ.get("DEEPFLEET_MANIFEST", "/manifest/versions.env"))
FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "detect"

pytestmark = pytest.mark.skipif(not FLAVOR, reason="runs inside a deepfleet node image")


@pytest.fixture(scope="module")
def manifest() -> dict[str, str]:
    if not MANIFEST.is_file():
        pytest.skip(f"manifest not mounted at {MANIFEST}")
    pairs = (
        line.split("=", 1)
        for line in MANIFEST.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


def detect(env: dict[str, str] | None = None, timeout: float = 120) -> dict:
    out = subprocess.run(
        ["detect", "--json"],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    report = json.loads(out.stdout)
    from deepfleet_node.detect import validate_report

    assert validate_report(report) == []
    return report


def fake_tool(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture(scope="module")
def report() -> dict:
    return detect()


def test_versions_are_the_manifests(report, manifest):
    import accelerate
    import fastapi
    import safetensors
    import tokenizers
    import uvicorn

    versions = report["versions"]
    assert versions["torch"].split("+")[0] == manifest["TORCH_VERSION"]
    assert versions["deepspeed"] == manifest["DEEPSPEED_VERSION"]
    assert versions["transformers"] == manifest["TRANSFORMERS_VERSION"]
    assert versions["python"].rsplit(".", 1)[0] == manifest["PYTHON_VERSION"]
    assert tokenizers.__version__ == manifest["TOKENIZERS_VERSION"]
    assert safetensors.__version__ == manifest["SAFETENSORS_VERSION"]
    assert accelerate.__version__ == manifest["ACCELERATE_VERSION"]
    assert fastapi.__version__ == manifest["FASTAPI_VERSION"]
    assert uvicorn.__version__ == manifest["UVICORN_VERSION"]


def test_torch_is_built_for_the_flavor(report, manifest):
    import torch

    versions, archs = report["versions"], report["torch_arch_list"]
    assert versions["cuda"] == torch.version.cuda and versions["hip"] == torch.version.hip
    if FLAVOR == "cuda":
        want = ".".join(manifest["CUDA_VERSION"].split(".")[:2])
        assert torch.version.cuda == want
        assert archs and all(a.startswith(("sm_", "compute_")) for a in archs), archs
    elif FLAVOR == "rocm":
        assert torch.version.hip and all(a.startswith("gfx") for a in archs), archs
    else:
        assert torch.version.cuda is None and torch.version.hip is None and archs == []


@pytest.mark.skipif(FLAVOR != "cuda", reason="the CUDA toolkit is in the cuda image only")
def test_nvcc_matches_torch_and_fused_adam_is_compiled_in():
    import torch

    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True)
    assert f"release {torch.version.cuda}," in nvcc.stdout
    # DeepSpeed picks its cpu accelerator where no GPU answers; the ranks on a GPU node
    # take the cuda one, whose op was compiled into the package for the manifest's archs.
    code = (
        "from deepspeed.git_version_info import installed_ops\n"
        "from deepspeed.ops.op_builder import FusedAdamBuilder\n"
        "assert installed_ops['fused_adam'], installed_ops\n"
        "FusedAdamBuilder().load()\n"
        "print('fused_adam loaded')\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cuda"}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "fused_adam loaded" in run.stdout, run.stderr[-2000:]


def test_no_gpu_here_is_reported_as_such(report):
    assert report["gpus"] == [] and report["gpu_vendor"] == "none"
    expected = {"cpu": "cpu", "cuda": "cuda", "rocm": "rocm"}[FLAVOR]
    assert report["accelerator"] == expected  # what torch is built for; the plan falls to cpu


def test_every_flavor_carries_the_same_node_tools():
    for tool in ("sshd", "ssh", "pdsh", "tini", "deepspeed", "detect", "g++"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), tool
    assert os.access("/usr/local/bin/deepfleet-entrypoint", os.X_OK)
    assert Path("/etc/ssh/sshd_config.d/deepfleet.conf").is_file()
    assert not list(Path("/etc/ssh").glob("ssh_host_*")), "host keys must be made per container"
    for module in ("train", "infer", "serve", "tiny", "data", "modelinfo"):
        assert (
            subprocess.run(
                [sys.executable, "-m", f"deepfleet_node.{module}", "--help"],
                capture_output=True,
                timeout=120,
            ).returncode
            == 0
        ), module


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="tests/unit/fixtures not mounted")
def test_detect_reads_nvidia_smi_on_path(tmp_path):
    fake_tool(
        tmp_path,
        "nvidia-smi",
        f'case "$*" in\n'
        f'  *--query-gpu*) cat "{FIXTURES}/nvidia-smi-query-4gpu-mixed.csv" ;;\n'
        f'  *"-q -x"*) cat "{FIXTURES}/nvidia-smi-q-x-4gpu-mixed.xml" ;;\n'
        f"  *) exit 9 ;;\n"
        f"esac\n",
    )
    path = f"{tmp_path}:{os.environ['PATH']}"
    every = detect({"PATH": path})
    assert every["gpu_vendor"] == "nvidia" and len(every["gpus"]) == 4
    assert all(g["driver"] and g["runtime"] and g["compute_capability"] for g in every["gpus"])
    two = detect({"PATH": path, "CUDA_VISIBLE_DEVICES": "1,3"})
    assert [(g["index"], g["physical_index"]) for g in two["gpus"]] == [(0, 1), (1, 3)]
    if FLAVOR == "cuda":  # the real torch sees none of the four: the report says so
        assert any(e["tool"] == "torch" for e in every["errors"] + two["errors"])


def test_a_hanging_tool_gives_an_error_not_a_hang(tmp_path):
    fake_tool(tmp_path, "nvidia-smi", "sleep 300\n")
    started = time.monotonic()
    report = detect({"PATH": f"{tmp_path}:{os.environ['PATH']}", "DEEPFLEET_DETECT_TIMEOUT": "2"})
    assert time.monotonic() - started < 60
    assert any(e["tool"] == "nvidia-smi" and "timed out" in e["error"] for e in report["errors"])
    assert report["gpus"] == []
