"""What every tool's parser shares: the many ways tools say 'unknown', units, PCI ids,
the one line that names why a tool failed, and JSON or CSV found inside other text.

Names with a leading underscore are shared inside this package only.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

_UNIT_BYTES = {
    "b": 1,
    "byte": 1,
    "bytes": 1,
    # GPU tools say KB/MB/GB but mean KiB/MiB/GiB (rocminfo pools, amd-smi VRAM: an 8 GiB
    # RX 6600 reports "8176 MB"), so both spellings are binary here.
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}


def _strip_ansi(text: str) -> str:
    return _ANSI_RE.sub("", text)


def _clean(value: Any) -> str | None:
    """A tool's value, or None for the many ways tools say 'unknown'."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    if text.startswith("[") and text.endswith("]"):
        # nvidia-smi: [N/A], [Not Supported], [Requested functionality has been deprecated]
        return None
    if text.lower() in {"n/a", "na", "none", "unknown", "not supported", "unsupported", "null"}:
        return None
    return text


def _to_int(value: Any) -> int | None:
    text = _clean(value)
    if text is None:
        return None
    try:
        return int(text, 0) if text.lower().startswith("0x") else int(text)
    except ValueError:
        return None


def to_bytes(value: Any, default_unit: str = "b") -> int | None:
    """Parse '81559 MiB', '4278190080', {'value': 8176, 'unit': 'MB'} into bytes."""
    if isinstance(value, dict):
        return to_bytes(value.get("value"), str(value.get("unit") or default_unit))
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number, unit = float(value), default_unit
    else:
        text = _clean(value)
        if text is None:
            return None
        match = re.match(r"^([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)", text)
        if not match:
            return None
        number = float(match.group(1))
        unit = match.group(2) or default_unit
    factor = _UNIT_BYTES.get(unit.lower())
    if factor is None:
        return None
    return int(number * factor)


def normalize_pci(value: Any) -> str | None:
    """'00000000:8D:00.0' (NVIDIA) and '0000:8d:00.0' (AMD) -> '0000:8d:00.0'."""
    text = _clean(value)
    if text is None:
        return None
    match = re.match(
        r"^(?:([0-9a-fA-F]+):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$",
        text,
    )
    if not match:
        return text
    domain = int(match.group(1) or "0", 16)
    bus, dev, fn = int(match.group(2), 16), int(match.group(3), 16), int(match.group(4))
    return f"{domain:04x}:{bus:02x}:{dev:02x}.{fn}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Lines that name a cause, preferred over whatever else a failing tool printed.
_STRONG_ERROR_RE = re.compile(
    r"\berror\b|fail|unable|cannot|can't|couldn't|not loaded|not initialized|mismatch|"
    r"no devices were found|no amd gpus|not a valid field|permission denied",
    re.IGNORECASE,
)

_WEAK_ERROR_RE = re.compile(
    r"no such file|not found|invalid|unknown|denied|warning|not supported", re.IGNORECASE
)


def summarize_error(text: str, returncode: int | None = None) -> str:
    """One line naming why a tool failed, picked from what it printed."""
    lines = [ln.strip() for ln in _strip_ansi(text or "").splitlines() if ln.strip()]
    for pattern in (_STRONG_ERROR_RE, _WEAK_ERROR_RE):
        for line in lines:
            if pattern.search(line):
                return _one_line(line)
    if lines:
        return _one_line(lines[0])
    if returncode is not None:
        return f"exited with status {returncode} and printed nothing"
    return "printed nothing"


def _json_from_text(text: str) -> Any:
    """First JSON value in text; tools print warnings before it ('WARNING: No AMD GPUs')."""
    text = text or ""
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            return decoder.raw_decode(stripped)[0]
        except json.JSONDecodeError:
            pass
    for match in re.finditer(r"^[ \t]*([{\[])", text, re.MULTILINE):
        try:
            return decoder.raw_decode(text[match.start(1) :])[0]
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON value found in output")


def _csv_rows(text: str) -> list[list[str]]:
    reader = csv.reader(io.StringIO(text), skipinitialspace=True)
    return [[cell.strip() for cell in row] for row in reader if any(c.strip() for c in row)]


def _norm_key(key: Any) -> str:
    return " ".join(str(key).replace("\t", " ").split()).rstrip(":").strip().lower()
