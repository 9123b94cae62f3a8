"""A loopback server speaking the part of the Hugging Face Hub protocol that uploads and downloads use.

`huggingface_hub` 2.x sends its HTTP through `httpx2`, which request-mocking libraries do not intercept, so
tests that push to "the Hub" talk to this real HTTP server on 127.0.0.1 instead (stdlib `http.server` only).
It keeps git-like state: every commit is an immutable snapshot `{path: blob sha1}` and branches point at
commits; blobs are stored in a directory (a pytest `tmp_path`).

Endpoints (the ones huggingface_hub 2.4 calls for `create_repo`, `create_branch`, `upload_folder`,
`create_commit`, `hf_hub_download`, `snapshot_download`, `repo_info`, `list_repo_tree`, `list_repo_refs`, and
that transformers' `from_pretrained` / `pipeline` reach through them):

    POST   /api/repos/create                               {name, organization, visibility|private, type}
    DELETE /api/repos/delete
    POST   /api/validate-yaml                              README metadata must be a YAML mapping
    GET    /api/whoami-v2
    POST   /api/{type}s/{repo}/preupload/{rev}             every file answered uploadMode "regular" (inline)
    POST   /api/{type}s/{repo}/commit/{rev}                NDJSON: header, file (base64), deletedFile/Folder
    POST   /api/{type}s/{repo}/branch/{branch}             {startingPoint}
    GET    /api/{type}s/{repo}/refs
    GET    /api/{type}s/{repo}[/revision/{rev}]            repo info: sha, siblings, private, ...
    GET    /api/{type}s/{repo}/tree/{rev}[/{path}]         ?recursive=
    HEAD   /[{type}s/]{repo}/resolve/{rev}/{path}          ETag, X-Repo-Commit, Content-Length
    GET    /[{type}s/]{repo}/resolve/{rev}/{path}          (Range: bytes=N- supported)

Errors carry the Hub's `X-Error-Code` header (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`), which is
what `huggingface_hub.utils.hf_raise_for_status` turns into its typed exceptions. Anything else answers 404
and is recorded in `LoopbackHub.unhandled` so tests can see what a client tried.

Usage::

    with LoopbackHub(tmp_path) as hub:
        HfApi(endpoint=hub.endpoint, token=hub.token).create_repo("user/model")
        subprocess.run(..., env={**os.environ, **hub.client_env(tmp_path / "hf_home")})

`tests/conftest.py` provides it as the `hub_server` fixture.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPES = ("model", "dataset", "space")
DEFAULT_BRANCH = "main"
DEFAULT_USER = "loopback-user"
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def closed_port() -> int:
    """A loopback port that was free a moment ago: connecting to it is refused (a Hub that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def stalled_endpoint() -> Iterator[str]:
    """The URL of a server that accepts connections (the kernel completes them) and never answers: a Hub that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid / ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, str]  # path -> blob sha1
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        revision = revision.removeprefix("refs/heads/")
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if _COMMIT_SHA.match(revision) and revision in self.commits:
            return self.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class HubStore:
    """Repositories, commits and branches in memory; file contents as blobs under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self._counter = 0

    # -- blobs
    def put_blob(self, content: bytes) -> str:
        oid = git_blob_sha1(content)
        path = self.blobs / oid
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(content)
            tmp.replace(path)
        return oid

    def blob_path(self, oid: str) -> Path:
        return self.blobs / oid

    # -- repos
    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, "You already created this repo", None)
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private)
            # Like the Hub: a new repo has one commit holding a .gitattributes file.
            oid = self.put_blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
            self._add_commit(repo, DEFAULT_BRANCH, "initial commit", "", {".gitattributes": oid}, None)
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            self.get_repo(repo_type, repo_id)
            del self.repos[(repo_type, repo_id)]

    def _add_commit(
        self, repo: Repo, branch: str, title: str, description: str, files: dict[str, str], parent: str | None
    ) -> Commit:
        self._counter += 1
        digest = hashlib.sha1(
            json.dumps(
                [repo.repo_id, parent, title, sorted(files.items()), self._counter, time.time()]
            ).encode()
        ).hexdigest()
        commit = Commit(oid=digest, parent=parent, title=title, description=description, files=dict(files))
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def commit(
        self,
        repo: Repo,
        branch: str,
        header: dict[str, Any],
        additions: dict[str, bytes],
        deleted_files: list[str],
        deleted_folders: list[str],
    ) -> Commit:
        with self.lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (create the branch first)", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            expected_parent = header.get("parentCommit")
            if expected_parent is not None and expected_parent != head.oid:
                raise HubError(412, f"A commit has happened since {expected_parent}; head is {head.oid}.")
            files = dict(head.files)
            for path in deleted_files:
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                doomed = [path for path in files if path.startswith(prefix)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                for path in doomed:
                    del files[path]
            for path, content in additions.items():
                files[path] = self.put_blob(content)
            return self._add_commit(
                repo, branch, header.get("summary") or "", header.get("description") or "", files, head.oid
            )

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> None:
        with self.lock:
            if branch in repo.branches:
                raise HubError(409, f"Branch {branch} already exists")
            start = repo.resolve(starting_point or DEFAULT_BRANCH)
            repo.branches[branch] = start.oid


# --------------------------------------------------------------------------------------------------------------- HTTP
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx2 pools connections
    server: _HubHTTPServer

    # silence the default stderr access log; requests are recorded in hub.requests instead
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False
    ):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, head: bool = False, headers: dict[str, str] | None = None):
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})}, head=head)

    def _error(self, error: HubError, head: bool = False):
        headers = {"X-Error-Message": error.message}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        self._json(error.status, {"error": error.message}, head=head, headers=headers)

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        # Split the RAW path: revisions and file paths arrive %-quoted (a branch "a/b" is "a%2Fb").
        segments = [unquote(part) for part in split.path.split("/")[1:]]
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        with hub.lock:
            hub.requests.append((method, split.path))
        try:
            # Like the Hub: a token that is presented but wrong is refused on every endpoint, public or not.
            presented = self._token()
            if hub.token is not None and presented is not None and presented != hub.token:
                raise HubError(401, "Invalid credentials in Authorization header")
            handled = self._route(method, segments, query, body)
        except HubError as error:
            self._error(error, head=method == "HEAD")
            return
        except Exception as error:  # a bug in the server: answer 500 so the client fails loudly
            hub.server_errors.append(repr(error))
            self._json(500, {"error": f"loopback hub internal error: {error!r}"}, head=method == "HEAD")
            return
        if not handled:
            with hub.lock:
                hub.unhandled.append((method, split.path))
            self._error(
                HubError(404, f"Not implemented by the loopback hub: {method} {split.path}"), method == "HEAD"
            )

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    # ------------------------------------------------------------------ auth
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _require_write(self) -> None:
        hub = self.server.hub
        if hub.token is not None and self._token() != hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _readable(self, repo: Repo) -> Repo:
        hub = self.server.hub
        if repo.private and hub.token is not None and self._token() != hub.token:
            # The Hub hides private repos from anonymous users behind a "not found".
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    # ------------------------------------------------------------------ routing
    @staticmethod
    def _split_repo(parts: list[str], marker_index: int) -> str:
        repo_id = "/".join(parts[:marker_index])
        if not repo_id or len(parts[:marker_index]) > 2:
            raise HubError(400, f"Bad repo id {repo_id!r}")
        return repo_id

    def _route(self, method: str, seg: list[str], query: dict[str, str], body: bytes) -> bool:
        store = self.server.hub.store
        head = method == "HEAD"
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo(json.loads(body or b"{}"))
            if rest == ["repos", "delete"] and method == "DELETE":
                payload = json.loads(body or b"{}")
                self._require_write()
                repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}"
                store.delete_repo(payload.get("type") or "model", repo_id)
                self._json(200, {})
                return True
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(json.loads(body or b"{}"))
            if rest[:1] == ["whoami-v2"] and method == "GET":
                self._json(
                    200, {"type": "user", "name": DEFAULT_USER, "auth": {"accessToken": {"role": "write"}}}
                )
                return True
            if rest and rest[0].rstrip("s") in REPO_TYPES and rest[0].endswith("s") and len(rest) >= 3:
                return self._repo_api(method, rest[0][:-1], rest[1:], query, body)
            return False
        # File downloads: /{repo}/resolve/{rev}/{path} (models) or /{type}s/{repo}/resolve/...
        repo_type = "model"
        parts = seg
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts = parts[0][:-1], parts[1:]
        if "resolve" in parts and method in ("GET", "HEAD"):
            index = parts.index("resolve")
            repo_id = self._split_repo(parts, index)
            if len(parts) < index + 3:
                raise HubError(400, "resolve needs a revision and a path")
            revision, path = parts[index + 1], "/".join(parts[index + 2 :])
            repo = self._readable(store.get_repo(repo_type, repo_id))
            commit = repo.resolve(revision)
            if path not in commit.files:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
            return self._serve_blob(store.blob_path(commit.files[path]), commit, head)
        return False

    def _repo_api(
        self, method: str, repo_type: str, parts: list[str], query: dict[str, str], body: bytes
    ) -> bool:
        store = self.server.hub.store
        actions = ("preupload", "commit", "branch", "refs", "revision", "tree")
        index = next((i for i, part in enumerate(parts) if part in actions and i >= 1), len(parts))
        repo_id = self._split_repo(parts, index)
        action, args = (parts[index], parts[index + 1 :]) if index < len(parts) else (None, [])
        repo = self._readable(store.get_repo(repo_type, repo_id))
        if action is None and method == "GET":
            return self._repo_info(repo, DEFAULT_BRANCH)
        if action == "revision" and method == "GET" and args:
            return self._repo_info(repo, "/".join(args))
        if action == "preupload" and method == "POST" and args:
            self._require_write()
            commit = repo.resolve("/".join(args))
            payload = json.loads(body or b"{}")
            files = []
            for item in payload.get("files", []):
                files.append(
                    {
                        "path": item["path"],
                        "uploadMode": "regular",  # keep content inline in the commit payload
                        "shouldIgnore": False,
                        "oid": commit.files.get(item["path"]),
                    }
                )
            self._json(200, {"files": files, "commitOid": commit.oid})
            return True
        if action == "commit" and method == "POST" and args:
            self._require_write()
            return self._commit(repo, "/".join(args), query, body)
        if action == "branch" and method == "POST" and args:
            self._require_write()
            payload = json.loads(body or b"{}")
            store.create_branch(repo, "/".join(args), payload.get("startingPoint"))
            self._json(200, {})
            return True
        if action == "refs" and method == "GET":
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                for name, oid in repo.branches.items()
            ]
            self._json(200, {"branches": branches, "tags": [], "converts": []})
            return True
        if action == "tree" and method == "GET" and args:
            return self._tree(
                repo, args[0], "/".join(args[1:]), query.get("recursive", "false").lower() == "true"
            )
        return False

    # ------------------------------------------------------------------ handlers
    def _create_repo(self, payload: dict[str, Any]) -> bool:
        self._require_write()
        hub = self.server.hub
        name = payload.get("name")
        if not name or "/" in name:
            raise HubError(400, f"Invalid repo name {name!r}")
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{hub.endpoint}/{prefix}{repo_id}"
        try:
            hub.store.create_repo(repo_type, repo_id, private)
        except HubError as error:
            if error.status == 409:  # the client reads "url" from the 409 body too when exist_ok=True
                self._json(409, {"error": error.message, "url": url})
                return True
            raise
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})
        return True

    def _validate_yaml(self, payload: dict[str, Any]) -> bool:
        content = payload.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as error:
                errors.append({"message": f"YAML parse error: {error}"})
            else:
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
        warnings = [] if match else [{"message": "empty or missing yaml metadata in repo card"}]
        self._json(400 if errors else 200, {"errors": errors, "warnings": warnings})
        return True

    def _commit(self, repo: Repo, revision: str, query: dict[str, str], body: bytes) -> bool:
        hub = self.server.hub
        if query.get("create_pr") in ("1", "true", "True"):
            raise HubError(400, "The loopback hub does not support pull requests (create_pr).")
        header: dict[str, Any] = {}
        additions: dict[str, bytes] = {}
        deleted_files: list[str] = []
        deleted_folders: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported file encoding {value.get('encoding')!r}")
                additions[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted_files.append(value["path"])
            elif key == "deletedFolder":
                deleted_folders.append(value["path"])
            else:  # lfsFile: never requested, since preupload answers "regular" for everything
                raise HubError(
                    400, f"Unsupported commit operation {key!r} (the loopback hub stores files inline)"
                )
        branch = revision.removeprefix("refs/heads/")
        commit = hub.store.commit(repo, branch, header, additions, deleted_files, deleted_folders)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        self._json(
            200,
            {
                "commitUrl": f"{hub.endpoint}/{prefix}{repo.repo_id}/commit/{commit.oid}",
                "commitOid": commit.oid,
                "success": True,
                "pullRequestUrl": None,
            },
        )
        return True

    def _repo_info(self, repo: Repo, revision: str) -> bool:
        commit = repo.resolve(revision)
        store = self.server.hub.store
        siblings = [
            {"rfilename": path, "size": store.blob_path(oid).stat().st_size, "blobId": oid}
            for path, oid in sorted(commit.files.items())
        ]
        card_data = None
        if "README.md" in commit.files:
            text = store.blob_path(commit.files["README.md"]).read_text(encoding="utf-8")
            match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
            if match:
                card_data = yaml.safe_load(match.group(1))
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.date))
        self._json(
            200,
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": date,
                "createdAt": date,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": list((card_data or {}).get("tags") or []),
                "pipeline_tag": (card_data or {}).get("pipeline_tag"),
                "library_name": (card_data or {}).get("library_name"),
                "cardData": card_data,
                "siblings": siblings,
            },
        )
        return True

    def _tree(self, repo: Repo, revision: str, path: str, recursive: bool) -> bool:
        commit = repo.resolve(revision)
        store = self.server.hub.store
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(name.startswith(prefix) for name in commit.files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for name, oid in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            relative = name[len(prefix) :]
            parts = relative.split("/")
            # folders on the way (all of them when recursive, only the first level otherwise)
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    folder,
                    {"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()},
                )
            if recursive or len(parts) == 1:
                entries[name] = {
                    "type": "file",
                    "path": name,
                    "size": store.blob_path(oid).stat().st_size,
                    "oid": oid,
                }
        self._json(200, list(entries.values()))
        return True

    def _serve_blob(self, blob: Path, commit: Commit, head: bool) -> bool:
        content = blob.read_bytes()
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob.name}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status = 200
        range_header = self.headers.get("Range")
        if range_header and not head:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if match:
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else len(content) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                content, status = content[start : end + 1], 206
        headers["Content-Length"] = str(len(content))
        self._send(status, content, headers, head=head)
        return True


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: LoopbackHub):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub


class LoopbackHub:
    """A Hub-protocol server on 127.0.0.1 (free port) served from a thread; use as a context manager.

    Args:
        root: directory holding the blobs (e.g. a pytest `tmp_path`).
        token: when set, writes need `Authorization: Bearer <token>` and private repos are hidden from requests
            without it. `None` accepts anything.
    """

    def __init__(self, root: str | Path, token: str | None = "hf_loopback_token"):
        self.store = HubStore(Path(root))
        self.token = token
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.server_errors: list[str] = []
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LoopbackHub:
        self._server = _HubHTTPServer(self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError(
                "The loopback hub is not running; use it as a context manager or call start()."
            )
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ helpers for tests
    def client_env(self, hf_home: str | Path, token: bool = True) -> dict[str, str]:
        """Environment variables pointing a fresh process's huggingface_hub at this server.

        HF_ENDPOINT and HF_HUB_DISABLE_XET are read once when huggingface_hub is imported, so they must be in the
        environment of the process before it imports anything from the HF stack.
        """
        env = {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
        }
        if token and self.token is not None:
            env["HF_TOKEN"] = self.token
        return env

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.store.get_repo(repo_type, repo_id)

    def files(
        self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model"
    ) -> dict[str, bytes]:
        """The content of every file of `repo_id` at `revision`."""
        commit = self.repo(repo_id, repo_type).resolve(revision)
        return {path: self.store.blob_path(oid).read_bytes() for path, oid in commit.files.items()}
