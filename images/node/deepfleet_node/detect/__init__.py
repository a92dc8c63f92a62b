"""Node inventory: what this machine (or container) has and what its torch can use.

``python -m deepfleet_node.detect --json`` prints one JSON report (schema 1) and exits 0,
whatever the GPU tools do. Only the standard library is imported here: torch is probed in
a child process with a timeout, because importing it or initialising a broken driver can
hang or crash, and the report must come out regardless.

Layers, one module each:
- pure parsers (``parse_*``), one module per tool family (nvidia, amd, clinfo, host) over
  the shared helpers in parsing: tool output text -> plain dicts, raising ValueError on
  anything they do not recognise;
- runner: ``run_tool`` runs one external command with a hard timeout;
- the collectors beside their parsers, visibility (``*_VISIBLE_DEVICES``) and torchinfo;
- report: ``collect`` runs the tools through an injectable runner and composes the report;
- schema: ``validate_report`` against schemas/report.schema.json; cli: ``main``.

The names below are re-exported for ``from deepfleet_node import detect`` users. A test
that patches a setting (EXTRA_TOOL_DIRS, collect) must patch the module that reads it.
"""

from .amd import (
    gfx_from_override,
    parse_amd_smi_static_json,
    parse_amd_smi_static_text,
    parse_amd_smi_version,
    parse_rocm_smi_csv,
    parse_rocm_smi_json,
    parse_rocm_smi_text,
    parse_rocminfo,
    rocminfo_gpus,
)
from .cli import format_summary, main
from .clinfo import parse_clinfo
from .host import CGROUP_ROOT, cgroup_limits, parse_ip_addr_json, parse_meminfo
from .nvidia import (
    NVIDIA_QUERY_FIELDS,
    parse_nvidia_smi_csv,
    parse_nvidia_smi_list,
    parse_nvidia_smi_xml,
)
from .parsing import normalize_pci, summarize_error, to_bytes
from .report import (
    DEFAULT_TORCH_TIMEOUT,
    GPU_KEYS,
    SCHEMA_VERSION,
    TIMEOUT_ENV,
    TORCH_TIMEOUT_ENV,
    collect,
    minimal_report,
)
from .runner import DEFAULT_TIMEOUT, EXTRA_TOOL_DIRS, Runner, ToolResult, run_tool
from .schema import validate_report
from .visibility import VISIBLE_ENV_VARS

__all__ = [
    "CGROUP_ROOT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TORCH_TIMEOUT",
    "EXTRA_TOOL_DIRS",
    "GPU_KEYS",
    "NVIDIA_QUERY_FIELDS",
    "Runner",
    "SCHEMA_VERSION",
    "TIMEOUT_ENV",
    "TORCH_TIMEOUT_ENV",
    "ToolResult",
    "VISIBLE_ENV_VARS",
    "cgroup_limits",
    "collect",
    "format_summary",
    "gfx_from_override",
    "main",
    "minimal_report",
    "normalize_pci",
    "parse_amd_smi_static_json",
    "parse_amd_smi_static_text",
    "parse_amd_smi_version",
    "parse_clinfo",
    "parse_ip_addr_json",
    "parse_meminfo",
    "parse_nvidia_smi_csv",
    "parse_nvidia_smi_list",
    "parse_nvidia_smi_xml",
    "parse_rocm_smi_csv",
    "parse_rocm_smi_json",
    "parse_rocm_smi_text",
    "parse_rocminfo",
    "rocminfo_gpus",
    "run_tool",
    "summarize_error",
    "to_bytes",
    "validate_report",
]
