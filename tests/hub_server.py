"""A small in-memory Hugging Face Hub for tests: the endpoints huggingface_hub 2.4's client calls for HubRemote.

It keeps real commit history (so ``parentCommit`` conflicts are real), git blob ids, LFS pointers and an LFS
object store, and answers the way the Hub does where the client cares (error codes in ``X-Error-Code``, 412 on a
stale parent, LFS batch answers without ``actions`` for objects it already has, redirects for LFS downloads).

Served routes (``T`` is ``models``/``datasets``/``spaces``; model repos have no prefix outside ``/api``)::

    POST /api/repos/create                          GET  /api/whoami-v2
    GET  /api/T/NS/NAME[/revision/REV]              POST /api/T/NS/NAME/preupload/REV
    POST /api/T/NS/NAME/commit/REV                  GET  /api/T/NS/NAME/tree/REV[/PATH]
    POST /api/T/NS/NAME/paths-info/REV              POST /api/T/NS/NAME/branch/BRANCH
    POST /api/T/NS/NAME/super-squash/BRANCH         POST /[T/]NS/NAME.git/info/lfs/objects/batch
    PUT  /_lfs/T/NS/NAME/OID (basic upload)         POST /_lfs/T/NS/NAME/verify
    GET|HEAD /[T/]NS/NAME/resolve/REV/PATH          GET|HEAD /_cdn/T/NS/NAME/OID (LFS bytes, Range)

The client must not use Xet (the server advertises plain ``basic`` LFS only): set
``huggingface_hub.constants.HF_HUB_DISABLE_XET = True`` (the env var is read at import time only).

Test knobs: :meth:`HubServer.inject` (answer the next N calls of a route with a status and headers, e.g. 429 +
Retry-After), :meth:`HubServer.drop_next` (apply a commit, then drop the connection without answering),
:attr:`HubServer.lfs_uploads` (uploads per oid), :meth:`HubServer.requests` (timestamped log),
:meth:`HubServer.corrupt` (replace stored bytes behind the metadata's back), :meth:`HubServer.stop` /
:meth:`HubServer.start`.

>>> with HubServer() as hub:
...     hub.create_repo("user/demo", private=True)
...     hub.is_private("user/demo"), len(hub.history("user/demo"))
(True, 1)
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

TOKEN = "hf_TESTtokenNeverLogged0123456789"
USER = "tester"

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_GITATTRIBUTES = b"".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for p in ("*.bin", "*.pt", "*.pth", "*.safetensors", "*.ckpt", "*.h5", "*.npy", "*.zip", "*.gz")
)
_CONFLICT_MESSAGE = "A commit has happened since. Please refresh and try again."


def git_blob_oid(data: bytes) -> str:
    """Git's object id of a blob, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file the repository stores in place of a large file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class _Entry:
    size: int
    oid: str  # git blob id (of the pointer, for LFS files)
    lfs_sha256: str | None = None


@dataclass
class _Commit:
    oid: str
    parent: str | None
    files: dict[str, _Entry]
    message: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # git oid -> content (regular files)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    commit_posts: int = 0  # successful POST /commit calls
    commit_ops: list[list[tuple[str, str]]] = field(default_factory=list)  # (key, path) lines of each commit


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it: ``t`` is ``time.monotonic()`` at arrival."""

    method: str
    route: str
    path: str
    status: int
    t: float


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, *, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


def _raise(exc: Exception) -> Any:
    raise exc


class HubServer:
    """An in-memory Hub on 127.0.0.1 (a free port), served from a daemon thread.

    ``token`` is the only accepted credential; ``lfs_threshold`` is the size from which preupload answers "lfs"
    (files matching the repository's .gitattributes LFS patterns are LFS at any size).
    """

    def __init__(self, *, token: str = TOKEN, lfs_threshold: int = 10 * 1024 * 1024):
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.lfs_uploads: Counter[str] = Counter()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._log: list[RequestRecord] = []
        self._injected: dict[str, list[tuple[int, dict[str, str], str]]] = {}
        self._drops: Counter[str] = Counter()
        self._truncations: list[tuple[str, int]] = []
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The endpoint to give huggingface_hub (``http://127.0.0.1:PORT``)."""
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> HubServer:
        """Serve (again) on the same port; the stored repositories survive a stop/start."""
        if self._httpd is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", self._port), handler)
        httpd.daemon_threads = True
        self._port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering: new connections are refused until :meth:`start`."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- knobs and inspection ------------------------------------------------------------------------------------
    def inject(
        self, route: str, status: int, *, count: int = 1, headers: dict[str, str] | None = None, message: str = ""
    ) -> None:
        """Answer the next ``count`` calls of ``route`` (e.g. "commit", "preupload", "lfs_batch", "resolve",
        "tree") with ``status`` and ``headers`` instead of serving them."""
        with self._lock:
            self._injected.setdefault(route, []).extend(
                [(status, dict(headers or {}), message or f"injected {status}")] * count
            )

    def clear_injections(self) -> None:
        with self._lock:
            self._injected.clear()
            self._drops.clear()
            self._truncations.clear()

    def truncate_next(self, route: str = "cdn", keep: int = 1, count: int = 1) -> None:
        """Answer the next ``count`` calls of ``route`` with the full Content-Length but only ``keep`` bytes of
        body, then close the connection (a download cut mid-way)."""
        with self._lock:
            self._truncations.extend([(route, keep)] * count)

    def drop_next(self, route: str = "commit", count: int = 1) -> None:
        """Serve the next ``count`` calls of ``route`` fully, then close the connection without answering."""
        with self._lock:
            self._drops[route] += count

    def requests(self, route: str | None = None) -> list[RequestRecord]:
        """The request log, optionally only one route's entries, in arrival order."""
        with self._lock:
            return [r for r in self._log if route is None or r.route == route]

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> None:
        """Create a repository directly (as if made on the website), with the usual initial commit."""
        with self._lock:
            self._create(repo_type, repo_id, private)

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        return self._repo(repo_type, repo_id).private

    def exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return (repo_type, repo_id) in self._repos

    def head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str:
        return self._repo(repo_type, repo_id).branches[branch]

    def history(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> list[str]:
        """Commit oids of ``branch``, newest first."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            out, oid = [], repo.branches[branch]
            while oid is not None:
                out.append(oid)
                oid = repo.commits[oid].parent  # type: ignore[assignment]
            return out

    def commit_posts(self, repo_id: str, repo_type: str = "model") -> int:
        """Successful commit API calls on the repository (repo creation's initial commit not included)."""
        return self._repo(repo_type, repo_id).commit_posts

    def commit_ops(self, repo_id: str, repo_type: str = "model") -> list[list[tuple[str, str]]]:
        """For each successful commit call, its operations as (key, path): key is file/lfsFile/deleted..."""
        return [list(ops) for ops in self._repo(repo_type, repo_id).commit_ops]

    def files(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Every file at the tip of ``branch`` with its stored bytes."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            tree = repo.commits[repo.branches[branch]].files
            return {p: self._content(repo, e) for p, e in tree.items()}

    def corrupt(self, repo_id: str, path: str, data: bytes, *, branch: str = "main", repo_type: str = "model") -> None:
        """Replace the stored bytes of ``path`` without touching its metadata (size, oids): storage damage."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            entry = repo.commits[repo.branches[branch]].files[path]
            if entry.lfs_sha256 is not None:
                repo.lfs[entry.lfs_sha256] = data
            else:
                repo.blobs[entry.oid] = data

    # ---- storage -----------------------------------------------------------------------------------------------
    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        try:
            return self._repos[(repo_type, repo_id)]
        except KeyError:
            raise _HttpError(404, f"Repository {repo_id} not found", "RepoNotFound") from None

    def _create(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type, repo_id, private)
        self._repos[(repo_type, repo_id)] = repo
        files = {".gitattributes": self._store_regular(repo, _GITATTRIBUTES)}
        repo.branches["main"] = self._new_commit(repo, None, files, "initial commit")
        return repo

    def _new_commit(self, repo: _Repo, parent: str | None, files: dict[str, _Entry], message: str) -> str:
        seed = f"{parent}|{sorted((p, e.oid) for p, e in files.items())}|{message}|{next(self._counter)}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = _Commit(oid, parent, dict(files), message)
        return oid

    @staticmethod
    def _store_regular(repo: _Repo, data: bytes) -> _Entry:
        oid = git_blob_oid(data)
        repo.blobs[oid] = data
        return _Entry(len(data), oid)

    @staticmethod
    def _content(repo: _Repo, entry: _Entry) -> bytes:
        return repo.lfs[entry.lfs_sha256] if entry.lfs_sha256 is not None else repo.blobs[entry.oid]

    def _commit_at(self, repo: _Repo, rev: str) -> _Commit:
        if rev in repo.branches:
            return repo.commits[repo.branches[rev]]
        matches = [c for oid, c in repo.commits.items() if len(rev) >= 7 and oid.startswith(rev)]
        if len(matches) == 1:
            return matches[0]
        raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _is_lfs_path(self, files: dict[str, _Entry], repo: _Repo, path: str, size: int) -> bool:
        if size >= self.lfs_threshold:
            return True
        attrs = files.get(".gitattributes")
        text = repo.blobs.get(attrs.oid, b"").decode() if attrs is not None and attrs.lfs_sha256 is None else ""
        name = path.rsplit("/", 1)[-1]
        for line in text.splitlines():
            parts = line.split()
            if len(parts) > 1 and "filter=lfs" in parts[1:] and fnmatch.fnmatch(name, parts[0]):
                return True
        return False

    def _tree_json(self, repo: _Repo, files: dict[str, _Entry], path: str, *, recursive: bool) -> list[dict]:
        prefix = f"{path}/" if path else ""
        dirs: set[str] = set()
        out: list[dict] = []
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :].split("/")
            for depth in range(1, len(rest)):
                if recursive or depth == 1:
                    dirs.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                out.append(self._file_json(p, files[p]))
        out.extend(self._dir_json(d, files) for d in sorted(dirs))
        if path and not out and path not in files:
            raise _HttpError(404, f"{path} does not exist", "EntryNotFound")
        return out

    @staticmethod
    def _file_json(path: str, e: _Entry) -> dict:
        d: dict[str, Any] = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
        if e.lfs_sha256 is not None:
            d["lfs"] = {"oid": e.lfs_sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.lfs_sha256, e.size))}
        return d

    @staticmethod
    def _dir_json(path: str, files: dict[str, _Entry]) -> dict:
        inner = sorted((p, e.oid) for p, e in files.items() if p.startswith(path + "/"))
        return {"type": "directory", "oid": hashlib.sha1(repr(inner).encode()).hexdigest(), "size": 0, "path": path}

    # ---- request handling (called from the handler threads) -----------------------------------------------------
    def _take_knob(self, route: str) -> tuple[int, dict[str, str], str] | None:
        with self._lock:
            queue = self._injected.get(route)
            return queue.pop(0) if queue else None

    def _authorized(self, headers: Any) -> bool:
        return headers.get("Authorization", "") == f"Bearer {self.token}"

    def _route(self, h: _Handler, method: str, raw_path: str, query: dict[str, list[str]]) -> tuple[str, Any]:
        """Name the route (for knobs and the log) and return a zero-argument function that serves it."""
        segs = raw_path.strip("/").split("/")
        if raw_path == "/api/repos/create" and method == "POST":
            return "create_repo", lambda: self._h_create_repo(h)
        if raw_path == "/api/whoami-v2" and method == "GET":
            return "whoami", lambda: self._h_whoami(h)
        if len(segs) >= 4 and segs[0] == "api" and segs[1] in _TYPES:
            repo_type, repo_id = _TYPES[segs[1]], f"{unquote(segs[2])}/{unquote(segs[3])}"
            action = segs[4] if len(segs) > 4 else None
            rev = unquote(segs[5]) if len(segs) > 5 else None
            rest = unquote("/".join(segs[6:]))
            if action is None and method == "GET":
                return "repo_info", lambda: self._h_repo_info(h, repo_type, repo_id, "main")
            if action == "revision" and method == "GET" and rev:
                return "repo_info", lambda: self._h_repo_info(h, repo_type, repo_id, rev)
            handlers = {
                ("POST", "preupload"): self._h_preupload,
                ("POST", "commit"): self._h_commit,
                ("GET", "tree"): self._h_tree,
                ("POST", "paths-info"): self._h_paths_info,
                ("POST", "branch"): self._h_branch,
                ("POST", "super-squash"): self._h_squash,
            }
            fn = handlers.get((method, action or ""))
            if fn is not None and rev is not None:
                return action.replace("-", "_"), lambda: fn(h, repo_type, repo_id, rev, rest, query)  # type: ignore
        if len(segs) >= 5 and segs[0] in ("_lfs", "_cdn"):
            repo_type, repo_id = _TYPES.get(segs[1], "?"), f"{unquote(segs[2])}/{unquote(segs[3])}"
            if segs[0] == "_lfs" and method == "PUT":
                return "lfs_upload", lambda: self._h_lfs_upload(h, repo_type, repo_id, segs[4])
            if segs[0] == "_lfs" and method == "POST" and segs[4] == "verify":
                return "lfs_verify", lambda: self._h_lfs_verify(h, repo_type, repo_id)
            if segs[0] == "_cdn" and method in ("GET", "HEAD"):
                return "cdn", lambda: self._h_cdn(h, repo_type, repo_id, segs[4])
        repo_type = "model"
        if segs and segs[0] in _TYPES and segs[0] != "models":
            repo_type, segs = _TYPES[segs[0]], segs[1:]
        if len(segs) == 6 and segs[1].endswith(".git") and "/".join(segs[2:]) == "info/lfs/objects/batch":
            repo_id = f"{unquote(segs[0])}/{unquote(segs[1])[:-4]}"
            return "lfs_batch", lambda: self._h_lfs_batch(h, repo_type, repo_id)
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id, rev, path = f"{unquote(segs[0])}/{unquote(segs[1])}", unquote(segs[3]), unquote("/".join(segs[4:]))
            return "resolve", lambda: self._h_resolve(h, repo_type, repo_id, rev, path)
        return "unknown", lambda: _raise(_HttpError(404, f"no route for {method} {raw_path}"))

    def _h_whoami(self, h: _Handler) -> tuple:
        if not self._authorized(h.headers):
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return 200, {}, {"type": "user", "name": USER, "auth": {"type": "access_token"}}

    def _readable(self, h: _Handler, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repo(repo_type, repo_id)
        if repo.private and not self._authorized(h.headers):
            raise _HttpError(401, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, h: _Handler, repo_type: str, repo_id: str) -> _Repo:
        if not self._authorized(h.headers):
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return self._repo(repo_type, repo_id)

    def _h_create_repo(self, h: _Handler) -> tuple:
        if not self._authorized(h.headers):
            raise _HttpError(401, "Invalid credentials in Authorization header")
        body = json.loads(h.body() or b"{}")
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                # The Hub names the existing repository; create_repo(exist_ok=True) reads this url.
                raise _HttpError(409, f"You already created this {repo_type} repo", url=url)
            self._create(repo_type, repo_id, body.get("visibility") == "private")
        return 200, {}, {"url": url, "name": repo_id}

    def _h_repo_info(self, h: _Handler, repo_type: str, repo_id: str, rev: str) -> tuple:
        with self._lock:
            repo = self._readable(h, repo_type, repo_id)
            commit = self._commit_at(repo, rev)
            siblings = [{"rfilename": p} for p in sorted(commit.files)]
            return 200, {}, {"id": repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings}

    def _h_preupload(self, h: _Handler, repo_type: str, repo_id: str, rev: str, _rest: str, _q: dict) -> tuple:
        body = json.loads(h.body())
        with self._lock:
            repo = self._writable(h, repo_type, repo_id)
            files = self._commit_at(repo, rev).files
            out = []
            for f in body["files"]:
                lfs = self._is_lfs_path(files, repo, f["path"], int(f["size"]))
                existing = files.get(f["path"])
                # The client compares this with sha256 for LFS files and with the git blob id otherwise.
                oid = None if existing is None else (existing.lfs_sha256 or existing.oid)
                out.append(
                    {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
                )
        return 200, {}, {"files": out, "commitOid": self._commit_at(repo, rev).oid}

    def _h_lfs_batch(self, h: _Handler, repo_type: str, repo_id: str) -> tuple:
        body = json.loads(h.body())
        with self._lock:
            repo = self._writable(h, repo_type, repo_id)
            objects = []
            for obj in body.get("objects", []):
                item: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in repo.lfs:
                    base = f"{self.url}/_lfs/{repo_type}s/{repo_id}"
                    item["actions"] = {
                        "upload": {"href": f"{base}/{obj['oid']}", "expires_in": 3600},
                        "verify": {"href": f"{base}/verify", "header": {}},
                    }
                objects.append(item)
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, {"transfer": "basic", "objects": objects}

    def _h_lfs_upload(self, h: _Handler, repo_type: str, repo_id: str, oid: str) -> tuple:
        data = h.body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HttpError(400, f"uploaded bytes do not hash to {oid}")
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            repo.lfs[oid] = data
            self.lfs_uploads[oid] += 1
        return 200, {"ETag": f'"{oid}"'}, b""

    def _h_lfs_verify(self, h: _Handler, repo_type: str, repo_id: str) -> tuple:
        body = json.loads(h.body())
        with self._lock:
            repo = self._writable(h, repo_type, repo_id)
            data = repo.lfs.get(body["oid"])
        if data is None or len(data) != body["size"]:
            raise _HttpError(404, f"LFS object {body['oid']} not found")
        return 200, {}, {"success": True}

    def _h_commit(self, h: _Handler, repo_type: str, repo_id: str, rev: str, _rest: str, _q: dict) -> tuple:
        lines = [json.loads(line) for line in h.body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "first line must be the commit header")
        header = lines[0]["value"]
        with self._lock:
            repo = self._writable(h, repo_type, repo_id)
            if rev not in repo.branches:
                raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo.branches[rev]
            parent = header.get("parentCommit")
            if parent is not None and not (len(parent) >= 7 and head.startswith(parent)):
                raise _HttpError(412, _CONFLICT_MESSAGE)
            files = dict(repo.commits[head].files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    files[path] = self._store_regular(repo, base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    data = repo.lfs.get(value["oid"])
                    if data is None:
                        raise _HttpError(422, f"LFS object {value['oid']} for {path} was never uploaded")
                    files[path] = _Entry(len(data), git_blob_oid(lfs_pointer(value["oid"], len(data))), value["oid"])
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    inside = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                    if not inside:
                        raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    for p in inside:
                        del files[p]
                else:
                    raise _HttpError(400, f"unknown commit operation {key!r}")
            oid = self._new_commit(repo, head, files, header.get("summary", ""))
            repo.branches[rev] = oid
            repo.commit_posts += 1
            repo.commit_ops.append([(line["key"], line["value"]["path"]) for line in lines[1:]])
        url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}/commit/{oid}"
        return 200, {}, {"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": ""}

    def _h_tree(self, h: _Handler, repo_type: str, repo_id: str, rev: str, rest: str, query: dict) -> tuple:
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        with self._lock:
            repo = self._readable(h, repo_type, repo_id)
            commit = self._commit_at(repo, rev)
            return 200, {}, self._tree_json(repo, commit.files, rest.strip("/"), recursive=recursive)

    def _h_paths_info(self, h: _Handler, repo_type: str, repo_id: str, rev: str, _rest: str, _q: dict) -> tuple:
        form = parse_qs(h.body().decode())
        with self._lock:
            repo = self._readable(h, repo_type, repo_id)
            files = self._commit_at(repo, rev).files
            out = []
            for p in form.get("paths", []):
                p = p.strip("/")
                if p in files:
                    out.append(self._file_json(p, files[p]))
                elif any(f.startswith(p + "/") for f in files):
                    out.append(self._dir_json(p, files))
        return 200, {}, out

    def _h_branch(self, h: _Handler, repo_type: str, repo_id: str, branch: str, _rest: str, _q: dict) -> tuple:
        body = json.loads(h.body() or b"{}")
        with self._lock:
            repo = self._writable(h, repo_type, repo_id)
            if branch in repo.branches:
                raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self._commit_at(repo, body.get("startingPoint") or "main").oid
        return 200, {}, {}

    def _h_squash(self, h: _Handler, repo_type: str, repo_id: str, branch: str, _rest: str, _q: dict) -> tuple:
        body = json.loads(h.body() or b"{}")
        with self._lock:
            repo = self._writable(h, repo_type, repo_id)
            head = self._commit_at(repo, branch)
            oid = self._new_commit(repo, None, head.files, body.get("message", "squash"))
            repo.branches[branch] = oid
        return 200, {}, {"commitId": oid}

    def _h_resolve(self, h: _Handler, repo_type: str, repo_id: str, rev: str, path: str) -> tuple:
        with self._lock:
            repo = self._readable(h, repo_type, repo_id)
            commit = self._commit_at(repo, rev)
            entry = commit.files.get(path)
            if entry is None:
                raise _HttpError(404, f"{path} does not exist at {rev}", "EntryNotFound")
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.oid}"', "Accept-Ranges": "bytes"}
            if entry.lfs_sha256 is not None:
                # The Hub answers LFS files with a redirect to a CDN; the client must follow it.
                location = f"{self.url}/_cdn/{repo_type}s/{repo_id}/{entry.lfs_sha256}"
                headers.update(
                    {"Location": location, "X-Linked-Size": str(entry.size), "X-Linked-Etag": f'"{entry.lfs_sha256}"'}
                )
                return 302, headers, b""
            data = repo.blobs[entry.oid]
        return self._ranged(h, data, headers)

    def _h_cdn(self, h: _Handler, repo_type: str, repo_id: str, oid: str) -> tuple:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            data = repo.lfs.get(oid)
        if data is None:
            raise _HttpError(404, f"LFS object {oid} not found")
        return self._ranged(h, data, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"})

    @staticmethod
    def _ranged(h: _Handler, data: bytes, headers: dict[str, str]) -> tuple:
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", "").strip())
        if not m:
            return 200, headers, data
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
        if start >= len(data):
            raise _HttpError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
        headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
        return 206, headers, data[start : end + 1]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.0"  # one request per connection: no stale pooled sockets across stop()/start()
    _body: bytes | None = None

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def body(self) -> bytes:
        if self._body is None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                self._body = b"".join(parts)
            else:
                self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self._body

    def _serve(self) -> None:
        hub = self.hub
        t = time.monotonic()
        split = urlsplit(self.path)
        route, serve = hub._route(self, self.command, split.path, parse_qs(split.query))
        injected = hub._take_knob(route)
        dropped, keep = False, None
        if injected is not None:
            # An injected failure stands in for the real answer: the request is not applied.
            status, headers, payload = injected[0], dict(injected[1]), {"error": injected[2]}
        else:
            try:
                status, headers, payload = serve()
            except _HttpError as e:
                status, headers, payload = e.status, dict(e.headers), {"error": e.message, **e.extra}
                if e.code:
                    headers["X-Error-Code"] = e.code
            with hub._lock:
                if hub._drops[route] > 0 and status < 400:
                    hub._drops[route] -= 1
                    dropped = True
                cut = next((c for c in hub._truncations if c[0] == route), None)
                if cut is not None and status in (200, 206) and isinstance(payload, bytes) and len(payload) > cut[1]:
                    hub._truncations.remove(cut)
                    keep = cut[1]
        with hub._lock:
            hub._log.append(RequestRecord(self.command, route, self.path, status, t))
        self.body()  # drain the request so the client never sees a reset while it is still sending
        if dropped:
            self.close_connection = True
            return
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        binary = isinstance(payload, bytes)
        headers.setdefault("Content-Type", "application/octet-stream" if binary else "application/json")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data if keep is None else data[:keep])
        if keep is not None:
            self.wfile.flush()
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve
