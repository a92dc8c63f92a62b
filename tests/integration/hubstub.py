"""A local stand-in for the Hugging Face hub, for tests that must exercise a real download.

    with HubStub("127.0.0.1", {"example-org/tiny": model_dir}, token="hf_...") as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_..."}
        ...  # huggingface_hub.snapshot_download("example-org/tiny") now works for real
        assert all(r.authorized for r in hub.requests if r.repo)  # PUBLIC ones need none

It serves each repo from a local folder (read once, at construction) through the endpoints
that `snapshot_download` / `hf_hub_download` call (huggingface_hub 1.x-2.x):

    GET  /api/models/{repo}[/revision/{rev}]      model info; its "sha" is the commit
    GET  /api/models/{repo}/tree/{rev}[/{path}]   the file listing (recursive=true)
    HEAD /{repo}/resolve/{rev}/{file}             metadata: X-Repo-Commit, ETag, Content-Length,
                                                  and X-Linked-Etag / X-Linked-Size for LFS files
    GET  /{repo}/resolve/{rev}/{file}             the bytes (Range honoured)

    GET  /api/agent-harnesses                     public (no token needed): an empty registry;
                                                  huggingface_hub 2.x asks for it, without
                                                  credentials, to fill in its User-Agent

No Xet metadata is ever sent (no xetHash in the tree, no X-Xet-* headers), so clients fall
back to plain HTTP downloads even when hf_xet is installed. Revisions are "main" or the
repo's commit hash (a sha1 of its contents).

With a token, every request but those to PUBLIC paths must carry `Authorization: Bearer
<token>`; others get the hub's 401s (RepoNotFound when no credentials came, "Invalid
credentials in Authorization header" for a wrong one), which huggingface_hub raises as
RepositoryNotFoundError / HfHubHTTPError. Every request is recorded (method, path, client
address, the repo it was about, whether the expected token came, whether the token
appeared anywhere else in the request), never the token or any credential itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

# What the hub's default .gitattributes stores in LFS (the part a model repo uses).
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".model", ".onnx",
    ".npy", ".npz", ".pkl", ".pickle", ".gz", ".zip", ".tar", ".gguf",
)  # fmt: skip
DEFAULT_BRANCH = "main"
BAD_CREDENTIALS = "Invalid credentials in Authorization header"
REDACTED = "<token>"  # what a record shows where a request carried the token elsewhere

# Repo ids are "org/name" or "name"; the two-part form is tried first.
_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"
# Endpoints the hub serves to anyone, which clients call without credentials.
PUBLIC = {
    # huggingface_hub >= 2.x: the AI-agent registry it fetches (once a day, into
    # HF_HOME/.agent_harnesses.json) to fill its User-Agent, unless HF_HUB_DISABLE_TELEMETRY.
    "/api/agent-harnesses": {"standardEnvVars": [], "harnesses": {}},
}
ROUTES = [
    ("info", re.compile(rf"^/api/models/{_REPO}/revision/(?P<rev>[^/]+)$")),
    ("tree", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")),
    ("info", re.compile(rf"^/api/models/{_REPO}$")),
    ("resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]


@dataclass(frozen=True)
class Request:
    """One request the stub answered. No credential is ever kept."""

    method: str
    path: str  # without the query string; the token, if a client put it there, redacted
    query: str  # likewise redacted
    client: str  # the peer's IP address
    repo: str | None  # the repo the request was about; None for other endpoints
    auth: str  # "token" (the expected one), "none" (no Authorization header), "other"
    token_elsewhere: bool  # the expected token appeared outside the Authorization header
    status: int

    @property
    def authorized(self) -> bool:
        return self.auth == "token"


@dataclass(frozen=True)
class RepoFile:
    path: str
    data: bytes
    blob_oid: str  # git blob sha1 of what git stores (the pointer, for LFS files)
    sha256: str
    lfs: bool
    pointer_size: int

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_oid


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    ).encode()


def load_repo(folder: Path) -> tuple[str, dict[str, RepoFile]]:
    """Every file under `folder` (dotfiles skipped), and a commit hash for that content."""
    files: dict[str, RepoFile] = {}
    for item in sorted(Path(folder).rglob("*")):
        rel = item.relative_to(folder).as_posix()
        if not item.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        data = item.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        lfs = rel.endswith(LFS_SUFFIXES)
        stored = _lfs_pointer(sha256, len(data)) if lfs else data
        files[rel] = RepoFile(rel, data, _git_blob_oid(stored), sha256, lfs, len(stored))
    if not files:
        raise ValueError(f"{folder}: no files to serve")
    commit = hashlib.sha1(
        "".join(f"{f.path}\0{f.blob_oid}\n" for f in files.values()).encode()
    ).hexdigest()
    return commit, files


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address, handler, stub: HubStub):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.stub = stub
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub; every answer has a length
    server_version = "hubstub"
    timeout = 60
    server: _Server

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):  # noqa: A002  (http.server's signature)
        pass  # the records are the log

    def do_GET(self):
        self._handle()

    def do_HEAD(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def _handle(self):
        stub = self.server.stub
        split = urlsplit(self.path)
        auth, elsewhere = stub._credentials(self.requestline, self.headers)
        kind, parts = stub._route(split.path)
        if kind is None:
            parts = {"path": split.path}
        status, headers, body = stub._answer(
            self.command, kind, parts, auth, self.headers.get("Range")
        )
        length = self.headers.get("Content-Length")
        if length and self.command not in ("GET", "HEAD"):
            self.rfile.read(int(length))  # drain, so keep-alive stays in step
        # Recorded before answering: once a client has its answer, the record is there.
        stub._record(
            Request(
                method=self.command,
                path=stub._redact(unquote(split.path)),
                query=stub._redact(split.query),
                client=self.client_address[0],
                repo=parts.get("repo"),
                auth=auth,
                token_elsewhere=elsewhere,
                status=status,
            )
        )
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))  # HEAD: what GET would send
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)


class HubStub:
    """A threaded HTTP server that looks like the hub to huggingface_hub, for `repos`.

    host: the address to bind (a lab network's gateway, or 127.0.0.1); port 0 picks one.
    repos: repo id ("org/name") -> local folder holding the repo's files.
    token: when set, required as `Authorization: Bearer <token>` on all but PUBLIC paths.
    """

    def __init__(
        self, host: str, repos: Mapping[str, Path | str], token: str | None = None, port: int = 0
    ):
        self.host = host
        self._token = token.encode() if token else None
        self._repos = {repo: load_repo(Path(folder)) for repo, folder in repos.items()}
        self._records: list[Request] = []
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler, self)
        self._thread: threading.Thread | None = None

    # -- what tests read ----------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def requests(self) -> list[Request]:
        """A copy of the records so far, in the order the answers were sent."""
        with self._lock:
            return list(self._records)

    def commit(self, repo: str) -> str:
        return self._repos[repo][0]

    def files(self, repo: str) -> dict[str, bytes]:
        return {path: f.data for path, f in self._repos[repo][1].items()}

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> HubStub:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name=f"hubstub-{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> HubStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the handler's helpers ----------------------------------------------------------

    def _record(self, request: Request) -> None:
        with self._lock:
            self._records.append(request)

    def _redact(self, text: str) -> str:
        if self._token is None:
            return text
        token = self._token.decode()
        for form in (token, quote(token, safe="")):
            text = text.replace(form, REDACTED)
        return text

    def _credentials(self, requestline: str, headers) -> tuple[str, bool]:
        """("token" | "none" | "other", whether the token showed up outside Authorization)."""
        presented = headers.get("Authorization")
        if presented is None:
            auth = "none"
        else:
            scheme, _, value = presented.strip().partition(" ")
            ok = (
                self._token is not None
                and scheme.lower() == "bearer"
                and hmac.compare_digest(value.strip().encode(), self._token)
            )
            auth = "token" if ok else "other"
        elsewhere = False
        if self._token is not None:
            token = self._token.decode()
            others = [v for k, v in headers.items() if k.lower() != "authorization"]
            elsewhere = any(token in text for text in (requestline, unquote(requestline), *others))
        return auth, elsewhere

    def _route(self, raw_path: str) -> tuple[str | None, dict]:
        """(route kind, its parts) for a path; (None, {}) when it is no repo endpoint."""
        for kind, pattern in ROUTES:
            match = pattern.match(raw_path)
            if match is not None:
                return kind, {k: unquote(v) if v else None for k, v in match.groupdict().items()}
        return None, {}

    def _answer(self, method: str, kind: str | None, parts: dict, auth: str, byte_range=None):
        """(status, headers, body) for one request; HEAD gets the same minus the body."""
        if kind is None and method == "GET" and PUBLIC.get(parts.get("path", "")) is not None:
            return _json(200, PUBLIC[parts["path"]])
        if self._token is not None and auth != "token":
            if auth == "none":
                return _error(401, "Repository Not Found", code="RepoNotFound")
            return _error(401, BAD_CREDENTIALS, message=BAD_CREDENTIALS)
        if kind is None:
            return _error(404, "Sorry, we can't find the page you are looking for.")
        if parts["repo"] not in self._repos:
            return _error(404, "Repository not found", code="RepoNotFound")
        if method not in ("GET", "HEAD"):
            return _error(405, "Method not allowed")
        commit, files = self._repos[parts["repo"]]
        rev = parts.get("rev") or DEFAULT_BRANCH
        if rev not in (DEFAULT_BRANCH, commit):
            return _error(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        if kind == "info":
            return _json(200, self._model_info(parts["repo"], commit, files))
        if kind == "tree":
            return self._tree(commit, files, parts.get("path") or "")
        return self._resolve(commit, files, parts["path"], byte_range if method == "GET" else None)

    def _model_info(self, repo: str, commit: str, files: dict[str, RepoFile]) -> dict:
        author = repo.split("/")[0] if "/" in repo else None
        when = "2024-01-01T00:00:00.000Z"
        return {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
            "id": repo,
            "modelId": repo,
            "author": author,
            "sha": commit,
            "lastModified": when,
            "createdAt": when,
            "private": self._token is not None,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": "transformers",
            "siblings": [{"rfilename": path} for path in files],
        }

    def _tree(self, commit: str, files: dict[str, RepoFile], under: str):
        under = under.strip("/")
        prefix = f"{under}/" if under else ""
        if under and under not in files and not any(p.startswith(prefix) for p in files):
            return _error(404, f"{under} does not exist", code="EntryNotFound", commit=commit)
        folders: set[str] = set()
        entries = []
        for path, f in files.items():
            if not path.startswith(prefix):
                continue
            parts = path.split("/")
            for depth in range(1, len(parts)):
                folders.add("/".join(parts[:depth]))
            entry = {"type": "file", "oid": f.blob_oid, "size": len(f.data), "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": f.pointer_size}
            entries.append(entry)
        for folder in sorted(folders):
            if folder.startswith(prefix):
                oid = hashlib.sha1(f"tree {folder}".encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
        entries.sort(key=lambda e: e["path"])
        return _json(200, entries)

    def _resolve(self, commit: str, files: dict[str, RepoFile], path: str, byte_range=None):
        f = files.get(path)
        if f is None:
            return _error(404, "Entry not found", code="EntryNotFound", commit=commit)
        headers = [
            ("X-Repo-Commit", commit),
            ("ETag", f'"{f.etag}"'),
            ("Accept-Ranges", "bytes"),
            ("Content-Type", "application/octet-stream"),
            ("Content-Disposition", f"inline; filename*=UTF-8''{quote(path.split('/')[-1])}"),
        ]
        if f.lfs:
            headers += [("X-Linked-Etag", f'"{f.sha256}"'), ("X-Linked-Size", str(len(f.data)))]
        span = _byte_span(byte_range, len(f.data))
        if span is None:
            return 200, headers, f.data
        start, end = span
        if start >= len(f.data):
            return 416, [("Content-Range", f"bytes */{len(f.data)}")], b""
        headers.append(("Content-Range", f"bytes {start}-{end}/{len(f.data)}"))
        return 206, headers, f.data[start : end + 1]


def _byte_span(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `Range: bytes=a-b` / `a-` / `-n`; None for the whole."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header or "")
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        return max(size - int(last), 0), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


def _json(status: int, payload, extra=()) -> tuple[int, list, bytes]:
    body = json.dumps(payload).encode()
    return status, [("Content-Type", "application/json; charset=utf-8"), *extra], body


def _error(
    status: int, error: str, *, code: str | None = None, message: str | None = None,
    commit: str | None = None,
) -> tuple[int, list, bytes]:  # fmt: skip
    """An error as the hub sends it: a JSON {"error": ...} and X-Error-Code / -Message."""
    extra = []
    if code:
        extra.append(("X-Error-Code", code))
    if message:
        extra.append(("X-Error-Message", message))
    if commit:
        extra.append(("X-Repo-Commit", commit))
    if status == 401:
        extra.append(
            ("WWW-Authenticate", 'Bearer realm="Authentication required", charset="UTF-8"')
        )
    return _json(status, {"error": error}, extra)


def network_gateway(client, network: str) -> str:
    """The IPv4 gateway of a docker network: the host's address as its containers reach it.

    client: a docker-py DockerClient. A stub bound here is reachable from the network's
    containers, and from containers that share those containers' network namespace.
    """
    attrs = client.networks.get(network).attrs
    for config in (attrs.get("IPAM") or {}).get("Config") or []:
        gateway = (config.get("Gateway") or "").split("/")[0]
        if gateway and ":" not in gateway:
            return gateway
    raise LookupError(f"docker network {network} has no IPv4 gateway: {attrs.get('IPAM')}")
