"""What each GPU is doing now: memory used and total, utilisation. For `deepfleet status`.

detect says what a machine has, once; this samples what its GPUs do at this moment with
the same vendor tools and detect's own value parsers, and prints one JSON object:

    {"gpus": [{"index": 0, "name": "...", "memory_used_bytes": ..., "memory_total_bytes": ...,
               "utilization_pct": 37}], "tool": "nvidia-smi", "error": null}

A machine with no GPU tool prints {"gpus": [], "tool": null, "error": null}; a tool that
fails gives its one-line error instead of a crash.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .detect.nvidia import _csv_header
from .detect.parsing import (
    _clean,
    _csv_rows,
    _json_from_text,
    _norm_key,
    _one_line,
    _strip_ansi,
    _to_int,
    to_bytes,
)
from .detect.runner import run_tool

NVIDIA_FIELDS = ("index", "name", "memory.used", "memory.total", "utilization.gpu")
NVIDIA_ARGV = ["nvidia-smi", f"--query-gpu={','.join(NVIDIA_FIELDS)}", "--format=csv,nounits"]
ROCM_ARGV = ["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--showuse", "--json"]


def _pct(value: Any) -> float | None:
    text = _clean(value)
    if text is None:
        return None
    try:
        return float(text.rstrip("%").strip())
    except ValueError:
        return None


def _mem(raw: dict, units: dict, field: str) -> int | None:
    return to_bytes(raw.get(field), units.get(field) or "MiB") if field in raw else None


def parse_nvidia(text: str) -> list[dict]:
    """nvidia-smi --query-gpu CSV by its header; memory.total from used + free where a
    query asked for free instead."""
    rows = _csv_rows(_strip_ansi(text))
    header = _csv_header(rows[0]) if rows else None
    if header is None:
        raise ValueError("nvidia-smi CSV without a header")
    names, units = [n for n, _ in header], dict(header)
    gpus = []
    for position, row in enumerate(rows[1:]):
        if len(row) != len(names):
            raise ValueError(f"nvidia-smi CSV row {position + 1}: {_one_line(', '.join(row), 80)}")
        raw = dict(zip(names, row, strict=True))
        used, total = _mem(raw, units, "memory.used"), _mem(raw, units, "memory.total")
        free = _mem(raw, units, "memory.free")
        if total is None and used is not None and free is not None:
            total = used + free + (_mem(raw, units, "memory.reserved") or 0)
        index = _to_int(raw.get("index"))
        gpus.append(
            {
                "index": position if index is None else index,
                "name": _clean(raw.get("name")),
                "memory_used_bytes": used,
                "memory_total_bytes": total,
                "utilization_pct": _pct(raw.get("utilization.gpu")),
            }
        )
    return gpus


def parse_rocm(text: str) -> list[dict]:
    """rocm-smi --json: one object per card; keys differ in case and spacing by release."""
    data = _json_from_text(_strip_ansi(text))
    if not isinstance(data, dict):
        raise ValueError("rocm-smi JSON is not an object")
    gpus = []
    for key, value in data.items():
        name = str(key).strip().lower()
        if not (name.startswith("card") and name[4:].isdigit() and isinstance(value, dict)):
            continue
        card = {_norm_key(k): v for k, v in value.items()}
        gpus.append(
            {
                "index": int(name[4:]),
                "name": _clean(card.get("card series") or card.get("card model")),
                "memory_used_bytes": to_bytes(card.get("vram total used memory (b)")),
                "memory_total_bytes": to_bytes(card.get("vram total memory (b)")),
                "utilization_pct": _pct(card.get("gpu use (%)")),
            }
        )
    return sorted(gpus, key=lambda g: g["index"])


def sample(timeout: float = 10.0) -> dict:
    for argv, parse in ((NVIDIA_ARGV, parse_nvidia), (ROCM_ARGV, parse_rocm)):
        result = run_tool(argv, timeout)
        if result.missing:
            continue
        tool = argv[0]
        if not result.ok:
            why = result.error or _one_line(result.output, 160) or f"exit {result.returncode}"
            return {"gpus": [], "tool": tool, "error": why}
        try:
            return {"gpus": parse(result.stdout), "tool": tool, "error": None}
        except ValueError as exc:
            return {"gpus": [], "tool": tool, "error": str(exc)}
    return {"gpus": [], "tool": None, "error": None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args(argv)
    json.dump(sample(args.timeout), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
