"""The report as a whole: what collect composes, and validate_report against the schema."""

import json
import sys

import jsonschema
import pytest
from detectdata import NODE_DIR, NVIDIA_4, detect, fixture, run
from referencing import Registry, Resource

from deepfleet_node.detect import schema


def test_no_tool_at_all_means_no_gpu_and_no_error():
    report, runner = run()
    assert report["gpu_vendor"] == "none"
    assert report["gpus"] == []
    assert report["errors"] == []
    assert report["accelerator"] == "cpu"
    assert report["visible_devices"] == {}
    assert report["versions"]["python"].startswith(f"{sys.version_info[0]}.")
    # Every vendor tool was tried, clinfo included, and each was silently absent.
    for tool in ("nvidia-smi", "rocminfo", "amd-smi", "rocm-smi", "clinfo"):
        assert runner.ran(tool), tool


def test_top_level_fields():
    report, _ = run(env={"CUDA_VISIBLE_DEVICES": "0", "OTHER": "x"})
    assert report["schema"] == 1
    assert isinstance(report["hostname"], str) and report["hostname"]
    assert report["cpu_count"] >= 1
    assert report["visible_devices"] == {"CUDA_VISIBLE_DEVICES": "0"}


def test_mixed_vendor_machine_lists_both_with_separate_indices():
    table = dict(NVIDIA_4)
    table["rocminfo"] = fixture("rocminfo-apu-npu.txt")
    report, _ = run(table)
    assert [(g["vendor"], g["index"]) for g in report["gpus"]] == [
        ("nvidia", 0),
        ("nvidia", 1),
        ("nvidia", 2),
        ("nvidia", 3),
        ("amd", 0),
    ]
    assert report["gpu_vendor"] == "nvidia"
    assert any("several vendors" in n for n in report["notes"])


# ---------------------------------------------------------------- validate_report


def test_validate_report_catches_problems():
    report, _ = run(NVIDIA_4)
    report["gpus"][1]["index"] = 5
    report["gpu_vendor"] = "intel"
    del report["versions"]["torch"]
    problems = detect.validate_report(report)
    assert any("indices" in p for p in problems)
    assert any("gpu_vendor" in p for p in problems)
    assert any("versions.torch" in p for p in problems)


def test_validate_report_limits():
    report = detect.minimal_report("x")
    assert detect.validate_report(report) == []
    del report["memory_limit_bytes"], report["cpu_quota"]  # a report from an older image
    assert detect.validate_report(report) == []
    report.update(memory_limit_bytes="2g", cpu_quota=0)
    assert {"memory_limit_bytes", "cpu_quota"} <= set(detect.validate_report(report))
    report.update(memory_limit_bytes=True, cpu_quota=0.3)
    assert detect.validate_report(report) == ["memory_limit_bytes"]


# ---------------------------------------------------------------- the one schema


def schema_doc():
    return json.loads((NODE_DIR / "deepfleet_node" / schema.SCHEMA_FILE).read_text())


def jsonschema_paths(report, ref):
    """Where jsonschema finds report breaking the schema at ref, as the walker names places."""
    doc = schema_doc()
    registry = Registry().with_resource(doc["$id"], Resource.from_contents(doc))
    validator = jsonschema.Draft202012Validator({"$ref": doc["$id"] + ref}, registry=registry)
    paths = set()
    for error in validator.iter_errors(report):
        where = ""
        for part in error.absolute_path:
            where += f"[{part}]" if isinstance(part, int) else f"{'.' if where else ''}{part}"
        if error.validator == "required":
            missing = [k for k in error.validator_value if k not in error.instance]
            paths.update(f"{where}.{k}" if where else k for k in missing)
        elif error.validator == "additionalProperties":
            known = error.schema.get("properties", {})
            paths.update(f"{where}.{k}" if where else k for k in error.instance if k not in known)
        else:
            paths.add(where)
    return paths


def broken_reports():
    """(name, report, valid): a report from the fixtures, values JSON Schema counts alike,
    and ways of breaking each kind of field."""
    good, _ = run(NVIDIA_4, torch_info=None)
    yield "as collected", good, True
    alike = {
        "cpu_count 8.0": lambda r: r.update(cpu_count=8.0),  # JSON has one kind of number
        "no limits": lambda r: (r.pop("memory_limit_bytes"), r.pop("cpu_quota")),
    }
    breaks = {
        "schema 2": lambda r: r.update(schema=2),
        "schema true": lambda r: r.update(schema=True),
        "no hostname": lambda r: r.pop("hostname"),
        "ips of numbers": lambda r: r.update(ips=[1]),
        "zero cpus": lambda r: r.update(cpu_count=0),
        "cpu_count true": lambda r: r.update(cpu_count=True),
        "memory text": lambda r: r.update(memory_bytes="16G"),
        "limit zero": lambda r: r.update(memory_limit_bytes=0),
        "quota infinite": lambda r: r.update(cpu_quota=float("inf")),
        "quota -1": lambda r: r.update(cpu_quota=-1),
        "accelerator tpu": lambda r: r.update(accelerator="tpu"),
        "no notes": lambda r: r.pop("notes"),
        "gpu vendor intel": lambda r: r["gpus"][0].update(vendor="intel"),
        "gpu without uuid": lambda r: r["gpus"][1].pop("uuid"),
        "gpu mig 1": lambda r: r["gpus"][2].update(mig=1),
        "gpu source guess": lambda r: r["gpus"][3].update(source="guess"),
        "gpu a list": lambda r: r["gpus"].append([]),
        "unknown visible var": lambda r: r["visible_devices"].update(GPU_DEVICE_ORDINAL="0"),
        "no versions.torch": lambda r: r["versions"].pop("torch"),
        "python null": lambda r: r["versions"].update(python=None),
        "two-line error": lambda r: r["errors"].append({"tool": "x", "error": "a\nb"}),
        "error with extra key": lambda r: r["errors"].append({"tool": "x", "error": "a", "n": 1}),
        "error without tool": lambda r: r["errors"].append({"error": "a"}),
    }
    for valid, changes in ((True, alike), (False, breaks)):
        for name, change in changes.items():
            report = json.loads(json.dumps(good))
            change(report)
            yield name, report, valid


@pytest.mark.parametrize("ref", ["#", schema.COMPLETE])
def test_the_walker_and_jsonschema_agree_on_every_report(ref):
    # detect checks with the walker, the orchestrator with jsonschema: one schema, one verdict
    for name, report, valid in broken_reports():
        walker = {path for path, _ in schema.schema_problems(report, ref)}
        assert walker == jsonschema_paths(report, ref), name
        if ref == schema.COMPLETE:
            assert not walker if valid else walker, name


def test_the_schema_is_what_collect_writes():
    doc = schema_doc()
    complete = doc["$defs"]["complete"]
    assert doc["properties"]["schema"]["const"] == detect.SCHEMA_VERSION
    assert complete["properties"]["gpus"]["items"]["required"] == list(detect.GPU_KEYS)
    assert set(doc["$defs"]["gpu"]["properties"]) == set(detect.GPU_KEYS)
    assert tuple(doc["properties"]["visible_devices"]["properties"]) == detect.VISIBLE_ENV_VARS
    report, _ = run(NVIDIA_4, torch_info=None)
    assert set(report) == set(doc["properties"])


def test_the_walker_refuses_a_keyword_it_does_not_know():
    with pytest.raises(ValueError, match="minLength"):
        schema._check_keywords({"properties": {"hostname": {"minLength": 1}}}, "#")
