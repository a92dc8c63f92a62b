"""images/versions.env is the only place a version is written.

The Dockerfiles and the shared install scripts are read as text, instruction by instruction:
no version literal may appear in them, every ARG they declare must come from the manifest
(or be one of the two build.py sets itself), and the three flavors must share one layout.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from deepfleet.errors import ImageError
from deepfleet.images.build import LOCAL_BASE, TORCH_LABELS, BuildRequest, build_args, wheel_fits
from deepfleet.images.manifest import images_dir, read_manifest, torch_index

IMAGES = images_dir()
FLAVORS = ("cpu", "cuda", "rocm")
# Build args build.py sets itself rather than reading them from the manifest.
BUILD_PY_ARGS = {"BASE_IMAGE", "TORCH_INDEX_URL"}
PACKAGE_KEYS = (
    "PYTHON_VERSION",
    "TORCH_VERSION",
    "DEEPSPEED_VERSION",
    "TRANSFORMERS_VERSION",
    "TOKENIZERS_VERSION",
    "SAFETENSORS_VERSION",
)
# Version-shaped text: dotted numbers (2.13.0, 3.11, 22.04, 8.6), CUDA/ROCm wheel tags,
# GPU arch names. Any of them in a Dockerfile or shared script is a second copy of a version.
VERSION_PATTERNS = (
    re.compile(r"\d+\.\d+"),
    re.compile(r"\bcu\d{3}\b"),
    re.compile(r"\brocm-?\d"),
    re.compile(r"\bgfx\d"),
    re.compile(r"\bsm_\d"),
)
VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|\$([A-Za-z_][A-Za-z0-9_]*)")
COMMON_FILES = sorted(p.name for p in (IMAGES / "common").iterdir() if p.is_file())


def var_refs(text: str) -> list[str]:
    return [braced or bare for braced, bare in VAR_REF.findall(text)]


@pytest.fixture(scope="module")
def manifest() -> dict[str, str]:
    return read_manifest()


def dockerfile_text(flavor: str) -> str:
    return (IMAGES / f"Dockerfile.{flavor}").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    if pending:
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
    return out


def version_literals(text: str, manifest: dict[str, str]) -> list[str]:
    """Every version written into text: version-shaped words and the manifest's own values."""
    found = [m.group(0) for pattern in VERSION_PATTERNS for m in pattern.finditer(text)]
    # a manifest value with a number in it is a version (TORCH_INDEX_CPU's URL is not)
    found += [v for v in manifest.values() if re.search(r"\d", v) and v in text]
    return sorted(set(found))


def dockerfile_problems(text: str, manifest: dict[str, str]) -> list[str]:
    """Why a Dockerfile does not take its versions from the manifest ([] when it does)."""
    problems = [f"version literal {lit!r}" for lit in version_literals(text, manifest)]
    declared: set[str] = set()
    env: set[str] = set()
    before_from = True
    base_default = None
    for word, args in instructions(text):
        if word == "FROM":
            if args != "${BASE_IMAGE}":
                problems.append(f"FROM {args}: the base must come from the BASE_IMAGE arg")
            before_from = False
            declared = set()
            continue
        if before_from and word != "ARG":
            problems.append(f"{word} before FROM")
        if word == "ARG":
            name, eq, default = args.partition("=")
            if name not in manifest and name not in BUILD_PY_ARGS:
                problems.append(f"ARG {name} is neither in the manifest nor set by build.py")
            for ref in var_refs(default):
                if ref not in declared:
                    problems.append(f"ARG {name} uses {ref}, which no earlier ARG declares")
            if name == "BASE_IMAGE" and before_from:
                base_default = default if eq else None
            declared.add(name)
        if word == "ENV":
            env.update(item.split("=", 1)[0] for item in shlex.split(args))
        if word == "RUN":
            for ref in var_refs(args):
                if ref not in declared and ref not in env:
                    problems.append(f"RUN uses {ref}, which no ARG or ENV declares")
    if not base_default:
        problems.append("no ARG BASE_IMAGE with a default before FROM")
    return problems


def default_base(text: str, manifest: dict[str, str]) -> str:
    """The image FROM resolves to when build.py passes the manifest and no BASE_IMAGE."""
    for word, args in instructions(text):
        if word == "FROM":
            break
        name, _, default = args.partition("=")
        if name == "BASE_IMAGE":
            return VAR_REF.sub(lambda m: manifest[m.group(1) or m.group(2)], default)
    raise AssertionError("no BASE_IMAGE default")


# Variables only one toolchain has (the cuda image points its own and torch's builders at
# the toolkit, which may come from wheels rather than the base).
FLAVOR_ONLY_ENV = {"cuda": {"CUDA_HOME"}}


def layout(text: str, flavor: str) -> dict[str, object]:
    """What must be the same in every flavor's Dockerfile, the flavor's name masked."""
    body = instructions(text)
    body = body[next(i for i, (word, _) in enumerate(body) if word == "FROM") + 1 :]
    env = {}
    for word, args in body:
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return {
        "order": [word for word, _ in body if word != "ARG"],
        "COPY": [args for word, args in body if word == "COPY"],
        "RUN": [
            args.replace(f"FLAVOR={flavor} ", "FLAVOR=* ") for word, args in body if word == "RUN"
        ],
        "ENV": sorted(set(env) - FLAVOR_ONLY_ENV.get(flavor, set())),
        "flavor": env.get("DEEPFLEET_FLAVOR") == flavor,
        "rest": [(w, a) for w, a in body if w in ("WORKDIR", "EXPOSE", "ENTRYPOINT", "CMD")],
    }


# --- the manifest itself -------------------------------------------------------------


def test_manifest_holds_every_version(manifest):
    for key in (
        *PACKAGE_KEYS,
        "UBUNTU_VERSION",
        "CUDA_VERSION",
        "ROCM_VERSION",
        "TORCH_INDEX_CPU",
        "TORCH_INDEX_CUDA",
        "TORCH_INDEX_ROCM",
        "TORCH_CUDA_ARCH_LIST",
        "PYTORCH_ROCM_ARCH",
    ):
        assert manifest.get(key), key


# The CUDA release of PyPI's own Linux torch wheels (its METADATA requires cuda-toolkit 13.0).
PYPI_TORCH_CUDA = {"2.13": "13.0"}


def test_gpu_torch_indexes_match_the_base_toolkits(manifest):
    # DeepSpeed refuses to compile ops when nvcc's major.minor differs from torch's CUDA.
    cuda_major, cuda_minor = manifest["CUDA_VERSION"].split(".")[:2]
    index = manifest["TORCH_INDEX_CUDA"].rstrip("/")
    if index.startswith("https://pypi.org/"):
        # PyPI carries one CUDA build per torch release (its wheels name no +cuXY label);
        # a torch bump must re-check it here.
        torch_minor = ".".join(manifest["TORCH_VERSION"].split(".")[:2])
        assert PYPI_TORCH_CUDA[torch_minor] == f"{cuda_major}.{cuda_minor}"
    else:
        assert index.endswith(f"/cu{cuda_major}{cuda_minor}")
    rocm_major, rocm_minor = manifest["ROCM_VERSION"].split(".")[:2]
    assert manifest["TORCH_INDEX_ROCM"].rstrip("/").endswith(f"/rocm{rocm_major}.{rocm_minor}")
    assert manifest["TORCH_INDEX_CPU"].rstrip("/").endswith("/cpu")


# --- Dockerfiles and shared scripts --------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_dockerfile_takes_its_versions_from_the_manifest(flavor, manifest):
    assert dockerfile_problems(dockerfile_text(flavor), manifest) == []


@pytest.mark.parametrize("flavor", FLAVORS)
def test_dockerfile_declares_every_package_version(flavor):
    declared = {
        args.partition("=")[0] for w, args in instructions(dockerfile_text(flavor)) if w == "ARG"
    }
    assert set(PACKAGE_KEYS) <= declared
    arch = {"cuda": "TORCH_CUDA_ARCH_LIST", "rocm": "PYTORCH_ROCM_ARCH"}.get(flavor)
    assert arch is None or arch in declared


def test_every_version_key_reaches_a_dockerfile(manifest):
    declared = {
        args.partition("=")[0]
        for flavor in (*FLAVORS, "relay")
        for word, args in instructions(dockerfile_text(flavor))
        if word == "ARG"
    }
    assert {k for k in manifest if k.endswith("_VERSION")} <= declared


def test_the_relay_image_takes_its_busybox_from_the_manifest(manifest):
    text = dockerfile_text("relay")
    assert "ARG BUSYBOX_VERSION" in text and '"busybox-static=${BUSYBOX_VERSION}"' in text
    assert version_literals(text, manifest) == []


@pytest.mark.parametrize("path", COMMON_FILES)
def test_shared_file_names_no_version(path, manifest):
    text = (IMAGES / "common" / path).read_text()
    assert version_literals(text, manifest) == []
    for ref in var_refs(text):
        assert not ref.endswith("_VERSION") or ref in manifest, ref


def test_install_scripts_use_the_manifest_python():
    for script in ("install-system.sh", "install-python.sh"):
        text = (IMAGES / "common" / script).read_text()
        assert "python${PYTHON_VERSION}" in text, script
        assert '"${PYTHON_VERSION:?}"' in text, script


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
@pytest.mark.parametrize("script", sorted(p.name for p in (IMAGES / "common").glob("*.sh")))
def test_shared_shell_parses(script):
    result = subprocess.run(["sh", "-n", str(IMAGES / "common" / script)], capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


def test_default_bases_follow_the_manifest(manifest):
    assert default_base(dockerfile_text("cpu"), manifest) == "debian:bookworm-slim"
    cuda = default_base(dockerfile_text("cuda"), manifest)
    assert cuda.startswith("nvidia/cuda:") and "-devel-" in cuda
    assert manifest["CUDA_VERSION"] in cuda and f"ubuntu{manifest['UBUNTU_VERSION']}" in cuda
    rocm = default_base(dockerfile_text("rocm"), manifest)
    assert rocm.startswith(
        f"rocm/dev-ubuntu-{manifest['UBUNTU_VERSION']}:{manifest['ROCM_VERSION']}"
    )


def test_flavors_share_one_layout():
    layouts = {flavor: layout(dockerfile_text(flavor), flavor) for flavor in FLAVORS}
    assert layouts["cpu"]["flavor"]
    assert layouts["cuda"] == layouts["cpu"]
    assert layouts["rocm"] == layouts["cpu"]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_labels_say_what_the_image_carries(flavor):
    from deepfleet.images.delivery import CUDA_LABEL

    labels = " ".join(
        args for word, args in instructions(dockerfile_text(flavor)) if word == "LABEL"
    )
    assert f"ai.deepfleet.flavor={flavor}" in labels
    assert "ai.deepfleet.torch=${TORCH_VERSION}" in labels
    # `up` and doctor read this label to refuse too old a driver before shipping the image
    assert (f"{CUDA_LABEL}=${{CUDA_VERSION}}" in labels) == (flavor == "cuda")


def test_every_shared_file_is_copied():
    copied = {args.split()[0] for args in layout(dockerfile_text("cpu"), "cpu")["COPY"]}
    assert {f"common/{name}" for name in COMMON_FILES} <= copied
    assert "node/" in copied


# --- the checkers catch what they are for --------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        (
            "ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION}",
            "ARG BASE_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu22.04",
            "version literal '13.0'",
        ),
        ("ARG TORCH_VERSION\n", "ARG TORCH_VERSION=2.13.0\n", "version literal '2.13'"),
        ("ARG TORCH_VERSION\n", "ARG CUDNN_VERSION\n", "ARG CUDNN_VERSION is neither"),
        ("FROM ${BASE_IMAGE}", "FROM nvidia/cuda:${CUDA_VERSION}", "must come from the BASE_IMAGE"),
        (
            "ARG TORCH_INDEX_URL=${TORCH_INDEX_CUDA}",
            "ARG TORCH_INDEX_URL=${CUDA_INDEX}",
            "CUDA_INDEX",
        ),
        (
            "ARG TORCH_INDEX_URL=${TORCH_INDEX_CUDA}",
            "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128",
            "version literal 'cu128'",
        ),
        (
            "RUN FLAVOR=cuda sh",
            "RUN pip install torch==$TORCH_VERSIN && FLAVOR=cuda sh",
            "TORCH_VERSIN",
        ),
        ("RUN FLAVOR=cuda sh", "RUN FLAVOR=cuda PYTHON=python3.10 sh", "version literal '3.10'"),
    ],
)
def test_checker_catches_a_bad_dockerfile(old, new, complaint, manifest):
    good = dockerfile_text("cuda")
    assert old in good
    problems = dockerfile_problems(good.replace(old, new, 1), manifest)
    assert any(complaint in problem for problem in problems), problems


def test_checker_catches_a_version_in_a_script(manifest):
    assert version_literals("apt-get install -y python3.11-venv\n", manifest) == ["3.11"]
    assert version_literals("pip install --index-url $URL torch\n", manifest) == []
    assert version_literals('export PYTORCH_ROCM_ARCH="gfx942"\n', manifest) == ["gfx9"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("COPY node/ /opt/deepfleet/node/\n", ""),
        ("ENV DEEPFLEET_FLAVOR=cuda", "ENV DEEPFLEET_FLAVOR=cpu"),
        ("    HF_HOME=/workspace/hf-cache \\\n", ""),
        ('CMD ["sshd"]', 'CMD ["bash"]'),
        ("RUN FLAVOR=cuda sh", "RUN FLAVOR=cuda DS_BUILD_OPS=1 sh"),
    ],
)
def test_layout_check_catches_drift(old, new):
    good = dockerfile_text("cuda")
    assert old in good
    assert layout(good.replace(old, new, 1), "cuda") != layout(dockerfile_text("cpu"), "cpu")


# --- build.py hands the manifest over ------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_build_args_pass_every_manifest_key(flavor, manifest):
    args = build_args(BuildRequest(flavor=flavor), manifest)
    assert {k: args[k] for k in manifest} == manifest
    extra = dict(manifest, NEW_TOOL_VERSION="1")
    assert build_args(BuildRequest(flavor=flavor), extra)["NEW_TOOL_VERSION"] == "1"


def test_torch_index_per_flavor(manifest):
    assert build_args(BuildRequest(flavor="cpu"), manifest)["TORCH_INDEX_URL"] == ""
    assert (
        build_args(BuildRequest(flavor="cuda"), manifest)["TORCH_INDEX_URL"]
        == manifest["TORCH_INDEX_CUDA"]
    )
    assert (
        build_args(BuildRequest(flavor="rocm"), manifest)["TORCH_INDEX_URL"]
        == manifest["TORCH_INDEX_ROCM"]
    )
    mirror = "https://mirror.example/whl"
    for flavor in FLAVORS:
        req = BuildRequest(flavor=flavor, torch_index_url=mirror)
        assert build_args(req, manifest)["TORCH_INDEX_URL"] == mirror


def test_missing_torch_index_is_an_image_error(manifest):
    lacking = {k: v for k, v in manifest.items() if k != "TORCH_INDEX_ROCM"}
    with pytest.raises(ImageError, match="TORCH_INDEX_ROCM"):
        build_args(BuildRequest(flavor="rocm"), lacking)
    assert torch_index(manifest, "cuda") == manifest["TORCH_INDEX_CUDA"]


def test_local_base_is_for_cpu_and_cuda(manifest):
    # cuda takes its toolkit from NVIDIA's wheels there; ROCm's compiler is in no wheel
    for flavor in ("cpu", "cuda"):
        assert build_args(BuildRequest(flavor=flavor), manifest)["BASE_IMAGE"] == LOCAL_BASE
    assert "BASE_IMAGE" not in build_args(BuildRequest(flavor="rocm"), manifest)
    for flavor in ("cuda", "rocm"):
        # 'vendor': the Dockerfile's manifest-built default applies
        req = BuildRequest(flavor=flavor, base_image="vendor")
        assert "BASE_IMAGE" not in build_args(req, manifest)
        req = BuildRequest(flavor=flavor, base_image="mirror.local/base:1")
        assert build_args(req, manifest)["BASE_IMAGE"] == "mirror.local/base:1"


def test_gpu_builds_leave_out_other_flavors_torch_wheels():
    cpu_wheel = Path("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    cuda_wheel = Path("torch-2.13.0+cu126-cp311-cp311-manylinux_2_28_x86_64.whl")
    rocm_wheel = Path("torch-2.13.0+rocm7.2-cp311-cp311-manylinux_2_28_x86_64.whl")
    other = Path("ninja-1.13.0-py3-none-manylinux_2_12_x86_64.whl")
    assert set(TORCH_LABELS) == set(FLAVORS)
    assert [wheel_fits(w, "cpu") for w in (cpu_wheel, cuda_wheel, rocm_wheel, other)] == [
        True,
        False,
        False,
        True,
    ]
    assert [wheel_fits(w, "cuda") for w in (cpu_wheel, cuda_wheel, rocm_wheel)] == [
        False,
        True,
        False,
    ]
    assert [wheel_fits(w, "rocm") for w in (cpu_wheel, cuda_wheel, rocm_wheel)] == [
        False,
        False,
        True,
    ]


def test_the_operators_http_stack_is_the_images():
    """The gateway (pyproject) and the replicas (the manifest) run one FastAPI and uvicorn:
    one version of each to read release notes and CVEs for."""
    import tomllib

    pyproject = tomllib.loads((images_dir().parent / "pyproject.toml").read_text())
    pins = dict(d.split("==") for d in pyproject["project"]["dependencies"] if "==" in d)
    manifest = read_manifest()
    assert pins["fastapi"] == manifest["FASTAPI_VERSION"]
    assert pins["uvicorn"] == manifest["UVICORN_VERSION"]
