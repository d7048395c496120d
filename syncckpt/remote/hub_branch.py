"""One branch of one Hugging Face Hub repository, the layer under :class:`~syncckpt.remote.hub.HubRemote`.

It makes the API calls: under the shared retry policy (a 429 waits as long as the Hub's ``Retry-After`` says),
with errors that never carry the token. Commits to one repository from one process go one at a time, at least
``min_commit_interval`` seconds apart, each naming its parent. Reads stream from the resolve endpoint and resume
with a Range request when a connection drops. What to commit, and on which parent, is HubRemote's business.

>>> b = HubBranch("hf://user/runs/nli", "user/runs", "model", "main", token="hf_secret")
>>> b.error("read the branch head", RuntimeError("401 for hf_secret"))
RemoteError('hf://user/runs/nli: could not read the branch head: RuntimeError: 401 for ***')
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, parse_ratelimit_headers

from .._secrets import Scrubber
from ..errors import CheckpointCorrupt, RemoteError, UnsafeCheckpoint
from .base import CHUNK
from .retry import DEFAULT_POLICY, RetryPolicy, describe, is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_RETRY_AFTER = 900.0  # a background uploader may wait out a throttle, but not for hours on end
_MAX_RESUMES = 3  # reconnects (HTTP Range) of one streaming read before giving up
_TIMEOUT = httpx2.Timeout(connect=30.0, read=120.0, write=120.0, pool=60.0)
_CONFLICT_STATUS = (409, 412)
_MISSING = (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)


class Conflict(Exception):
    """The Hub refused a commit because its parent is no longer the head (or a deleted path vanished)."""


@dataclass
class _RepoGate:
    """Per repository and process: one commit in flight, and when the last one was sent."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    last_commit: float | None = None


_GATES: dict[tuple[str, str, str], _RepoGate] = {}
_GATES_LOCK = threading.Lock()


class HubBranch:
    """``revision`` of ``repo_id`` on the Hub at ``endpoint``; ``where`` (the run's URL) names it in messages."""

    def __init__(
        self,
        where: str,
        repo_id: str,
        repo_type: str,
        revision: str,
        *,
        endpoint: str | None = None,
        token: str | None = None,
        private: bool = True,
        max_workers: int = 8,
        min_commit_interval: float = 30.0,
        squash_every: int | None = None,
    ):
        self.where, self.repo_id, self.repo_type, self.revision = where, repo_id, repo_type, revision
        self.max_workers = max_workers
        self.min_commit_interval = float(min_commit_interval)
        self.squash_every = squash_every
        self.retry_policy: RetryPolicy = DEFAULT_POLICY
        self.scrub = Scrubber(secrets=[token])  # HF_TOKEN and the other environment tokens are always covered
        self._token = token  # None: huggingface_hub resolves HF_TOKEN / the saved login per request
        self._private = private
        self.api = HfApi(endpoint=endpoint, token=token, library_name="syncckpt")
        self._endpoint = self.api.endpoint.rstrip("/")
        with _GATES_LOCK:
            self.gate = _GATES.setdefault((self._endpoint, repo_type, repo_id), _RepoGate())
        self._ready = False
        self._since_squash = 0

    # ---- calls -------------------------------------------------------------------------------------------
    def retry(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` under the retry policy; 429 and 503 wait as long as the Hub asks (up to 15 minutes)."""
        return self.retry_policy.call(fn, what=f"{self.where}: {what}", scrub=self.scrub, retry_after=_retry_after)

    def error(self, what: str, e: BaseException) -> BaseException:
        """The error to raise for a failed call: ours and FileNotFoundError unchanged, the rest scrubbed."""
        if isinstance(e, (RemoteError, CheckpointCorrupt, FileNotFoundError)):
            return e
        return RemoteError(f"{self.where}: could not {what}: {self.scrub(describe(e))}")

    def tree(self, path: str | None, what: str) -> list[Any]:
        """Every entry under ``path`` (the whole repository for None) at the branch head; [] when missing."""
        try:
            return self.retry(
                lambda: list(
                    self.api.list_repo_tree(
                        self.repo_id,
                        path_in_repo=path,
                        recursive=True,
                        revision=self.revision,
                        repo_type=self.repo_type,
                    )
                ),
                what,
            )
        except _MISSING:
            return []
        except Exception as e:
            raise self.error(what, e) from e

    def paths_info(self, paths: list[str], revision: str) -> dict[str, RepoFile | RepoFolder]:
        """What ``revision`` holds at each of ``paths`` (absent ones are left out)."""
        try:
            infos = self.retry(
                lambda: self.api.get_paths_info(self.repo_id, paths, revision=revision, repo_type=self.repo_type),
                "paths-info",
            )
        except _MISSING:
            return {}
        except Exception as e:
            raise self.error("read file metadata", e) from e
        return {i.path: i for i in infos}

    def head(self) -> str:
        """The branch's current head commit."""
        try:
            info = self.retry(
                lambda: self.api.repo_info(self.repo_id, revision=self.revision, repo_type=self.repo_type), "head"
            )
        except Exception as e:
            raise self.error("read the branch head", e) from e
        return str(info.sha)

    def ensure(self) -> None:
        """Create the repository and the branch if missing (on the first write, never on a read)."""
        if self._ready:
            return
        try:
            self.retry(
                lambda: self.api.create_repo(
                    self.repo_id, private=self._private, repo_type=self.repo_type, exist_ok=True
                ),
                "create repo",
            )
            if self.revision != "main":
                self.retry(
                    lambda: self.api.create_branch(
                        self.repo_id, branch=self.revision, repo_type=self.repo_type, exist_ok=True
                    ),
                    "create branch",
                )
        except Exception as e:
            raise self.error("create the repository", e) from e
        self._ready = True

    # ---- commits -----------------------------------------------------------------------------------------
    def commit(
        self,
        message: str,
        additions: Callable[[], list[CommitOperationAdd]],
        deletions: list[tuple[str, bool]],
        parent: str,
        state: dict[str, bool],
    ) -> str | None:
        """One attempt at committing ``additions()`` and the present ones of ``deletions`` (path, is_folder) on
        ``parent``; the new commit id, or None when there was nothing to do. Raises :class:`Conflict` when the
        Hub refuses the parent, and sets ``state["maybe_applied"]`` when a failure leaves the outcome unknown."""
        present = self.paths_info([p for p, _ in deletions], parent) if deletions else {}
        dels = [
            CommitOperationDelete(p + "/" if folder else p, is_folder=folder)
            for p, folder in deletions
            if isinstance(present.get(p), RepoFolder if folder else RepoFile)
        ]
        adds = additions()
        if not adds and not dels:
            return None
        kw = {"repo_type": self.repo_type, "revision": self.revision, "num_threads": self.max_workers}
        if adds:
            # Upload before waiting out the commit interval: the interval limits commits, not transfers.
            self.api.preupload_lfs_files(self.repo_id, additions=adds, free_memory=False, **kw)
        self._wait_commit_interval()
        try:
            info = self.api.create_commit(
                self.repo_id, [*adds, *dels], commit_message=message, parent_commit=parent, **kw
            )
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in _CONFLICT_STATUS or isinstance(e, RemoteEntryNotFoundError):
                raise Conflict() from None
            if status != 429 and is_transient(e):
                state["maybe_applied"] = True
            raise
        except Exception as e:
            if is_transient(e):
                state["maybe_applied"] = True
            raise
        finally:
            self.gate.last_commit = time.monotonic()
        log.info("%s: committed %r as %s", self.where, message, info.oid)
        return info.oid

    def squash_if_due(self) -> str | None:
        """After every ``squash_every`` commits, rewrite the branch's history into one commit; the new head, or
        None when nothing was squashed. A failure is only logged: squashing saves storage, nothing more."""
        self._since_squash += 1
        if not self.squash_every or self._since_squash < self.squash_every:
            return None
        self._since_squash = 0
        self._wait_commit_interval()
        try:
            self.retry(
                lambda: self.api.super_squash_history(
                    self.repo_id,
                    branch=self.revision,
                    repo_type=self.repo_type,
                    commit_message=f"syncckpt: squash history of {self.revision}",
                ),
                "squash",
            )
            return self.head()
        except Exception as e:  # the checkpoint is already safe
            log.warning(
                "%s: could not squash the history (%s); will try again later", self.where, self.scrub(describe(e))
            )
            return None
        finally:
            self.gate.last_commit = time.monotonic()

    def _wait_commit_interval(self) -> None:
        last = self.gate.last_commit
        if last is None or self.min_commit_interval <= 0:
            return
        remaining = last + self.min_commit_interval - time.monotonic()
        if remaining > 0:
            log.debug("%s: waiting %.1f s between commits (Hub rate limit)", self.where, remaining)
            time.sleep(remaining)

    # ---- reads -------------------------------------------------------------------------------------------
    def open(self, path: str, rel: str, *, max_size: int | None = None) -> io.BufferedReader:
        """Stream ``path`` (``rel`` in the run) from the resolve endpoint, redirects followed; FileNotFoundError
        when absent, UnsafeCheckpoint when the Hub announces more than ``max_size`` bytes."""
        where = f"{self.where}/{rel}"
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        url = f"{self._endpoint}/{prefix}{self.repo_id}/resolve/{quote(self.revision, safe='')}/{quote(path)}"

        def connect(offset: int) -> httpx2.Response:
            headers = build_hf_headers(token=self._token, library_name="syncckpt")
            headers["Accept-Encoding"] = "identity"  # sizes must be the stored sizes
            if offset:
                headers["Range"] = f"bytes={offset}-"
            client = get_session()
            resp = client.send(client.build_request("GET", url, headers=headers, timeout=_TIMEOUT), stream=True)
            if resp.status_code == 404:
                resp.close()
                raise FileNotFoundError(f"{where} does not exist")
            if resp.status_code >= 400:
                try:
                    hf_raise_for_status(resp)
                finally:
                    resp.close()
            if offset and resp.status_code != 206:
                resp.close()
                raise RemoteError(f"{where}: the Hub ignored a Range request; cannot resume the read")
            return resp

        try:
            resp = self.retry(lambda: connect(0), "open")
        except FileNotFoundError:
            raise
        except Exception as e:
            raise self.error(f"open {rel}", e) from e
        if max_size is not None:
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_size:
                resp.close()
                raise UnsafeCheckpoint(f"{where}: {length} bytes, over the {max_size} allowed; refusing it")
        return io.BufferedReader(_HttpStream(resp, connect, where), buffer_size=CHUNK)


class _HttpStream(io.RawIOBase):
    """A streaming HTTP body as a raw file; a dropped connection is resumed with a Range request."""

    def __init__(self, resp: httpx2.Response, connect: Callable[[int], httpx2.Response], where: str):
        self._resp, self._connect, self._where = resp, connect, where
        self._chunks = resp.iter_bytes()
        self._pending = b""
        self._pos = 0
        self._resumes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
            except httpx2.TransportError as e:
                if self._resumes >= _MAX_RESUMES:
                    raise RemoteError(f"{self._where}: connection lost at byte {self._pos} ({describe(e)})") from e
                self._resumes += 1
                self._resp.close()
                self._resp = self._connect(self._pos)
                self._chunks = self._resp.iter_bytes()
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._resp.close()
        super().close()


def _retry_after(e: BaseException) -> float | None:
    """Seconds the Hub asked to wait before retrying (Retry-After, or an exhausted RateLimit window)."""
    response = getattr(e, "response", None)
    if response is None or getattr(response, "status_code", None) not in (429, 503):
        return None
    info = parse_ratelimit_headers(response.headers)
    if info is not None and info.remaining == 0:
        return min(float(info.reset_in_seconds), _MAX_RETRY_AFTER)
    value = (response.headers.get("Retry-After") or "").strip()
    try:
        return min(max(0.0, float(value)), _MAX_RETRY_AFTER)
    except ValueError:
        return None
