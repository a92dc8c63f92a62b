"""detect against every output recorded on real machines (../shared/gpu-tool-outputs): each
parser on every recording, and any recording as any tool's output.

The recordings are third-party text and are read in place, never copied into the repo.
Each test skips, with the reason, where that folder is absent. The tests of one tool
family's recordings sit beside its parsers' (test_detect_nvidia.py, _amd, _clinfo).
"""

from pathlib import Path

import pytest
from detectdata import collect
from unitdata import RECORDED, detect

pytestmark = pytest.mark.skipif(
    not RECORDED.is_dir(), reason=f"recorded GPU tool outputs not found at {RECORDED}"
)


def all_recorded() -> list[Path]:
    if not RECORDED.is_dir():
        return []
    return sorted(p for p in RECORDED.rglob("*") if p.is_file() and p.name != "SOURCES.md")


# ---------------------------------------------------------------- every recording, every parser

PARSERS = [
    detect.parse_nvidia_smi_csv,
    detect.parse_nvidia_smi_xml,
    detect.parse_nvidia_smi_list,
    detect.parse_rocm_smi_json,
    detect.parse_rocm_smi_csv,
    detect.parse_rocm_smi_text,
    detect.parse_amd_smi_static_json,
    detect.parse_amd_smi_static_text,
    detect.parse_amd_smi_version,
    detect.parse_rocminfo,
    detect.parse_clinfo,
    detect.parse_ip_addr_json,
]


@pytest.mark.parametrize("path", all_recorded(), ids=lambda p: str(p.relative_to(RECORDED)))
def test_every_parser_accepts_or_rejects_cleanly(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    for parser in PARSERS:
        try:
            parser(text)
        except ValueError:
            pass  # the documented way to say "not my format"


@pytest.mark.parametrize("path", all_recorded(), ids=lambda p: str(p.relative_to(RECORDED)))
def test_any_recording_as_any_tools_output_gives_a_valid_report(path):
    text = path.read_text(encoding="utf-8", errors="replace")
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
        collect(table)
