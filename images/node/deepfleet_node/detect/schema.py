"""Checking a report against its one schema, deepfleet_node/schemas/report.schema.json.

The orchestrator validates what a node sent against the same file with jsonschema. The
image has no jsonschema and detect imports only the standard library, so this walks the
schema itself. It knows the keywords that file uses, with JSON Schema's meaning, and
refuses any other when loading it: a schema edit it cannot honour fails loudly instead of
letting every report through.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_FILE = "schemas/report.schema.json"
COMPLETE = "#/$defs/complete"  # what detect itself writes: every key present

_ANNOTATIONS = {"$schema", "$id", "$comment", "$defs", "title", "description"}
_CHECKS = {
    "$ref",
    "type",
    "const",
    "enum",
    "not",
    "exclusiveMinimum",
    "maximum",
    "pattern",
    "required",
    "properties",
    "additionalProperties",
    "items",
}
_TYPES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    # JSON Schema's counting: 3.0 is an integer, and true is neither integer nor number.
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


@cache
def report_schema() -> dict:
    """The shipped schema, its keywords checked against what this walker knows."""
    text = (resources.files("deepfleet_node") / SCHEMA_FILE).read_text(encoding="utf-8")
    schema = json.loads(text)
    _check_keywords(schema, "#")
    return schema


def _check_keywords(schema: dict, where: str) -> None:
    unknown = set(schema) - _ANNOTATIONS - _CHECKS
    if unknown:
        raise ValueError(f"{SCHEMA_FILE} {where}: keywords {sorted(unknown)} are not supported")
    for key in ("not", "items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _check_keywords(schema[key], f"{where}/{key}")
    for group in ("properties", "$defs"):
        for name, sub in schema.get(group, {}).items():
            _check_keywords(sub, f"{where}/{group}/{name}")


def schema_problems(instance: Any, ref: str = COMPLETE) -> list[tuple[str, str]]:
    """(path, keyword) for each place where instance breaks the schema at ref, e.g.
    ("gpus[1].uuid", "required"); once per path, in the schema's order."""
    root = report_schema()
    found: list[tuple[str, str]] = []
    _walk(instance, _resolve(root, ref), root, "", found)
    first: dict[str, str] = {}
    for path, keyword in found:
        first.setdefault(path, keyword)
    return list(first.items())


def _resolve(root: dict, ref: str) -> dict:
    if not ref.startswith("#"):
        raise ValueError(f"{SCHEMA_FILE}: only references inside the file are supported: {ref}")
    node = root
    for part in ref[1:].split("/")[1:]:
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _equal(one: Any, two: Any) -> bool:
    # As jsonschema compares: true is not 1.
    if isinstance(one, bool) or isinstance(two, bool):
        return type(one) is type(two) and one == two
    return one == two


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _walk(value: Any, schema: dict, root: dict, path: str, found: list) -> None:
    if "$ref" in schema:
        _walk(value, _resolve(root, schema["$ref"]), root, path, found)
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if not any(_TYPES[kind](value) for kind in kinds):
            found.append((path, "type"))
    if "const" in schema and not _equal(value, schema["const"]):
        found.append((path, "const"))
    if "enum" in schema and not any(_equal(value, option) for option in schema["enum"]):
        found.append((path, "enum"))
    if "not" in schema:
        inner: list = []
        _walk(value, schema["not"], root, path, inner)
        if not inner:
            found.append((path, "not"))
    if _TYPES["number"](value):
        # Written as jsonschema tests them, so NaN passes both alike.
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            found.append((path, "exclusiveMinimum"))
        if "maximum" in schema and value > schema["maximum"]:
            found.append((path, "maximum"))
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        found.append((path, "pattern"))
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                found.append((_join(path, key), "required"))
        properties = schema.get("properties", {})
        for key, sub in properties.items():
            if key in value:
                _walk(value[key], sub, root, _join(path, key), found)
        extra = schema.get("additionalProperties", True)
        for key in value:
            if key in properties:
                continue
            if extra is False:
                found.append((_join(path, str(key)), "additionalProperties"))
            elif isinstance(extra, dict):
                _walk(value[key], extra, root, _join(path, str(key)), found)
    if isinstance(value, list) and "items" in schema:
        for n, item in enumerate(value):
            _walk(item, schema["items"], root, f"{path}[{n}]", found)


def validate_report(report: Any) -> list[str]:
    """Problems with a report as detect writes it; empty when it is valid.

    Each names where: a path that breaks the schema ('cpu_quota'), 'PATH is missing', or
    one of the rules across fields that a JSON Schema cannot state.
    """
    if not isinstance(report, dict):
        return ["report is not an object"]
    problems = [
        f"{path} is missing" if keyword == "required" else path
        for path, keyword in schema_problems(report)
    ]
    return problems + _across_fields(report)


def _across_fields(report: dict) -> list[str]:
    """GPU indices run 0..n-1 per vendor, and gpu_vendor names a listed GPU."""
    problems = []
    gpus = report.get("gpus") if isinstance(report.get("gpus"), list) else []
    per_vendor: dict[str, list[int]] = {}
    for gpu in gpus:
        if isinstance(gpu, dict) and isinstance(gpu.get("index"), int):
            per_vendor.setdefault(str(gpu.get("vendor")), []).append(gpu["index"])
    for vendor, indices in per_vendor.items():
        if indices != list(range(len(indices))):
            problems.append(f"{vendor} indices {indices} are not 0..n-1")
    vendors = {g.get("vendor") for g in gpus if isinstance(g, dict)}
    if gpus:
        if report.get("gpu_vendor") not in vendors:
            problems.append("gpu_vendor names no listed GPU")
    elif report.get("gpu_vendor") != "none":
        problems.append("gpu_vendor must be 'none' without GPUs")
    return problems
