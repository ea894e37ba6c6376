"""A tiny, in-memory, Hugging Face Hub-compatible HTTP server for offline tests.

Standard library only. It implements the subset of the Hub HTTP API that ``huggingface_hub`` (2.4) uses to create
repos, upload files (as *regular* git files: no LFS, no Xet) and download them again, which is enough for
``HfApi.create_repo`` / ``upload_folder`` / ``upload_file`` / ``delete_file`` / ``create_commit`` / ``model_info`` /
``list_repo_tree`` / ``list_repo_files`` / ``list_repo_refs`` / ``list_repo_commits`` / ``file_exists``,
``hf_hub_download``, ``snapshot_download`` and ``transformers``' ``from_pretrained`` / ``push_to_hub``.
Only model repos ("org/name") are supported; tokens are accepted and ignored.

Usage::

    from hub_server import LocalHub, hub_env, patch_hub_constants

    with LocalHub() as hub:  # started on 127.0.0.1, free port, daemon thread
        api = HfApi(endpoint=hub.endpoint)  # explicit endpoint: no patching needed for HfApi methods
        ...
        with patch_hub_constants(hub, tmp_path / "hf"):  # module-level functions + transformers
            hf_hub_download("org/name", "config.json")
            LlamaForCausalLM.from_pretrained("org/name")

Pointing a client at the server
-------------------------------
``huggingface_hub.constants`` reads ``HF_ENDPOINT`` (and the cache / offline / xet variables) **once, at import
time**, and derives ``HUGGINGFACE_CO_URL_TEMPLATE`` (used by ``hf_hub_download`` and therefore by transformers) from
it. Setting ``os.environ["HF_ENDPOINT"]`` after ``huggingface_hub`` is imported has no effect. Two robust ways:

* **Subprocess** (cleanest): run the child with ``env={**os.environ, **hub_env(hub, cache_dir)}``. ``hub_env`` sets
  ``HF_ENDPOINT`` (the server), ``HF_HOME=cache_dir``, ``HF_HUB_CACHE=cache_dir/hub`` (plus the assets/xet caches),
  ``HF_HUB_OFFLINE=0`` and ``TRANSFORMERS_OFFLINE=0`` (both, since ``HF_HUB_OFFLINE`` falls back to
  ``TRANSFORMERS_OFFLINE``), ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_TELEMETRY=1`` (otherwise the first request
  fetches ``/api/agent-harnesses`` and caches it under ``HF_HOME``), ``HF_HUB_DISABLE_PROGRESS_BARS=1``,
  ``HUGGINGFACE_CO_STAGING=0`` (staging mode would override the endpoint) and adds ``127.0.0.1,localhost`` to
  ``NO_PROXY``/``no_proxy``. Pass ``offline=True`` to get ``HF_HUB_OFFLINE=1`` instead.
* **In-process**: ``with patch_hub_constants(hub, cache_dir, offline=False):`` patches, and restores on exit:

  - ``huggingface_hub.constants.{ENDPOINT, HUGGINGFACE_CO_URL_TEMPLATE, HF_URL_HOSTS, HF_HOME, HF_HUB_CACHE,
    HUGGINGFACE_HUB_CACHE, HF_ASSETS_CACHE, HUGGINGFACE_ASSETS_CACHE, HF_XET_CACHE, HF_TOKEN_PATH,
    HF_STORED_TOKENS_PATH, AGENT_HARNESSES_PATH, CHECK_FOR_UPDATE_DONE_PATH, CHECK_FOR_SKILL_UPDATE_DONE_PATH,
    HF_HUB_OFFLINE, HF_HUB_DISABLE_XET, HF_HUB_DISABLE_TELEMETRY}``;
  - objects that copied ``constants.ENDPOINT`` when they were built: ``huggingface_hub.hf_api.api.endpoint`` (the
    ``HfApi`` behind the module-level ``create_repo``, ``upload_folder``, ``upload_file``, ``model_info``, ...),
    ``huggingface_hub.hf_file_system.hffs`` (if loaded) and ``huggingface_hub.utils._http._HUB_ORIGINS``;
  - lazily cached singletons are dropped on entry and exit: ``transformers.utils.hub._hf_api`` (the ``HfApi`` that
    transformers' ``push_to_hub`` / revision resolution use; its endpoint is frozen on first use), fsspec's
    ``HfFileSystem`` instance cache, and the shared ``huggingface_hub`` httpx client (rebuilt with current proxies);
  - the environment variables of ``hub_env`` (only for code that reads ``os.environ`` lazily, e.g. a later
    ``hf_xet`` import; ``HF_HUB_DISABLE_PROGRESS_BARS`` is import-time only, so progress bars still show).

  Apart from that, transformers (5.x) has no endpoint/cache constants of its own: it reads
  ``huggingface_hub.constants`` at call time (``transformers.utils.hub.HF_MODULES_CACHE``, only used for
  ``trust_remote_code``, is frozen at import). ``patch_hub_constants(hub, same_cache_dir, offline=True)`` (nested or
  not) simulates ``HF_HUB_OFFLINE=1``: every request raises ``OfflineModeIsEnabled`` and cached files are served.

``HfApi(endpoint=hub.endpoint)`` works without any patching for ``HfApi`` methods, and ``hf_hub_download`` /
``snapshot_download`` accept ``endpoint=`` + ``cache_dir=`` too; use the patch for code you cannot pass them to.

Server behaviour worth knowing
------------------------------
* ``create_repo`` makes an initial, empty commit on ``main`` (the real Hub adds ``.gitattributes``; we don't).
* Every file is stored as a regular git blob: ETag = git blob sha1 (quoted), ``X-Repo-Commit`` = commit sha,
  ``Content-Length``; ``Range`` requests are honoured (206).
* Misses answer 404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` (the latter
  also carries ``X-Repo-Commit``, so ``hf_hub_download`` caches the miss under ``.no_exist``).
* Preupload returns the existing blob ``oid`` for files already on the branch, so (like the Hub) the client drops
  unchanged files from a commit and skips the commit entirely if nothing changed.
* Revisions are branch names or full 40-hex commit shas. ``create_pr`` and LFS payloads are rejected (400).
* ``hub.requests`` records ``(method, path)`` of every request, e.g. to assert that nothing hit the network.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubError", "LocalHub", "git_blob_sha", "hub_env", "patch_hub_constants"]

_API_REPO_TYPES = {"models", "datasets", "spaces", "kernels"}


def git_blob_sha(data: bytes) -> str:
    """Git blob sha1 of ``data`` (what the Hub uses as ``oid``/ETag for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _is_full_sha(rev: str) -> bool:
    return len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)


@dataclass
class _Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    message: str
    date: str


@dataclass
class _Repo:
    repo_id: str
    uid: str
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)


class HubError(Exception):
    """Raised by request handlers and by the direct (server-side) helpers of `LocalHub`."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


class LocalHub:
    """In-memory Hub server. Use as a context manager, or call `start()` / `stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, default_namespace: str = "local-user"):
        self.host = host
        self.port = port
        self.default_namespace = default_namespace
        self.requests: list[tuple[str, str]] = []
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        hub = self

        class Handler(_HubRequestHandler):
            pass

        Handler.hub = hub
        server = ThreadingHTTPServer((self.host, self.port), Handler, bind_and_activate=False)
        server.daemon_threads = True
        server.request_queue_size = 128  # snapshot_download opens 8 connections at once
        server.allow_reuse_address = True
        try:
            server.server_bind()
            server.server_activate()
        except BaseException:
            server.server_close()
            raise
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """Base URL to use as ``HF_ENDPOINT`` / ``HfApi(endpoint=...)``, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        return f"http://{self.host}:{self.port}"

    def clear_requests(self) -> None:
        self.requests.clear()

    # ------------------------------------------------------------------ direct (server-side) helpers
    def create_repo(self, repo_id: str, *, exist_ok: bool = False) -> str:
        """Create ``repo_id`` (with an initial empty commit on ``main``) without HTTP. Returns the head sha."""
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'namespace/name'")
        with self._lock:
            if repo_id in self._repos:
                if not exist_ok:
                    raise HubError(409, "You already created this model repo")
            else:
                repo = _Repo(repo_id=repo_id, uid=hashlib.sha1(repo_id.encode()).hexdigest()[:24], created_at=_now())
                self._repos[repo_id] = repo
                self._new_commit(repo, "main", {}, "initial commit", "")
            return self._repos[repo_id].branches["main"]

    def repo_exists(self, repo_id: str) -> bool:
        return repo_id in self._repos

    def head(self, repo_id: str, branch: str = "main") -> str:
        """Commit sha currently at ``branch``."""
        with self._lock:
            return self._resolve(self._get_repo(repo_id), branch).oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """``{path: content}`` of the tree at ``revision`` (branch or commit sha)."""
        with self._lock:
            return dict(self._resolve(self._get_repo(repo_id), revision).files)

    def read_file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return self.files(repo_id, revision)[path]

    def commit(
        self,
        repo_id: str,
        *,
        add: Mapping[str, bytes] | None = None,
        delete: list[str] | tuple[str, ...] = (),
        message: str = "Direct commit",
        branch: str = "main",
    ) -> str:
        """Create a commit on ``branch`` server-side (no HTTP). Returns the new commit sha."""
        with self._lock:
            repo = self._get_repo(repo_id)
            files = dict(self._resolve(repo, branch).files)
            for path in delete:
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            for path, data in (add or {}).items():
                files[path] = bytes(data)
            return self._new_commit(repo, branch, files, message, "").oid

    def replace_file(self, repo_id: str, path: str, data: bytes, *, branch: str = "main") -> str:
        """Overwrite (or add) ``path`` with ``data`` in a new commit on ``branch``. Returns the new commit sha."""
        return self.commit(repo_id, add={path: data}, message=f"Replace {path}", branch=branch)

    def delete_file(self, repo_id: str, path: str, *, branch: str = "main") -> str:
        """Delete ``path`` in a new commit on ``branch``. Returns the new commit sha."""
        return self.commit(repo_id, delete=[path], message=f"Delete {path}", branch=branch)

    def create_branch(self, repo_id: str, branch: str, *, revision: str = "main") -> str:
        """Point a (new or existing) ``branch`` at ``revision``. Returns the commit sha."""
        with self._lock:
            repo = self._get_repo(repo_id)
            oid = self._resolve(repo, revision).oid
            repo.branches[branch] = oid
            return oid

    # ------------------------------------------------------------------ internals (hold self._lock)
    def _get_repo(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        oid = repo.branches.get(revision)
        if oid is None and _is_full_sha(revision) and revision in repo.commits:
            oid = revision
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def _new_commit(self, repo: _Repo, branch: str, files: dict[str, bytes], title: str, message: str) -> _Commit:
        parent = repo.branches.get(branch)
        h = hashlib.sha1(f"commit\0{repo.repo_id}\0{parent}\0{title}\0{next(self._counter)}\0".encode())
        for path in sorted(files):
            h.update(f"{path}\0{git_blob_sha(files[path])}\0".encode())
        commit = _Commit(oid=h.hexdigest(), parent=parent, files=files, title=title, message=message, date=_now())
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


# ---------------------------------------------------------------------- HTTP layer


class _Response:
    def __init__(self, status: int = 200, body: bytes | dict | list = b"", headers: Mapping[str, str] | None = None):
        self.status = status
        self.headers = {"Content-Type": "application/octet-stream", **(headers or {})}
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            self.headers["Content-Type"] = "application/json; charset=utf-8"
        self.body = body


class _HubRequestHandler(BaseHTTPRequestHandler):
    hub: LocalHub  # set on a per-server subclass
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to drain, nothing stale after stop()
    server_version = "LocalHub/1.0"

    def log_message(self, format, *args):  # silence the default stderr logging
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -------------------------------------------------------------- plumbing
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        hub.requests.append((method, url.path))
        try:
            body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            segments = [unquote(s) for s in url.path.split("/")[1:]]
            while segments and segments[-1] == "":
                segments.pop()
            response = self._route(method, segments, query, body)
        except HubError as e:
            response = _Response(
                e.status,
                {"error": e.message},
                {**({"X-Error-Code": e.code} if e.code else {}), "X-Error-Message": e.message, **e.headers},
            )
        except Exception as e:  # pragma: no cover - surfaced to the client as a 500
            response = _Response(500, {"error": f"LocalHub internal error: {type(e).__name__}: {e}"})
        self._send(method, response)

    def _send(self, method: str, response: _Response) -> None:
        self.send_response(response.status)
        headers = dict(response.headers)
        headers.setdefault("Content-Length", str(len(response.body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD" and response.body:
            self.wfile.write(response.body)

    # -------------------------------------------------------------- routing
    def _route(self, method: str, seg: list[str], query: dict[str, str], body: bytes) -> _Response:
        if seg[:1] == ["api"]:
            return self._route_api(method, seg[1:], query, body)
        # /{org}/{name}/resolve/{revision}/{path...}
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(method, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        if len(seg) >= 4 and "resolve" in seg[1:3]:
            # canonical (no namespace) or dataset/space repo: not hosted here
            raise HubError(404, "Repository not found", "RepoNotFound")
        raise HubError(404, f"Not found: {method} {self.path}")

    def _route_api(self, method: str, seg: list[str], query: dict[str, str], body: bytes) -> _Response:
        hub = self.hub
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo(_json(body))
        if seg == ["repos", "delete"] and method == "DELETE":
            payload = _json(body)
            repo_id = "/".join(p for p in (payload.get("organization"), payload.get("name")) if p)
            with hub._lock:
                hub._get_repo(repo_id)
                del hub._repos[repo_id]
            return _Response(200, {})
        if seg == ["validate-yaml"] and method == "POST":
            return _Response(200, {})
        if seg == ["agent-harnesses"] and method == "GET":
            return _Response(200, {"standardEnvVars": [], "harnesses": {}})
        if len(seg) >= 3 and seg[0] in _API_REPO_TYPES:
            if seg[0] != "models":
                raise HubError(404, f"LocalHub only hosts model repos (got {seg[0]})", "RepoNotFound")
            repo_id, rest = f"{seg[1]}/{seg[2]}", seg[3:]
            action = rest[0] if rest else None
            if method == "GET" and action is None:
                return self._model_info(repo_id, "main", query)
            if method == "GET" and action == "revision" and len(rest) == 2:
                return self._model_info(repo_id, rest[1], query)
            if method == "GET" and action == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
            if method == "POST" and action == "preupload" and len(rest) == 2:
                return self._preupload(repo_id, rest[1], _json(body), query)
            if method == "POST" and action == "commit" and len(rest) == 2:
                return self._commit(repo_id, rest[1], body, query)
            if method == "GET" and action == "refs" and len(rest) == 1:
                return self._refs(repo_id)
            if method == "GET" and action == "commits" and len(rest) == 2:
                return self._commits(repo_id, rest[1])
        raise HubError(404, f"Not found: {method} {self.path}")

    # -------------------------------------------------------------- endpoints
    def _create_repo(self, payload: dict) -> _Response:
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"LocalHub only supports model repos, got type={repo_type!r}")
        name = payload.get("name")
        if not name:
            raise HubError(400, "Missing repo name")
        namespace = payload.get("organization") or self.hub.default_namespace
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.endpoint}/{repo_id}"
        try:
            self.hub.create_repo(repo_id)
        except HubError as e:
            if e.status != 409:
                raise
            # `create_repo(exist_ok=True)` swallows the 409 and then reads `url` from this very body.
            return _Response(409, {"error": "You already created this model repo", "url": url})
        return _Response(200, {"url": url, "name": repo_id, "id": self.hub._repos[repo_id].uid})

    def _resolve_file(self, method: str, repo_id: str, revision: str, path: str) -> _Response:
        hub = self.hub
        with hub._lock:
            commit = hub._resolve(hub._get_repo(repo_id), revision)
            data = commit.files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_sha(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        status, body = 200, data
        range_header = self.headers.get("Range")
        if method == "GET" and range_header and range_header.startswith("bytes="):
            start_s, _, end_s = range_header[len("bytes=") :].split(",")[0].partition("-")
            total = len(data)
            if start_s:
                start, end = int(start_s), int(end_s) if end_s else total - 1
            else:  # suffix range "bytes=-N"
                start, end = max(total - int(end_s), 0), total - 1
            end = min(end, total - 1)
            if start >= total or start > end:
                return _Response(416, b"", {**headers, "Content-Range": f"bytes */{total}"})
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        return _Response(status, body, headers)

    def _model_info(self, repo_id: str, revision: str, query: dict[str, str]) -> _Response:
        hub = self.hub
        blobs = query.get("blobs", "").lower() in ("1", "true")
        with hub._lock:
            repo = hub._get_repo(repo_id)
            commit = hub._resolve(repo, revision)
            files = dict(commit.files)
        siblings = []
        for path in sorted(files):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling.update(size=len(files[path]), blobId=git_blob_sha(files[path]))
            siblings.append(sibling)
        info = {
            "_id": repo.uid,
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(len(d) for d in files.values()),
        }
        return _Response(200, info)

    def _tree(self, repo_id: str, revision: str, path: str, query: dict[str, str]) -> _Response:
        hub = self.hub
        recursive = query.get("recursive", "").lower() in ("1", "true")
        with hub._lock:
            commit = hub._resolve(hub._get_repo(repo_id), revision)
            files = dict(commit.files)
        prefix = path.strip("/")
        if prefix in files:
            raise HubError(404, f"{prefix} is a file, not a directory", "EntryNotFound")
        under = {p: d for p, d in files.items() if not prefix or p.startswith(prefix + "/")}
        if prefix and not under:
            raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
        base = len(prefix) + 1 if prefix else 0
        dirs: dict[str, list[tuple[str, str]]] = {}
        entries: list[dict] = []
        for full, data in sorted(under.items()):
            parts = full[base:].split("/")
            for depth in range(1, len(parts)):
                if depth > 1 and not recursive:
                    break
                dir_path = full[:base] + "/".join(parts[:depth])
                dirs.setdefault(dir_path, []).append((full, git_blob_sha(data)))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": git_blob_sha(data), "size": len(data), "path": full})
        for dir_path, children in dirs.items():
            listing = "".join(f"{p}\0{s}\0" for p, s in sorted(children))
            oid = hashlib.sha1(f"tree\0{dir_path}\0{listing}".encode()).hexdigest()
            entries.append({"type": "directory", "oid": oid, "size": 0, "path": dir_path})
        entries.sort(key=lambda e: (not recursive and e["type"] != "directory", e["path"]))
        return _Response(200, entries)

    def _preupload(self, repo_id: str, revision: str, payload: dict, query: dict[str, str]) -> _Response:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_id)
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (uploads must target a branch)", "RevisionNotFound")
            files = dict(hub._resolve(repo, revision).files)
        out = []
        for item in payload.get("files", []):
            existing = files.get(item["path"])
            out.append(
                {
                    "path": item["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha(existing) if existing is not None else None,
                }
            )
        return _Response(200, {"files": out, "commitOid": repo.branches.get(revision)})

    def _commit(self, repo_id: str, revision: str, body: bytes, query: dict[str, str]) -> _Response:
        hub = self.hub
        if query.get("create_pr") in ("1", "true"):
            raise HubError(400, "LocalHub does not support create_pr")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None:
            raise HubError(400, "Missing commit header line")
        with hub._lock:
            repo = hub._get_repo(repo_id)
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits must target a branch)", "RevisionNotFound")
            head = hub._resolve(repo, revision)
            parent = header.get("parentCommit")
            if parent and parent != head.oid:
                raise HubError(412, f"Parent commit {parent} is not the head of {revision} ({head.oid})")
            files = dict(head.files)
            for line in lines:
                key, value = line.get("key"), line.get("value") or {}
                if key == "header":
                    continue
                if key == "file":
                    content = value.get("content", "")
                    encoding = value.get("encoding", "base64")
                    files[value["path"]] = base64.b64decode(content) if encoding == "base64" else content.encode()
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    folder = value["path"].strip("/")
                    doomed = [p for p in files if not folder or p.startswith(folder + "/")]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                elif key == "lfsFile":
                    raise HubError(400, "LocalHub does not support LFS files (preupload always answers 'regular')")
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            commit = hub._new_commit(repo, revision, files, header.get("summary", ""), header.get("description", ""))
        return _Response(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def _refs(self, repo_id: str) -> _Response:
        hub = self.hub
        with hub._lock:
            branches = dict(hub._get_repo(repo_id).branches)
        return _Response(
            200,
            {
                "branches": [
                    {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                    for name, oid in sorted(branches.items())
                ],
                "converts": [],
                "tags": [],
                "pullRequests": [],
            },
        )

    def _commits(self, repo_id: str, revision: str) -> _Response:
        hub = self.hub
        out = []
        with hub._lock:
            repo = hub._get_repo(repo_id)
            commit: _Commit | None = hub._resolve(repo, revision)
            while commit is not None:
                out.append(
                    {
                        "id": commit.oid,
                        "authors": [{"user": repo_id.split("/")[0]}],
                        "date": commit.date,
                        "title": commit.title,
                        "message": commit.message,
                    }
                )
                commit = repo.commits[commit.parent] if commit.parent else None
        return _Response(200, out)


def _json(body: bytes) -> dict:
    try:
        data = json.loads(body or b"{}")
    except json.JSONDecodeError as e:
        raise HubError(400, f"Invalid JSON body: {e}") from e
    if not isinstance(data, dict):
        raise HubError(400, "Expected a JSON object")
    return data


# ---------------------------------------------------------------------- client configuration helpers


def _endpoint_of(hub: LocalHub | str) -> str:
    return (hub if isinstance(hub, str) else hub.endpoint).rstrip("/")


def _no_proxy_value(current: str | None) -> str:
    hosts = [h for h in (current or "").split(",") if h.strip()]
    return ",".join(hosts + [h for h in ("127.0.0.1", "localhost") if h not in hosts])


def hub_env(hub: LocalHub | str, cache_dir: str | os.PathLike, *, offline: bool = False) -> dict[str, str]:
    """Environment variables making a *fresh* process (subprocess) use ``hub`` and caches under ``cache_dir``.

    ``cache_dir`` becomes ``HF_HOME``; downloaded repos land in ``cache_dir/hub`` (``HF_HUB_CACHE``).
    Use as ``subprocess.run(..., env={**os.environ, **hub_env(hub, tmp_path)})``.
    """
    home = Path(cache_dir)
    flag = "1" if offline else "0"
    return {
        "HF_ENDPOINT": _endpoint_of(hub),
        "HUGGINGFACE_CO_STAGING": "0",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_HUB_OFFLINE": flag,
        "TRANSFORMERS_OFFLINE": flag,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": _no_proxy_value(os.environ.get("NO_PROXY")),
        "no_proxy": _no_proxy_value(os.environ.get("no_proxy")),
    }


@contextlib.contextmanager
def patch_hub_constants(
    hub: LocalHub | str, cache_dir: str | os.PathLike, *, offline: bool = False
) -> Iterator[dict[str, str]]:
    """Point the already-imported ``huggingface_hub`` (and thus transformers) at ``hub``; restore on exit.

    ``cache_dir`` becomes ``HF_HOME`` and downloads land in ``cache_dir/hub``. ``offline=True`` simulates
    ``HF_HUB_OFFLINE=1`` (every HTTP request raises ``OfflineModeIsEnabled``; cached files are still served).
    Yields the environment variables that were set (same as `hub_env`).
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    endpoint = _endpoint_of(hub)
    home = Path(cache_dir)
    hub_cache = str(home / "hub")
    host = (urlsplit(endpoint).hostname or "").lower()
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {host}),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "HF_HUB_OFFLINE": offline,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    env = hub_env(endpoint, home, offline=offline)
    missing = object()
    saved_constants = {name: getattr(constants, name, missing) for name in values}
    saved_env = {key: os.environ.get(key) for key in env}
    # Objects that froze `constants.ENDPOINT` when they were built: (object, attribute, value while patched).
    # - `huggingface_hub.hf_api.api`: the HfApi behind the module-level `create_repo`, `upload_file`, `model_info`...
    # - `huggingface_hub.hf_file_system.hffs` (+ its HfApi), when that module is loaded.
    frozen = [(hf_api.api, "endpoint", endpoint)]
    hffs_module = sys.modules.get("huggingface_hub.hf_file_system")
    if hffs_module is not None:
        frozen += [(hffs_module.hffs, "endpoint", endpoint), (hffs_module.hffs._api, "endpoint", endpoint)]
    if hasattr(_http, "_HUB_ORIGINS"):  # origins whose redirects are followed with auth (frozen at import)
        frozen.append((_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)})))
    saved_frozen = [getattr(obj, attr) for obj, attr, _ in frozen]

    def _reset_lazy_singletons() -> None:
        # transformers caches one HfApi (endpoint frozen on first use) in `transformers.utils.hub._hf_api`;
        # fsspec caches HfFileSystem instances. Drop both so they are rebuilt from the current constants.
        hub_module = sys.modules.get("transformers.utils.hub")
        if hub_module is not None and hasattr(hub_module, "_hf_api"):
            hub_module._hf_api = None
        fs_module = sys.modules.get("huggingface_hub.hf_file_system")
        if fs_module is not None:
            fs_module.HfFileSystem.clear_instance_cache()
            if fs_module is not hffs_module:  # imported while patched: its `hffs` froze the patched endpoint
                fs_module.hffs.endpoint = fs_module.hffs._api.endpoint = constants.ENDPOINT
        _http.close_session()  # the shared httpx client is rebuilt lazily with the current env (proxies)

    try:
        for name, value in values.items():
            setattr(constants, name, value)
        for obj, attr, value in frozen:
            setattr(obj, attr, value)
        os.environ.update(env)
        _reset_lazy_singletons()
        yield env
    finally:
        for name, value in saved_constants.items():
            if value is missing:
                delattr(constants, name)
            else:
                setattr(constants, name, value)
        for (obj, attr, _), value in zip(frozen, saved_frozen):
            setattr(obj, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reset_lazy_singletons()
