"""The hub stand-in (hubstub.py) against the real huggingface_hub download path.

The download tests need huggingface_hub in this interpreter and are skipped without it;
the rest (the stub's own HTTP answers) need nothing but the standard library. No test
here needs Docker or a network beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hubstub import HubStub, network_gateway

REPO = "example-org/tiny"
TOKEN = "hf_secretTOKEN123"
# What deepfleet's prefetch step runs on every node (orchestrator/deepfleet/jobs.py).
PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "tokenizer*"]
DOWNLOAD = (
    "import sys; from huggingface_hub import snapshot_download; "
    f"print(snapshot_download(sys.argv[1], allow_patterns={PATTERNS!r}))"
)


def tiny_safetensors(path: Path) -> None:
    """A valid one-tensor safetensors file (8x8 float32), written without the package."""
    data = struct.pack("<64f", *range(64))
    header = json.dumps(
        {"weight": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, len(data)]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (repo / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (repo / "tokenizer_config.json").write_text("{}\n")
    tiny_safetensors(repo / "model.safetensors")
    (repo / "sub" / "notes.txt").write_text("nested files come along too\n")
    (repo / "README.md").write_text("# not in the allow patterns\n")
    return repo


@pytest.fixture
def hub(model_dir):
    with HubStub("127.0.0.1", {REPO: model_dir}, token=TOKEN) as stub:
        yield stub


def download(hub: HubStub, home: Path, token: str | None) -> subprocess.CompletedProcess:
    """snapshot_download in a fresh interpreter, with only the hub settings we give it
    (as deepfleet's prefetch step runs it: telemetry left on, so every request it makes
    by default is seen)."""
    pytest.importorskip("huggingface_hub")
    drop = ("HF_", "HUGGING_FACE_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(drop)}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(home),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-c", DOWNLOAD, REPO],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_snapshot_download_gets_the_allowed_files_byte_identical(hub, model_dir, tmp_path):
    home = tmp_path / "hf-home"
    result = download(hub, home, TOKEN)
    assert result.returncode == 0, result.stderr[-3000:]
    snapshot = Path(result.stdout.strip().splitlines()[-1])
    assert snapshot.name == hub.commit(REPO)
    got = files_under(snapshot)
    want = {k: v for k, v in files_under(model_dir).items() if k != "README.md"}
    assert sorted(got) == sorted(want)
    assert got == want  # byte-identical (the cache's symlinks read through to the blobs)

    seen = hub.requests
    about_repo = [r for r in seen if r.repo is not None]
    assert about_repo and all(r.repo == REPO for r in about_repo), seen
    assert all(r.authorized and r.status in (200, 206) for r in about_repo), seen
    others = [r for r in seen if r.repo is None]  # public endpoints only, answered
    assert all(r.status == 200 for r in others), others
    assert not any(r.token_elsewhere for r in seen), seen
    paths = {(r.method, r.path) for r in seen}
    assert ("GET", f"/api/models/{REPO}/revision/main") in paths
    commit = hub.commit(REPO)
    for name in want:
        assert ("GET", f"/{REPO}/resolve/{commit}/{name}") in paths, (name, sorted(paths))
    assert not any(r.path.endswith("README.md") for r in seen)
    # The client keeps no copy of a token it was handed through the environment.
    assert TOKEN not in result.stdout + result.stderr
    leaked = [name for name, data in files_under(home).items() if TOKEN.encode() in data]
    assert leaked == []


@pytest.mark.parametrize(
    ("token", "error", "auth"),
    [
        (None, "RepositoryNotFoundError", "none"),
        ("hf_wrongTOKEN", "Invalid credentials in Authorization header", "other"),
    ],
)
def test_a_missing_or_wrong_token_fails_with_the_hub_auth_error(hub, tmp_path, token, error, auth):
    home = tmp_path / "hf-home"
    result = download(hub, home, token)
    assert result.returncode != 0
    assert error in result.stderr and "401" in result.stderr, result.stderr[-3000:]
    seen = [r for r in hub.requests if r.repo is not None]
    assert seen and all(r.auth == auth and r.status == 401 for r in seen), hub.requests
    assert not [p for p in files_under(home) if "/blobs/" in p]


def get(url: str, token: str | None = TOKEN, method: str = "GET", **headers):
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_resolve_headers_are_the_hubs_and_carry_no_xet(hub, model_dir):
    commit = hub.commit(REPO)
    data = (model_dir / "model.safetensors").read_bytes()
    status, headers, body = get(
        f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors", method="HEAD"
    )
    assert (status, body) == (200, b"")
    assert headers["X-Repo-Commit"] == commit
    assert headers["Content-Length"] == headers["X-Linked-Size"] == str(len(data))
    assert headers["ETag"] == headers["X-Linked-Etag"]  # LFS: the sha256
    assert not [h for h in headers if h.lower().startswith("x-xet")]
    status, headers, body = get(
        f"{hub.endpoint}/{REPO}/resolve/{commit}/config.json", method="HEAD"
    )
    assert status == 200 and "X-Linked-Etag" not in headers and len(headers["ETag"]) == 42
    status, headers, body = get(
        f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors", Range="bytes=10-"
    )
    assert status == 206 and body == data[10:]
    assert headers["Content-Range"] == f"bytes 10-{len(data) - 1}/{len(data)}"
    status, _, body = get(f"{hub.endpoint}/api/models/{REPO}/tree/{commit}?recursive=true")
    entries = {e["path"]: e for e in json.loads(body)}
    assert entries["sub"]["type"] == "directory"
    assert entries["model.safetensors"]["lfs"]["size"] == len(data)
    assert not any("xetHash" in e for e in entries.values())


def test_errors_look_like_the_hubs(hub):
    base = hub.endpoint
    status, headers, body = get(f"{base}/api/models/{REPO}/revision/main", token=None)
    assert status == 401 and headers["X-Error-Code"] == "RepoNotFound"
    assert json.loads(body) == {"error": "Repository Not Found"}
    status, headers, _ = get(f"{base}/api/models/{REPO}/revision/main", token="hf_nope")
    assert status == 401 and headers["X-Error-Message"].startswith("Invalid credentials")
    assert get(f"{base}/other-org/x/resolve/main/a")[1]["X-Error-Code"] == "RepoNotFound"
    assert get(f"{base}/{REPO}/resolve/dev/config.json")[1]["X-Error-Code"] == "RevisionNotFound"
    status, headers, _ = get(f"{base}/{REPO}/resolve/main/missing.bin")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    assert headers["X-Repo-Commit"] == hub.commit(REPO)


def test_public_endpoints_need_no_token(hub):
    status, _, body = get(f"{hub.endpoint}/api/agent-harnesses", token=None)
    assert status == 200 and json.loads(body)["harnesses"] == {}
    assert get(f"{hub.endpoint}/api/whoami-v2", token=None)[0] == 401
    assert [(r.repo, r.auth) for r in hub.requests] == [(None, "none"), (None, "none")]


def test_records_never_hold_the_token(hub):
    get(f"{hub.endpoint}/api/models/{REPO}", token=TOKEN)
    get(f"{hub.endpoint}/api/models/{REPO}?leak={TOKEN}", token=None)
    get(f"{hub.endpoint}/api/models/{REPO}", token=None, **{"X-Forwarded": TOKEN})
    seen = hub.requests
    assert [r.authorized for r in seen] == [True, False, False]
    assert [r.repo for r in seen] == [REPO] * 3
    assert [r.token_elsewhere for r in seen] == [False, True, True]
    assert all(r.client == "127.0.0.1" for r in seen)
    assert seen[1].query == "leak=<token>"
    assert TOKEN not in repr(seen)


def test_without_a_token_the_stub_serves_anyone(model_dir):
    with HubStub("127.0.0.1", {REPO: model_dir}) as stub:
        status, _, body = get(f"{stub.endpoint}/api/models/{REPO}/revision/main", token=None)
        assert status == 200 and json.loads(body)["sha"] == stub.commit(REPO)
        assert stub.requests[0].auth == "none"
        assert stub.endpoint.startswith("http://127.0.0.1:") and stub.port > 0


def test_network_gateway_reads_the_ipam_config():
    class Networks:
        def get(self, name):
            assert name == "deepfleet-lab-net"
            config = [{"Subnet": "fd00::/64", "Gateway": "fd00::1"},
                      {"Subnet": "172.30.0.0/16", "Gateway": "172.30.0.1"}]  # fmt: skip
            return type("Net", (), {"attrs": {"IPAM": {"Config": config}}})()

    client = type("Client", (), {"networks": Networks()})()
    assert network_gateway(client, "deepfleet-lab-net") == "172.30.0.1"
