"""`detect` on the command line: the JSON report (--json) or a summary for people."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

from .report import TIMEOUT_ENV, collect, minimal_report
from .runner import DEFAULT_TIMEOUT


def _gib(value: int | None) -> str:
    return "?" if not value else f"{value / 1024**3:.1f} GiB"


def format_summary(report: Mapping[str, Any]) -> str:
    versions = report.get("versions", {})
    quota = report.get("cpu_quota")
    quota = f" (quota {quota:.2f} cores)" if quota else ""
    limit = report.get("memory_limit_bytes")
    limit = f" (limit {_gib(limit)})" if limit else ""
    lines = [
        f"host     {report.get('hostname')}  {' '.join(report.get('ips') or []) or '(no address)'}",
        f"cpu      {report.get('cpu_count')} cores{quota}, "
        f"{_gib(report.get('memory_bytes'))} memory{limit}",
        f"python   {versions.get('python')}  torch {versions.get('torch') or '-'} "
        f"({report.get('accelerator')})  deepspeed {versions.get('deepspeed') or '-'}  "
        f"transformers {versions.get('transformers') or '-'}",
    ]
    gpus = report.get("gpus") or []
    lines.append(f"gpus     {len(gpus)} ({report.get('gpu_vendor')})")
    for gpu in gpus:
        detail = gpu.get("compute_capability") or gpu.get("gfx_target") or ""
        extra = " MIG" if gpu.get("mig") else ""
        lines.append(
            f"  [{gpu.get('index')}] {gpu.get('name') or '?'}  {_gib(gpu.get('memory_bytes'))}"
            f"  {detail}{extra}  {gpu.get('pci_bus_id') or ''}  via {gpu.get('source')}".rstrip()
        )
    for key, value in (report.get("visible_devices") or {}).items():
        lines.append(f"visible  {key}={value}")
    for error in report.get("errors") or []:
        lines.append(f"error    {error.get('tool')}: {error.get('error')}")
    for note in report.get("notes") or []:
        lines.append(f"note     {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="detect", description="Report this node's CPUs, memory, GPUs and ML stack."
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds per external tool (default ${TIMEOUT_ENV} or {DEFAULT_TIMEOUT:g})",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.print_usage(sys.stderr)
        print("detect: --timeout must be a positive number", file=sys.stderr)
        return 2
    try:
        report = collect(timeout=args.timeout)
    except Exception as exc:
        report = minimal_report(f"collect failed: {type(exc).__name__}: {exc}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_summary(report))
    return 0
