import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from deepfleet.errors import DeepfleetError, InputError
from deepfleet.jobs import inputs, submit
from deepfleet.machines import transfer


def _fails(call, *args) -> str:
    with pytest.raises(InputError) as info:
        call(*args)
    return str(info.value)


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _rows(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# ---------------------------------------------------------------- data


def test_good_data_passes(tmp_path: Path):
    jsonl = _write(
        tmp_path / "corpus.jsonl",
        _rows({"text": "a"}, "", {"prompt": "q", "completion": "a", "id": 3}, "   "),
    )
    inputs.check_data(jsonl)
    inputs.check_data(_write(tmp_path / "book.txt", "Once upon a time\n"))
    folder = tmp_path / "folder"
    _write(folder / "deep" / "x.jsonl", _rows({"text": "x"}))
    _write(folder / "notes.md", "")  # not data: the node skips it too
    inputs.check_data(folder)
    saved = tmp_path / "saved"
    _write(saved / "dataset_dict.json", '{"splits": ["train"]}')
    _write(saved / "train" / "data-00000-of-00001.arrow", b"\xff\x00")
    inputs.check_data(saved)


@pytest.mark.parametrize(
    "line, cause",
    [
        ('{"text": "a" "b"}', "not JSON (Expecting ',' delimiter, column 14)"),
        ('{"text": "a"', "not JSON (Expecting ',' delimiter, column 13)"),
        ('["text"]', "row is a list, not an object"),
        ('"text"', "row is a string, not an object"),
        ('{"a": 1, "b": 2}', 'row has neither "text" nor "prompt"+"completion" (keys: a, b)'),
        ("{}", 'row has neither "text" nor "prompt"+"completion" (no keys)'),
        ('{"prompt": "q"}', 'row has "prompt" but no "completion"'),
        ('{"completion": "a", "x": 1}', 'row has "completion" but no "prompt"'),
        ('{"text": 5}', '"text" is a number, not a string'),
        ('{"text": null}', '"text" is null, not a string'),
        ('{"text": true}', '"text" is a boolean, not a string'),
        (
            '{"prompt": "q", "completion": ["a"], "text": "t"}',
            '"completion" is a list, not a string',
        ),
    ],
)
def test_bad_jsonl_row_is_named_by_file_and_line(tmp_path: Path, line: str, cause: str):
    path = _write(tmp_path / "corpus.jsonl", _rows({"text": "ok"}, "", line, "{bad"))
    assert _fails(inputs.check_data, path) == f"data {path}:3: {cause}"


def test_bad_row_in_a_folder_names_the_file_inside_it(tmp_path: Path):
    _write(tmp_path / "d" / "a.jsonl", _rows({"text": "ok"}))
    bad = _write(tmp_path / "d" / "sub" / "b.jsonl", _rows({"text": "ok"}, {"txt": "typo"}))
    assert _fails(inputs.check_data, tmp_path / "d") == (
        f'data {bad}:2: row has neither "text" nor "prompt"+"completion" (keys: txt)'
    )


def test_not_utf8_names_line_and_byte(tmp_path: Path):
    path = _write(tmp_path / "c.txt", b"fine\nalso fine\ncaf\xe9\n")
    assert _fails(inputs.check_data, path) == f"data {path}:3: not UTF-8 (byte 0xe9 at column 4)"


def test_a_utf8_bom_fails_as_it_does_on_the_node(tmp_path: Path):
    # The node reads with encoding="utf-8", which keeps the BOM, and json.loads refuses it.
    path = _write(tmp_path / "c.jsonl", b"\xef\xbb\xbf" + _rows({"text": "a"}).encode())
    assert _fails(inputs.check_data, path).startswith(
        f"data {path}:1: not JSON (Unexpected UTF-8 BOM"
    )


def test_empty_and_missing_data(tmp_path: Path):
    empty = _write(tmp_path / "e.jsonl", "")
    assert _fails(inputs.check_data, empty) == f"data {empty} is empty"
    blank = _write(tmp_path / "b.txt", "\n  \n\t\n")
    assert _fails(inputs.check_data, blank) == f"data {blank} has only blank lines"
    folder = tmp_path / "nodata"
    _write(folder / "readme.md", "hi")
    assert _fails(inputs.check_data, folder) == f"data {folder} has no .txt or .jsonl files"
    assert (
        _fails(inputs.check_data, tmp_path / "gone") == f"data {tmp_path / 'gone'} does not exist"
    )
    csv = _write(tmp_path / "c.csv", "a,b\n")
    assert _fails(inputs.check_data, csv) == f"data {csv} is not a .txt or .jsonl file"
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "nowhere.jsonl")
    assert _fails(inputs.check_data, link) == f"data {link} is a broken symlink"


def test_an_empty_file_in_a_folder_is_named(tmp_path: Path):
    _write(tmp_path / "d" / "a.txt", "text")
    empty = _write(tmp_path / "d" / "b.txt", "")
    assert _fails(inputs.check_data, tmp_path / "d") == f"data {empty} is empty"


def test_broken_link_in_a_data_folder_is_named(tmp_path: Path):
    _write(tmp_path / "d" / "a.txt", "text")
    (tmp_path / "d" / "b.txt").symlink_to("../../blobs/abc")
    assert _fails(inputs.check_data, tmp_path / "d") == (
        f"{tmp_path / 'd' / 'b.txt'} is a broken symlink (to ../../blobs/abc)"
    )


def test_a_big_file_is_read_line_by_line(tmp_path: Path, monkeypatch):
    path = _write(tmp_path / "big.jsonl", _rows(*({"text": "x" * 100} for _ in range(20000))))
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("read whole"))
    monkeypatch.setattr(Path, "read_bytes", lambda *a, **k: pytest.fail("read whole"))
    inputs.check_data(path)


# ---------------------------------------------------------------- prompts


def test_prompts_from_text_and_jsonl(tmp_path: Path):
    text = _write(tmp_path / "p.txt", "Once upon a time\n\n  indented  \r\nlast")
    assert inputs.prompt_records(text).decode().splitlines() == [
        '{"prompt": "Once upon a time"}',
        '{"prompt": "  indented  "}',
        '{"prompt": "last"}',
    ]
    jsonl = _write(tmp_path / "p.jsonl", _rows({"prompt": "héllo", "id": 1}, "", {"prompt": "b"}))
    records = [json.loads(line) for line in inputs.prompt_records(jsonl).decode().splitlines()]
    assert records == [{"prompt": "héllo"}, {"prompt": "b"}]


@pytest.mark.parametrize(
    "line, cause",
    [
        (
            '{"prompt": "a",}',
            "not JSON (Expecting property name enclosed in double quotes, column 16)",
        ),
        ('{"text": "a"}', 'row has no "prompt" (keys: text)'),
        ('{"prompt": 3}', '"prompt" is a number, not a string'),
        ('{"prompt": " "}', '"prompt" is empty'),
        ("[1]", "row is a list, not an object"),
    ],
)
def test_bad_prompt_row_is_named_by_file_and_line(tmp_path: Path, line: str, cause: str):
    path = _write(tmp_path / "p.jsonl", _rows({"prompt": "ok"}, line))
    assert _fails(inputs.prompt_records, path) == f"prompts {path}:2: {cause}"


def test_no_prompts(tmp_path: Path):
    for name in ("p.jsonl", "p.txt"):
        path = _write(tmp_path / name, "\n \n")
        assert _fails(inputs.prompt_records, path) == f"prompts file {path} has no prompts"
    gone = tmp_path / "gone.txt"
    assert _fails(inputs.prompt_records, gone) == f"prompts file {gone} does not exist"
    bad = _write(tmp_path / "b.txt", b"ok\n\xff\n")
    assert (
        _fails(inputs.prompt_records, bad) == f"prompts {bad}:2: not UTF-8 (byte 0xff at column 1)"
    )


def test_inline_prompts(tmp_path: Path):
    records = submit._prompt_records(submit.InferRequest(prompts=["a b", "c"]))
    assert records == b'{"prompt": "a b"}\n{"prompt": "c"}\n'
    for prompts in ([], [""], ["", "  "]):
        with pytest.raises(
            InputError, match=r"^no prompt given \(PROMPT=\.\.\. or PROMPTS=file\)$"
        ):
            submit._prompt_records(submit.InferRequest(prompts=prompts))
    with pytest.raises(InputError, match="^--prompt 2 of 3 is empty$"):
        submit._prompt_records(submit.InferRequest(prompts=["a", " ", "c"]))
    path = _write(tmp_path / "p.jsonl", "{}\n")
    with pytest.raises(InputError, match=':1: row has no "prompt"'):
        submit._prompt_records(submit.InferRequest(prompts_file=str(path)))


# ---------------------------------------------------------------- model folders


def _model(folder: Path, **skip) -> Path:
    files = {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 8}),
        "tokenizer.json": "{}",
        "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " * 64,
    }
    for name, content in files.items():
        if name not in skip.get("without", ()):
            _write(folder / name, content)
    return folder


def test_a_complete_model_folder_is_itself(tmp_path: Path):
    folder = _model(tmp_path / "m")
    assert inputs.check_model_dir(folder) == folder


def test_sharded_weights_need_every_shard(tmp_path: Path):
    folder = _model(tmp_path / "m", without=("model.safetensors",))
    shards = [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    weight_map = {f"layer.{i}": shards[i % 5] for i in range(10)}
    _write(folder / "model.safetensors.index.json", json.dumps({"weight_map": weight_map}))
    for name in shards:
        _write(folder / name, b"x" * 2000)
    assert inputs.check_model_dir(folder) == folder
    for name in shards[1:]:
        (folder / name).unlink()
    assert _fails(inputs.check_model_dir, folder) == (
        f"model {folder}: model.safetensors.index.json names shards that are missing: "
        f"{shards[1]}, {shards[2]}, {shards[3]} and 1 more"
    )


def test_a_torch_index_beside_safetensors_is_not_needed(tmp_path: Path):
    # snapshot_download(allow_patterns=[*.json, *.safetensors]) leaves exactly this
    folder = _model(tmp_path / "m")
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}
    _write(folder / "pytorch_model.bin.index.json", json.dumps(index))
    assert inputs.check_model_dir(folder) == folder
    (folder / "model.safetensors").unlink()
    _write(folder / "pytorch_model-00002-of-00002.bin", b"x" * 2000)
    assert _fails(inputs.check_model_dir, folder) == (
        f"model {folder}: pytorch_model.bin.index.json names shards that are missing: "
        "pytorch_model-00001-of-00002.bin"
    )


@pytest.mark.parametrize(
    "change, cause",
    [
        (lambda f: (f / "config.json").unlink(), "model {f} has no config.json"),
        (
            lambda f: (f / "config.json").write_text('{"model_type": "llama",\n}'),
            "model {f}/config.json: not JSON (Expecting property name enclosed in double "
            "quotes, line 2)",
        ),
        (
            lambda f: (f / "config.json").write_text("[]"),
            "model {f}/config.json is a list, not a JSON object",
        ),
        (
            lambda f: (f / "config.json").write_text('{"hidden_size": 8}'),
            'model {f}/config.json has neither "model_type" nor "architectures"',
        ),
        (
            lambda f: (f / "tokenizer.json").unlink(),
            "model {f} has no tokenizer (tokenizer.json, tokenizer.model, vocab.json+merges.txt "
            "or vocab.txt)",
        ),
        (
            lambda f: ((f / "tokenizer.json").unlink(), (f / "vocab.json").write_text("{}")),
            "model {f} has vocab.json but no merges.txt (a BPE tokenizer needs both)",
        ),
        (
            lambda f: ((f / "tokenizer.json").unlink(), (f / "merges.txt").write_text("a b")),
            "model {f} has merges.txt but no vocab.json (a BPE tokenizer needs both)",
        ),
        (
            lambda f: (f / "model.safetensors").unlink(),
            "model {f} has no weights (*.safetensors or pytorch_model*.bin)",
        ),
        (
            lambda f: (f / "model.safetensors").write_text(
                "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"
            ),
            "model {f}/model.safetensors is a Git LFS pointer, not the weights "
            "(`git lfs pull` in {f})",
        ),
        (
            lambda f: (f / "generation_config.json").symlink_to("../blobs/gone"),
            "{f}/generation_config.json is a broken symlink (to ../blobs/gone)",
        ),
        (
            lambda f: _write(f / "model.safetensors.index.json", '{"metadata": {}}'),
            'model {f}/model.safetensors.index.json has no "weight_map"',
        ),
    ],
)
def test_an_incomplete_model_folder_says_what_is_missing(tmp_path: Path, change, cause):
    folder = _model(tmp_path / "m")
    change(folder)
    assert _fails(inputs.check_model_dir, folder) == cause.format(f=folder)


@pytest.mark.parametrize(
    "files",
    [
        {"tokenizer.model": b"sp"},
        {"vocab.json": "{}", "merges.txt": "a b"},
        {"vocab.txt": "[PAD]"},
    ],
)
def test_every_tokenizer_layout_is_accepted(tmp_path: Path, files):
    folder = _model(tmp_path / "m", without=("tokenizer.json",))
    for name, content in files.items():
        _write(folder / name, content)
    assert inputs.check_model_dir(folder) == folder


def test_missing_or_file_model(tmp_path: Path):
    gone = tmp_path / "gone"
    assert _fails(inputs.check_model_dir, gone) == f"model {gone} does not exist"
    file = _write(tmp_path / "model.safetensors", b"x")
    assert _fails(inputs.check_model_dir, file) == (
        f"model {file} is not a folder (a local model is a Hugging Face folder)"
    )


def _hub_cache(root: Path, commits=("c0ffee",), main: str | None = "c0ffee") -> Path:
    """models--org--name as huggingface_hub lays it out: snapshot files link into blobs/."""
    repo = root / "models--org--tiny"
    blobs = {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(),
        "tokenizer.json": b"{}",
        "model.safetensors": b"w" * 4096,
        "sub/special.txt": b"extra",
    }
    for name, content in blobs.items():
        blob = _write(repo / "blobs" / f"sha-{name.replace('/', '-')}", content)
        for commit in commits:
            link = repo / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    if main:
        _write(repo / "refs" / "main", main)
    return repo


def test_a_hub_cache_folder_stands_for_the_snapshot_refs_main_names(tmp_path: Path):
    repo = _hub_cache(tmp_path, commits=("aaaa", "c0ffee"))
    assert inputs.check_model_dir(repo) == repo / "snapshots" / "c0ffee"
    (repo / "refs" / "main").write_text("beef\n")
    assert _fails(inputs.check_model_dir, repo) == (
        f"model {repo}: refs/main names beef, which is not in snapshots/"
    )
    (repo / "refs" / "main").unlink()
    assert _fails(inputs.check_model_dir, repo) == (
        f"model {repo} has 2 snapshots and no refs/main; "
        f"give one of them, e.g. {repo / 'snapshots' / 'c0ffee'}"
    )


def test_a_hub_cache_folder_with_one_snapshot_and_no_ref(tmp_path: Path):
    repo = _hub_cache(tmp_path, main=None)
    assert inputs.check_model_dir(repo) == repo / "snapshots" / "c0ffee"


def test_a_hub_cache_snapshot_with_a_broken_link_names_it(tmp_path: Path):
    repo = _hub_cache(tmp_path)
    (repo / "blobs" / "sha-tokenizer.json").unlink()
    link = repo / "snapshots" / "c0ffee" / "tokenizer.json"
    assert _fails(inputs.check_model_dir, repo) == (
        f"{link} is a broken symlink (to ../../blobs/sha-tokenizer.json)"
    )


# ---------------------------------------------------------------- copying symlinked folders


def test_files_under_follows_links_and_survives_a_loop(tmp_path: Path):
    root = tmp_path / "root"
    _write(root / "a" / "f.txt", "f")
    (root / "a" / "up").symlink_to("..")  # a loop: root/a/up/a/up/...
    (root / "same").symlink_to("a")  # not a loop: a second name for a/
    assert [rel for rel, _ in inputs.files_under(root)] == ["a/f.txt", "same/f.txt"]


class _Container:
    """Stands in for a node container: records what push_local would send."""

    def __init__(self):
        self.archives = []

    def put_stream(self, path, chunks):
        self.archives.append((path, b"".join(chunks)))


def _node_digest(path: Path) -> str:
    """The shell the nodes run, run here (nodes set no locale: `sort` orders bytes)."""
    env = {**os.environ, "LC_ALL": "C"}
    return subprocess.run(
        ["sh", "-c", transfer._DIGEST, "digest", str(path)],
        capture_output=True, text=True, check=True, env=env,
    ).stdout.strip()  # fmt: skip


def test_a_symlinked_hub_snapshot_copies_as_files_with_a_stable_digest(tmp_path: Path, monkeypatch):
    repo = _hub_cache(tmp_path / "cache")
    (repo / "blobs" / "sha-model.safetensors").chmod(0o600)
    snapshot = inputs.check_model_dir(repo)
    # a symlinked directory too, as a hand-made layout may have
    (snapshot / "extra").symlink_to(snapshot / "sub", target_is_directory=True)
    container = _Container()
    monkeypatch.setattr(transfer, "digest", lambda *a: "missing")
    monkeypatch.setattr(transfer, "exec_text", lambda *a: "")
    monkeypatch.setattr(
        transfer, "put_stream", lambda c, path, chunks, node: c.put_stream(path, chunks)
    )
    assert transfer.push_local(container, snapshot, "/workspace/models/tiny", "lab1")
    [(target, archive)] = container.archives
    assert target == "/workspace/models/tiny" and archive == transfer.local_tar(snapshot)

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == [
        "config.json", "extra/special.txt", "model.safetensors", "sub/special.txt",
        "tokenizer.json",
    ]  # fmt: skip
    assert all(m.isreg() for m in members.values())
    assert members["model.safetensors"].mode == 0o600 and members["model.safetensors"].size == 4096

    landed = tmp_path / "landed"
    landed.mkdir()
    subprocess.run(["tar", "-xf", "-", "-C", str(landed)], input=archive, check=True)
    assert not any(p.is_symlink() for p in landed.rglob("*"))
    assert (landed / "model.safetensors").read_bytes() == b"w" * 4096
    assert _node_digest(landed) == transfer.local_digest(snapshot)

    # unchanged: the node's digest matches, so nothing is sent again
    monkeypatch.setattr(transfer, "digest", lambda *a: _node_digest(landed))
    assert not transfer.push_local(container, snapshot, "/workspace/models/tiny", "lab1")
    assert len(container.archives) == 1
    (repo / "blobs" / "sha-tokenizer.json").write_bytes(b'{"changed": 1}')
    assert transfer.push_local(container, snapshot, "/workspace/models/tiny", "lab1")


def test_input_errors_are_one_line_without_a_node(tmp_path: Path):
    error = InputError(f"data {tmp_path}/c.jsonl:3: row is a list, not an object")
    assert isinstance(error, DeepfleetError) and error.node is None
    assert error.one_line() == str(error)
