"""Inputs: data, prompts and model folders, checked on this machine before anything is sent.

A bad row found here is one line naming file:line; found by the ranks, it is a traceback
per rank on every node after the model has crossed the network. The rules follow what the
node side reads (images/node/deepfleet_node/data.py and infer/prompts.py). Files are read line by
line, so a large corpus is never held in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from deepfleet.errors import InputError
from deepfleet.machines.transfer import files_under

DATA_SUFFIXES = (".txt", ".jsonl")
# Marker files that datasets.Dataset(Dict).save_to_disk leaves behind; its Arrow files are
# read by the node with `datasets`, which this machine need not have.
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# What a clone without git-lfs leaves instead of the weights.
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


# ---------------------------------------------------------------- folders as they are copied


# ---------------------------------------------------------------- reading lines


def _lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, decoded as the node decodes it (UTF-8).

    Split on bytes, so a bad byte is reported on its own line rather than somewhere in a
    decoder's chunk.
    """
    try:
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    byte = raw[exc.start]
                    raise InputError(
                        f"{what} {path}:{lineno}: not UTF-8 (byte 0x{byte:02x} at column "
                        f"{exc.start + 1})"
                    ) from exc
                if line.strip():
                    yield lineno, line
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _json_row(line: str, where: str) -> dict:
    try:
        # Without its newline, so an unfinished row is reported at its own end, not at
        # column 1 of a line that is not there.
        row = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not JSON ({exc.msg}, column {exc.colno})") from exc
    if not isinstance(row, dict):
        raise InputError(f"{where}: row is {_json_type(row)}, not an object")
    return row


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: a bool is an int to Python
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _strings(row: dict, keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if not isinstance(row[key], str):
            raise InputError(f'{where}: "{key}" is {_json_type(row[key])}, not a string')


def _keys(row: dict) -> str:
    return f"keys: {', '.join(sorted(row))}" if row else "no keys"


# ---------------------------------------------------------------- training data


def check_data(path: Path) -> None:
    """Raise InputError unless the node's loader will read `path` without an error.

    A .txt or .jsonl file, a folder holding them (searched recursively), or a
    datasets.save_to_disk folder, accepted as it is.
    """
    if not path.exists():
        broken = path.is_symlink()
        raise InputError(f"data {path} {'is a broken symlink' if broken else 'does not exist'}")
    if path.is_dir():
        if any((path / marker).exists() for marker in HF_DISK_MARKERS):
            return
        files = [path / rel for rel, _ in files_under(path) if rel.endswith(DATA_SUFFIXES)]
        if not files:
            raise InputError(f"data {path} has no .txt or .jsonl files")
    elif path.name.endswith(DATA_SUFFIXES):
        files = [path]
    else:
        raise InputError(f"data {path} is not a .txt or .jsonl file")
    for file in files:
        _check_data_file(file)


def _check_data_file(path: Path) -> None:
    rows = 0
    for lineno, line in _lines(path, "data"):
        rows += 1
        if path.suffix == ".jsonl":
            _check_example(_json_row(line, f"data {path}:{lineno}"), f"data {path}:{lineno}")
    if rows == 0:
        empty = path.stat().st_size == 0
        raise InputError(f"data {path} {'is empty' if empty else 'has only blank lines'}")


def _check_example(row: dict, where: str) -> None:
    # The node's rule: prompt+completion wins over text when a row has all three.
    if "prompt" in row and "completion" in row:
        _strings(row, ("prompt", "completion"), where)
    elif "text" in row:
        _strings(row, ("text",), where)
    elif "prompt" in row or "completion" in row:
        have, lack = ("prompt", "completion") if "prompt" in row else ("completion", "prompt")
        raise InputError(f'{where}: row has "{have}" but no "{lack}"')
    else:
        raise InputError(
            f'{where}: row has neither "text" nor "prompt"+"completion" ({_keys(row)})'
        )


# ---------------------------------------------------------------- prompts


def prompt_records(path: Path) -> bytes:
    """The prompts file as the JSONL the ranks read: one {"prompt": ...} per prompt.

    A .jsonl file's rows each need a "prompt" string (other fields are dropped); any other
    file is one prompt per non-blank line.
    """
    if not path.exists():
        raise InputError(f"prompts file {path} does not exist")
    if path.is_dir():
        raise InputError(f"prompts file {path} is a folder")
    prompts = []
    for lineno, line in _lines(path, "prompts"):
        if path.suffix == ".jsonl":
            prompts.append(_prompt_of(_json_row(line, f"prompts {path}:{lineno}"), path, lineno))
        else:
            prompts.append(line.rstrip("\r\n"))
    if not prompts:
        raise InputError(f"prompts file {path} has no prompts")
    return "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts).encode()


def _prompt_of(row: dict, path: Path, lineno: int) -> str:
    where = f"prompts {path}:{lineno}"
    if "prompt" not in row:
        raise InputError(f'{where}: row has no "prompt" ({_keys(row)})')
    _strings(row, ("prompt",), where)
    if not row["prompt"].strip():
        raise InputError(f'{where}: "prompt" is empty')
    return row["prompt"]


# ---------------------------------------------------------------- model folders


def check_model_dir(path: Path) -> Path:
    """The folder to copy for a local HF model, once it has a config, a tokenizer and weights.

    An HF hub cache folder (models--org--name, with refs/ and snapshots/) stands for the
    snapshot refs/main names, or its only snapshot.
    """
    if not path.exists():
        broken = path.is_symlink()
        raise InputError(f"model {path} {'is a broken symlink' if broken else 'does not exist'}")
    if not path.is_dir():
        raise InputError(f"model {path} is not a folder (a local model is a Hugging Face folder)")
    folder = _snapshot(path) if _is_hub_cache(path) else path
    files_under(folder)  # every link resolves, or the copy would fail half way
    _check_config(folder)
    _check_tokenizer(folder)
    _check_weights(folder)
    return folder


def _is_hub_cache(path: Path) -> bool:
    return (path / "refs").is_dir() and (path / "snapshots").is_dir()


def _snapshot(repo: Path) -> Path:
    ref = repo / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        snapshot = repo / "snapshots" / commit
        if not snapshot.is_dir():
            raise InputError(f"model {repo}: refs/main names {commit}, which is not in snapshots/")
        return snapshot
    snapshots = sorted(p for p in (repo / "snapshots").iterdir() if p.is_dir())
    if not snapshots:
        raise InputError(f"model {repo} has no snapshots (an interrupted download?)")
    if len(snapshots) > 1:
        raise InputError(
            f"model {repo} has {len(snapshots)} snapshots and no refs/main; "
            f"give one of them, e.g. {snapshots[-1]}"
        )
    return snapshots[0]


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"model {path}: not JSON ({exc.msg}, line {exc.lineno})") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"model {path}: not UTF-8") from exc
    except OSError as exc:
        raise InputError(f"cannot read model {path}: {exc.strerror}") from exc


def _check_config(folder: Path) -> None:
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"model {folder} has no config.json")
    config = _load_json(path)
    if not isinstance(config, dict):
        raise InputError(f"model {path} is {_json_type(config)}, not a JSON object")
    if "model_type" not in config and "architectures" not in config:
        raise InputError(f'model {path} has neither "model_type" nor "architectures"')


def _check_tokenizer(folder: Path) -> None:
    names = {p.name for p in folder.iterdir() if p.is_file()}
    # tokenizer.json (fast), a sentencepiece *.model, a tiktoken file, BPE vocab+merges,
    # WordPiece vocab.txt: any one is something AutoTokenizer can load.
    if "tokenizer.json" in names or "vocab.txt" in names:
        return
    if any(n.endswith((".model", ".tiktoken")) for n in names):
        return
    if {"vocab.json", "merges.txt"} <= names:
        return
    if "vocab.json" in names or "merges.txt" in names:
        have, lack = ("vocab.json", "merges.txt")
        if "merges.txt" in names:
            have, lack = lack, have
        raise InputError(f"model {folder} has {have} but no {lack} (a BPE tokenizer needs both)")
    raise InputError(
        f"model {folder} has no tokenizer (tokenizer.json, tokenizer.model, "
        "vocab.json+merges.txt or vocab.txt)"
    )


def _check_weights(folder: Path) -> None:
    weights = sorted(p for p in folder.iterdir() if _is_weights(p))
    # transformers loads safetensors when there are any, so a pytorch_model.bin.index.json
    # left beside them (its shards filtered out of a download) does not matter.
    safetensors = any(p.suffix == ".safetensors" for p in weights)
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file() and (index.startswith("model.") or not safetensors):
            _check_shards(folder, folder / index)
    if not weights:
        raise InputError(f"model {folder} has no weights (*.safetensors or pytorch_model*.bin)")
    for path in weights:
        _check_not_lfs_pointer(path)


def _is_weights(path: Path) -> bool:
    name = path.name
    torch_bin = name.startswith("pytorch_model") and name.endswith(".bin")
    return (name.endswith(".safetensors") or torch_bin) and path.is_file()


def _check_shards(folder: Path, index: Path) -> None:
    data = _load_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f'model {index} has no "weight_map"')
    missing = sorted({s for s in map(str, weight_map.values()) if not (folder / s).is_file()})
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3]) + more
        raise InputError(f"model {folder}: {index.name} names shards that are missing: {shown}")


def _check_not_lfs_pointer(path: Path) -> None:
    if path.stat().st_size > 1024:
        return
    with path.open("rb") as fh:
        if fh.read(len(LFS_POINTER)) == LFS_POINTER:
            raise InputError(
                f"model {path} is a Git LFS pointer, not the weights "
                f"(`git lfs pull` in {path.parent})"
            )
