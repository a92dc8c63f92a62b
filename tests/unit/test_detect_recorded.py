"""detect against every output recorded on real machines (../shared/gpu-tool-outputs).

EXPECTED says, for every recording, what it must yield: its GPUs (counted again here from
the raw text, so a parser that drops or invents one fails), the error detect reports for
it, or which parser refuses it and why. A recording with no entry fails: add one.

The recordings are third-party text, read in place through sharedata (absent: skip
locally, fail under CI). The tests of one tool family's recordings in depth sit beside its
parsers' (test_detect_nvidia.py, _amd, _clinfo).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest
from detectdata import collect
from unitdata import RECORDED_DIR, detect, recorded, sharedata

MiB = 1024**2
KiB = 1024


@pytest.fixture(autouse=True)
def _recordings_present():
    sharedata.require(RECORDED_DIR)


# ---------------------------------------------------------------- the recordings' GPUs, raw


def _json_value(text: str):
    start = re.search(r"^[ \t]*[\[{]", text, re.MULTILINE)  # after any 'WARNING:' lines
    return json.loads(text[start.start() :])


def _nonblank(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _clinfo_devices(text: str) -> int:
    # clinfo and rocm-clinfo state it per platform ('Number of devices  1'); -l lists them.
    stated = re.findall(r"^Number of devices:?\s+(\d+)\s*$", text, re.MULTILINE)
    if stated:
        return sum(map(int, stated))
    return len(re.findall(r"Device #\d+:", text))


# Per parser: how many GPUs (clinfo: devices) the raw recording itself shows, counted
# without the parser, and the GPU list out of the parser's result.
RAW_COUNT = {
    "parse_nvidia_smi_csv": lambda t, headed: len(_nonblank(t)) - (1 if headed else 0),
    "parse_nvidia_smi_xml": lambda t, _: len(ET.fromstring(t).findall("gpu")),
    "parse_nvidia_smi_list": lambda t, _: len(re.findall(r"^GPU \d+:", t, re.MULTILINE)),
    "parse_rocm_smi_json": lambda t, _: sum(
        re.fullmatch(r"card\d+", k) is not None for k in _json_value(t)
    ),
    "parse_rocm_smi_csv": lambda t, _: sum(line.startswith("card") for line in t.splitlines()),
    "parse_rocm_smi_text": lambda t, _: len(set(re.findall(r"^GPU\[(\d+)\]", t, re.MULTILINE))),
    "parse_amd_smi_static_json": lambda t, _: sum("gpu" in e for e in _json_value(t)),
    "parse_amd_smi_static_text": lambda t, _: len(re.findall(r"^GPU: \d+\s*$", t, re.MULTILINE)),
    "parse_rocminfo": lambda t, _: len(re.findall(r"^\s*Device Type:\s*GPU\s*$", t, re.MULTILINE)),
    "parse_clinfo": lambda t, _: _clinfo_devices(t),
}

GPU_LIST = {
    "parse_nvidia_smi_xml": lambda r: r["gpus"],
    "parse_rocm_smi_json": lambda r: r["gpus"],
    "parse_rocm_smi_csv": lambda r: r["gpus"],
    "parse_rocm_smi_text": lambda r: r["gpus"],
    "parse_rocminfo": detect.rocminfo_gpus,
}


def gpus_of(parser: str, result) -> list[dict]:
    return GPU_LIST.get(parser, lambda r: r)(result)


# ---------------------------------------------------------------- what each must yield


@dataclass(frozen=True)
class Gpus:
    """``parser`` reads it: ``count`` GPUs (clinfo: devices), as many as the raw text shows;
    ``names``/``memory`` per GPU in order (one value: every GPU); ``mig``: MIG devices per
    GPU. With ``tool``, it is that command's output: collect() reports ``report`` GPUs
    (default ``count``) of ``vendor``."""

    parser: str
    count: int
    names: tuple | str | None = None
    memory: tuple | int | None = None
    mig: tuple | None = None
    args: tuple = ()
    tool: str | None = None
    vendor: str | None = None
    report: int | None = None
    bug: str | None = None  # a known parser bug: the entry is xfail (strict) until fixed


@dataclass(frozen=True)
class Refused:
    """A format detect does not read: ``parser`` (the reader of that tool's other formats)
    raises ValueError containing ``fragment``."""

    parser: str
    fragment: str


@dataclass(frozen=True)
class ToolError:
    """A tool's failure: as ``tool``'s output (exit codes ``rcs``) the report lists no GPU
    and an error for ``tool`` containing ``fragment`` (a line of the recording)."""

    tool: str
    fragment: str
    rcs: tuple = (0, 1)


@dataclass(frozen=True)
class Fields:
    """``parser`` reads these key/value pairs from it (no GPUs)."""

    parser: str
    fields: dict


@dataclass(frozen=True)
class NotInventory:
    """Output of a tool detect never runs (docker, lspci, the container toolkit): it is
    here for other readers (hostprobe, doctor); no detect parser may find a GPU in it."""

    reader: str


QUERY = "nvidia-smi --query-gpu"
NV_TABLE = Refused("parse_nvidia_smi_csv", "CSV has no header")  # bare nvidia-smi's table
ROCM_TABLE = Refused("parse_rocm_smi_text", "no 'GPU[n] : key: value' lines")
A100_40 = "NVIDIA A100-SXM4-40GB"
NAVI31 = "Navi 31 [Radeon RX 7900 XT/7900 XTX/7900M]"
NOT_DETECT = "hostprobe/doctor (docker, lspci, container toolkit)"

EXPECTED: dict[str, Gpus | Refused | ToolError | Fields | NotInventory] = {
    # ------------------------------------------------------------ nvidia
    "nvidia/L-8x-a100-sxm4-40gb-mixed-mig-k8s-pod.txt": Gpus(
        "parse_nvidia_smi_list", 8, A100_40, mig=(0, 0, 0, 0, 7, 3, 2, 4)
    ),
    "nvidia/L-a100-sxm4-80gb-7x-mig-1g10gb-container.txt": Gpus(
        "parse_nvidia_smi_list", 1, "NVIDIA A100-SXM4-80GB", mig=(7,)
    ),
    "nvidia/L-mixed-titanv-rtx5880ada.txt": Gpus(
        "parse_nvidia_smi_list", 2, ("NVIDIA TITAN V", "NVIDIA RTX 5880 Ada Generation")
    ),
    "nvidia/L-rtx4070-laptop-single.txt": Gpus(
        "parse_nvidia_smi_list", 1, "NVIDIA GeForce RTX 4070 Laptop GPU"
    ),
    "nvidia/error-couldnt-communicate-with-driver.txt": ToolError(
        "nvidia-smi", "NVIDIA-SMI has failed because it couldn't communicate", rcs=(9,)
    ),
    "nvidia/error-driver-library-mismatch.txt": ToolError(
        "nvidia-smi", "Failed to initialize NVML: Driver/library version mismatch", rcs=(9,)
    ),
    "nvidia/error-no-devices-were-found.txt": ToolError(
        "nvidia-smi", "No devices were found", rcs=(6,)
    ),
    "nvidia/error-nvml-unknown-error-container.txt": ToolError(
        "nvidia-smi", "Failed to initialize NVML: Unknown Error", rcs=(255,)
    ),
    "nvidia/error-query-field-compute_cap-not-valid.txt": ToolError(
        "nvidia-smi", 'Field "compute_cap" is not a valid field to query', rcs=(2,)
    ),
    "nvidia/q-text-2x-h100-nvl-driver550.txt": Refused("parse_nvidia_smi_xml", "not XML"),
    "nvidia/q-text-rtx4070-laptop-wsl-driver566.txt": Refused("parse_nvidia_smi_xml", "not XML"),
    "nvidia/query-csv-compute_cap-compute_mode-driver_version-name-index-mixed.txt": Gpus(
        "parse_nvidia_smi_csv",
        2,
        ("NVIDIA TITAN V", "NVIDIA RTX 5880 Ada Generation"),
        tool=QUERY,
        vendor="nvidia",
    ),
    "nvidia/query-csv-compute_cap-header.txt": Gpus(
        "parse_nvidia_smi_csv", 1, tool=QUERY, vendor="nvidia"
    ),
    "nvidia/query-csv-compute_cap-noheader-4gpu.txt": Gpus(
        "parse_nvidia_smi_csv", 4, args=(["compute_cap"],)
    ),
    "nvidia/query-csv-full-fieldset-h100-mig-driver590-masked.txt": Gpus(
        "parse_nvidia_smi_csv",
        1,
        "NVIDIA H100 80GB HBM3",
        memory=81559 * MiB,
        tool=QUERY,
        vendor="nvidia",
    ),
    "nvidia/query-csv-nounits-name-uuid-fan-pstate-memory-util-temp-power-clocks-teslap100.txt": (
        Gpus("parse_nvidia_smi_csv", 1, "Tesla P100-PCIE-16GB", tool=QUERY, vendor="nvidia")
    ),
    "nvidia/table-2x-a100-pcie-mig-on-gpu0-driver535.txt": NV_TABLE,
    "nvidia/table-5gpu-mixed-rtx2060-3060-3060ti-3070-driver560.txt": NV_TABLE,
    "nvidia/table-8x-a100-sxm4-40gb-driver450-docker.txt": NV_TABLE,
    "nvidia/table-8x-a100-sxm4-40gb-driver450-mig.txt": NV_TABLE,
    "nvidia/table-8x-b200-driver575-cuda12.9.txt": NV_TABLE,
    "nvidia/table-8x-h100-sxm-driver535-k8s-pod.txt": NV_TABLE,
    "nvidia/table-a100-80gb-pcie-mig-mps-driver570-k8s-pod.txt": NV_TABLE,
    "nvidia/table-h100-mig-driver590.txt": NV_TABLE,
    "nvidia/table-rtx2000ada-laptop-driver580-truncated-name.txt": NV_TABLE,
    "nvidia/table-rtx2070-laptop-driver440-pre450-format.txt": NV_TABLE,
    "nvidia/table-rtx2080super-driver610-kmd-umd-header.txt": NV_TABLE,
    "nvidia/table-rtx3070-wsl-smi530-driver531.txt": NV_TABLE,
    "nvidia/table-rtx4090-driver580-cuda13.0.txt": NV_TABLE,
    "nvidia/table-snap-smi470-vs-driver580-rtxpro-partial.txt": NV_TABLE,
    "nvidia/table-titanv-driver515-oldformat.txt": NV_TABLE,
    "nvidia/table-windows-geforce-truncname-tcc-wddm-driver528.txt": NV_TABLE,
    "nvidia/table-windows-rtx2080super-wddm-driver610.txt": NV_TABLE,
    "nvidia/xml-q-x-a100-sxm4-40gb-mig-driver510.xml": Gpus(
        "parse_nvidia_smi_xml", 1, A100_40, memory=40960 * MiB, mig=(2,)
    ),
    "nvidia/xml-q-x-tesla-p100-driver510.xml": Gpus(
        "parse_nvidia_smi_xml", 1, "Tesla P100-PCIE-16GB", memory=16384 * MiB, mig=(0,)
    ),
    # ------------------------------------------------------------ amd
    "amd/amd-smi-list-radeon-780m-apu.txt": Gpus("parse_amd_smi_static_text", 1),
    "amd/amd-smi-metric-json-rx6600.txt": Gpus("parse_amd_smi_static_json", 1),
    "amd/amd-smi-static-json-rx6600.txt": Gpus(
        "parse_amd_smi_static_json",
        1,
        "Navi 23 [Radeon RX 6600/6600 XT",  # cut short by amd-smi itself
        memory=8176 * MiB,
        tool="amd-smi static",
        vendor="amd",
    ),
    "amd/amd-smi-static-mi300a-4apu.txt": Gpus(
        "parse_amd_smi_static_text",
        4,
        "MI300A",
        memory=64289 * MiB,
        tool="amd-smi static",
        vendor="amd",
    ),
    "amd/amd-smi-version-rocm6.4.0-inbox-kernel-driver.txt": Fields(
        "parse_amd_smi_version", {"rocm version": "6.4.0", "amdsmi library version": "25.3.0"}
    ),
    "amd/amd-smi-version-rocm6.4.1.txt": Fields(
        "parse_amd_smi_version", {"rocm version": "6.4.1", "amdgpu version": "6.10.5"}
    ),
    "amd/error-rocm-smi-driver-not-initialized-docker.txt": ToolError(
        "rocm-smi", "Driver not initialized (amdgpu not found in modules)"
    ),
    "amd/error-rocm-smi-json-no-amd-gpus-specified.txt": Gpus(
        "parse_rocm_smi_json", 0, tool="rocm-smi", vendor="none"
    ),
    "amd/error-rocm-smi-no-amd-gpus-specified-vm.txt": ToolError(
        "rocm-smi", "No AMD GPUs specified"
    ),
    "amd/error-rocminfo-kfd-no-such-file-docker.txt": ToolError(
        "rocminfo", "Unable to open /dev/kfd read-write: No such file or directory"
    ),
    "amd/error-rocminfo-kfd-permission-denied-docker.txt": ToolError(
        "rocminfo", "Unable to open /dev/kfd read-write: Permission denied"
    ),
    "amd/error-rocminfo-out-of-resources.txt": ToolError(
        "rocminfo", "Unable to open /dev/kfd read-write: Cannot allocate memory"
    ),
    "amd/error-rocminfo-rock-not-loaded-docker.txt": ToolError(
        "rocminfo", "ROCk module is NOT loaded"
    ),
    "amd/rocm-smi-csv-productname-use-meminfo-rx7900xt.txt": Gpus(
        "parse_rocm_smi_csv", 1, "Radeon RX 7900 XT", memory=21458059264
    ),
    "amd/rocm-smi-csv-showproductname-mi100-2gpu.txt": Gpus(
        "parse_rocm_smi_csv", 2, "Arcturus GL-XL [AMD Instinct MI100]"
    ),
    "amd/rocm-smi-json-telegraf-flagset-mi100-6gpu-rocm5.7.1.txt": Gpus(
        "parse_rocm_smi_json",
        6,
        "Arcturus GL-XL [Instinct MI100]",
        memory=34342961152,
        tool="rocm-smi",
        vendor="amd",
    ),
    "amd/rocm-smi-showallinfo-mi300x-4gpu-rocm6.1.txt": Gpus(
        "parse_rocm_smi_text", 4, "AMD Instinct MI300X OAM", tool="rocm-smi", vendor="amd"
    ),
    "amd/rocm-smi-showhw-raphael-igpu-plus-rx7900.txt": ROCM_TABLE,
    "amd/rocm-smi-showmeminfo-vram-4gb-gpu.txt": Gpus(
        "parse_rocm_smi_text", 1, memory=4278190080, tool="rocm-smi", vendor="amd"
    ),
    "amd/rocm-smi-showproductname-2x-rx7900xtx-plus-raphael.txt": Gpus(
        "parse_rocm_smi_text", 3, (NAVI31, NAVI31, "Raphael"), tool="rocm-smi", vendor="amd"
    ),
    "amd/rocm-smi-showproductname-rx7900xtx-unresolved-names.txt": Gpus(
        "parse_rocm_smi_text", 1, tool="rocm-smi", vendor="amd"
    ),
    "amd/rocm-smi-table-mi100-4gpu-docker-rocm-terminal.txt": ROCM_TABLE,
    "amd/rocm-smi-table-mi250-8gcd-rocm5.7.txt": ROCM_TABLE,
    "amd/rocm-smi-table-mi300x-4gpu-rocm6.1-concise.txt": ROCM_TABLE,
    "amd/rocm-smi-table-mi300x-8gpu-model-revision-style-vllm-container.txt": ROCM_TABLE,
    "amd/rocm-smi-table-mi300x-8gpu-newstyle-hotaisle.txt": ROCM_TABLE,
    "amd/rocm-smi-table-oldstyle-raphael-igpu-plus-rx7900.txt": ROCM_TABLE,
    "amd/rocm-smi-table-oldstyle-rx7900xt-single.txt": ROCM_TABLE,
    "amd/rocm-smi-table-rocm1.9-phantom-gpu0.txt": ROCM_TABLE,
    "amd/rocm-smi-table-rx6700xt-newstyle.txt": ROCM_TABLE,
    "amd/rocm-smi-table-rx7700s-780m-apu-dgpu.txt": ROCM_TABLE,
    "amd/rocm-smi-table-rx9070-w7900-mixed-therock.txt": ROCM_TABLE,
    "amd/rocminfo-gfx906-vega20-8gpu-old-rocm2.x.txt": Gpus(
        "parse_rocminfo", 8, "Vega 20", memory=33538048 * KiB, tool="rocminfo", vendor="amd"
    ),
    "amd/rocminfo-mi300x-4gpu-gfx942.txt": Gpus(
        "parse_rocminfo",
        4,
        "AMD Instinct MI300X",
        memory=201310208 * KiB,
        tool="rocminfo",
        vendor="amd",
    ),
    "amd/rocminfo-rx6700xt-gfx1030-override.txt": Gpus(
        "parse_rocminfo",
        1,
        "AMD Radeon RX 6700 XT",
        memory=12566528 * KiB,
        tool="rocminfo",
        vendor="amd",
    ),
    # one GPU agent: the CPU and the 'DSP' NPU agent (aie2) are not GPUs
    "amd/rocminfo-strix-halo-apu-gfx1151-with-npu.txt": Gpus(
        "parse_rocminfo", 1, "Radeon 8060S Graphics", tool="rocminfo", vendor="amd"
    ),
    "amd/rocminfo-wsl-rx7800xt-gfx1101.txt": Gpus(
        "parse_rocminfo",
        1,
        "AMD Radeon RX 7800 XT",
        memory=16539816 * KiB,
        tool="rocminfo",
        vendor="amd",
    ),
    # ------------------------------------------------------------ other
    "other/clinfo-amd-rx480-rocm.txt": Gpus(
        "parse_clinfo", 1, "gfx803", memory=8589934592, tool="clinfo", vendor="amd"
    ),
    "other/clinfo-intel-gen9-neo.txt": Gpus(
        "parse_clinfo",
        1,
        "Intel(R) Gen9 HD Graphics NEO",
        memory=26892222464,
        tool="clinfo",
        vendor="other",
    ),
    "other/clinfo-l-clover-amdapp-rx580.txt": Gpus(
        "parse_clinfo",
        2,
        (
            "Radeon RX 580 Series (POLARIS10, DRM 3.41.0, 5.13.12-arch1-1, LLVM 12.0.1)",
            "Ellesmere",
        ),
    ),
    "other/clinfo-l-nvidia-intel-cpu-windows.txt": Gpus(
        "parse_clinfo", 2, ("Quadro K620", "Intel(R) Xeon(R) CPU E5-2630 v3 @ 2.40GHz")
    ),
    "other/clinfo-no-platforms.txt": Gpus("parse_clinfo", 0, tool="clinfo", vendor="none"),
    "other/clinfo-nvidia-rtx3090.txt": Gpus(
        "parse_clinfo",
        1,
        "NVIDIA GeForce RTX 3090",
        memory=25422266368,
        tool="clinfo",
        vendor="nvidia",
    ),
    "other/docker-error-could-not-select-device-driver.txt": NotInventory(NOT_DETECT),
    "other/docker-error-unknown-runtime-specified-nvidia-legacy.txt": NotInventory(NOT_DETECT),
    "other/docker-info-grep-nvidia-default-runtime-nvidia.txt": NotInventory(NOT_DETECT),
    "other/docker-info-grep-runtime-nvidia-not-registered.txt": NotInventory(NOT_DETECT),
    "other/docker-info-no-nvidia-runtime-docs-example.txt": NotInventory(NOT_DETECT),
    "other/docker-info-nvidia-runtime-not-default.txt": NotInventory(NOT_DETECT),
    "other/ls-la-dev-kfd-dev-dri-rx9070xt-lxc.txt": NotInventory(NOT_DETECT),
    "other/lspci-mixed-nvidia-3d-amd-vga-ideapad-15ach6.txt": NotInventory(NOT_DETECT),
    "other/lspci-nn-amd-strix-halo-display-controller.txt": NotInventory(NOT_DETECT),
    "other/lspci-nn-grep-vga-3d-intel-nvidia-x2-false-positive-bridge.txt": NotInventory(
        NOT_DETECT
    ),
    "other/nvidia-container-cli-debug-info-jetson-no-nvml.txt": NotInventory(NOT_DETECT),
    "other/nvidia-container-cli-debug-info-jetson-xavier.txt": NotInventory(NOT_DETECT),
    "other/nvidia-container-cli-info-gtx1070.txt": NotInventory(NOT_DETECT),
    "other/nvidia-container-runtime-version-1.13.5.txt": NotInventory(NOT_DETECT),
    "other/nvidia-ctk-version-1.12.0.txt": NotInventory(NOT_DETECT),
    # rocm-clinfo's 'Key:<tabs>value' format: one NVIDIA device on the first platform, none
    # on the second ('Number of devices: 1' / '0'), its name on a '  Name:' line.
    "other/rocm-clinfo-two-platforms-nvidia-rtx4070-amdapp-no-devices.txt": Gpus(
        "parse_clinfo",
        1,
        "NVIDIA GeForce RTX 4070",
        memory=12592218112,
        bug="parse_clinfo returns no device (and no error) for rocm-clinfo's 'Key:' format",
    ),
}

GPU_PARSERS = sorted(RAW_COUNT)


RECORDINGS = sharedata.files(RECORDED_DIR)


def _with_known_bugs(relatives: list) -> list:
    """A recording whose entry names a known parser bug is xfail (strict: fixed, it fails)."""
    out = []
    for relative in relatives:
        want = EXPECTED.get(relative) if isinstance(relative, str) else None
        if isinstance(want, Gpus) and want.bug:
            relative = pytest.param(relative, marks=pytest.mark.xfail(reason=want.bug, strict=True))
        out.append(relative)
    return out


def expectation(relative: str):
    if relative not in EXPECTED:
        pytest.fail(
            f"{RECORDED_DIR}/{relative} has no expectation: add one to EXPECTED in "
            "tests/unit/test_detect_recorded.py (its GPUs, or the error or refusal it gives)",
            pytrace=False,
        )
    return EXPECTED[relative]


def test_every_expectation_names_a_recording():
    present = set(RECORDINGS)
    stale = sorted(set(EXPECTED) - present)
    assert not stale, f"EXPECTED names recordings that are not in {RECORDED_DIR}: {stale}"


@pytest.mark.parametrize("relative", _with_known_bugs(RECORDINGS))
def test_recording_yields_what_it_shows(relative):
    want = expectation(relative)
    text = recorded(relative)
    if isinstance(want, Gpus):
        parser = getattr(detect, want.parser)
        gpus = gpus_of(want.parser, parser(text, *want.args))
        assert RAW_COUNT[want.parser](text, not want.args) == want.count, "the recording itself"
        assert len(gpus) == want.count
        for key, expected in (("name", want.names), ("memory_bytes", want.memory)):
            if expected is not None:
                if not isinstance(expected, tuple):
                    expected = (expected,) * want.count
                assert tuple(g[key] for g in gpus) == expected, key
        if want.mig is not None:
            assert tuple(len(g["mig_devices"]) for g in gpus) == want.mig
        if want.tool:
            report = collect({want.tool: (0, text)})
            count = want.count if want.report is None else want.report
            assert len(report["gpus"]) == count
            assert report["gpu_vendor"] == want.vendor
    elif isinstance(want, Refused):
        with pytest.raises(ValueError, match=re.escape(want.fragment)):
            getattr(detect, want.parser)(text)
    elif isinstance(want, ToolError):
        for rc in want.rcs:
            report = collect({want.tool: (rc, text)})
            errors = [e["error"] for e in report["errors"] if e["tool"] == want.tool]
            assert any(want.fragment in e for e in errors), (rc, report["errors"])
            assert report["gpus"] == [] and report["gpu_vendor"] == "none"
    elif isinstance(want, Fields):
        fields = getattr(detect, want.parser)(text)
        assert {k: fields.get(k) for k in want.fields} == want.fields
    else:
        assert isinstance(want, NotInventory)


@pytest.mark.parametrize("relative", RECORDINGS)
def test_no_other_parser_finds_gpus_in_it(relative):
    """Every parser on every recording: ValueError (the documented 'not my format') or a
    result; GPUs only from the parser the recording is for."""
    want = expectation(relative)
    text = recorded(relative)
    own = want.parser if isinstance(want, Gpus) else None
    for name in GPU_PARSERS:
        try:
            result = getattr(detect, name)(text)
        except ValueError:
            continue
        if name != own:
            assert gpus_of(name, result) == [], f"{name} finds GPUs in it"
    for parser in (detect.parse_amd_smi_version, detect.parse_ip_addr_json):
        try:
            parser(text)
        except ValueError:
            pass


@pytest.mark.parametrize("relative", RECORDINGS)
def test_any_recording_as_any_tools_output_gives_a_valid_report(relative):
    want = expectation(relative)
    text = recorded(relative)
    for rc in (0, 1):
        table = {
            tool: (rc, text)
            for tool in (
                "nvidia-smi",
                "rocminfo",
                "rocm-smi",
                "amd-smi",
                "clinfo",
                "ip",
                "hostname",
            )
        }
        report = collect(table)
        if not (isinstance(want, Gpus) and want.count):
            assert report["gpus"] == [], "GPUs out of a recording that shows none"
