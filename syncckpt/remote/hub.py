"""``hf://`` runs: a prefix inside a Hugging Face Hub repository, written one commit per checkpoint.

URL grammar (the Hub's own, parsed by ``huggingface_hub.parse_hf_uri``)::

    hf://[datasets/]USER/REPO[@BRANCH][/PREFIX]

What the Hub gives that a bucket does not, and how it is used:

* **One checkpoint = one commit.** A checkpoint's data files, its manifest.json, the new LATEST and the folders
  retention deletes travel in a single ``HfApi.create_commit``: readers see all of it or none of it.
* **Compare-and-swap on the branch head.** Every commit names ``parent_commit``: the head this session last
  wrote (or, before its first write, the head it found). When the Hub refuses it (HTTP 412) because someone else
  committed meanwhile, the commit is rebased only if nobody touched the run's prefix (its git tree id is
  unchanged); otherwise :class:`~syncckpt.errors.RemoteConflict` is raised and nothing is overwritten. A whole
  repository used as a run (no prefix) treats every foreign commit as a conflict.
* **Content addressing.** Large files go through huggingface_hub's upload path (Xet when ``hf_xet`` is installed
  and enabled, else Git LFS); the Hub says which contents it already holds, so a retry after a failure does not
  send them again. Data files reuse the manifest's SHA-256 instead of hashing them a second time.
* **Rate limits.** The Hub allows on the order of 128 commits per hour per repository. Commits to one repository
  from one process go one at a time, at least ``min_commit_interval`` seconds apart (default 30 s, so a long run
  stays under 120/hour); a 429 waits as long as the Hub's ``Retry-After`` says, then retries.

What it does not guarantee: ``squash_every`` rewrites the branch's history (``super_squash_history``) without a
parent check, so a commit another writer lands in that instant is adopted silently; and every write, including a
lease heartbeat, is a commit that counts against the rate limit.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from huggingface_hub import CommitOperationAdd, parse_hf_uri
from huggingface_hub.errors import HfUriError
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils.sha import git_hash

from ..errors import CheckpointCorrupt, ConfigError, RemoteConflict, RemoteError, UnsafeCheckpoint
from ..manifest import LATEST_NAME, MANIFEST_NAME, MAX_MANIFEST_BYTES, Latest, Manifest, check_relative_path
from .base import Committed, LatestFn, ProgressFn, Put, Remote, RemoteStat, _check_name, put_whole_files
from .hub_branch import Conflict, HubBranch
from .retry import RetryPolicy

log = logging.getLogger(__name__)

_OPTIONS = ("token", "endpoint", "repo_type", "private")
_MAX_REBASES = 5


class HubRemote(Remote):
    """A run prefix inside a Hugging Face Hub repository.

    ``storage_options`` may hold ``token`` (else ``HF_TOKEN`` or the saved ``hf auth login`` is used), ``endpoint``
    (a Hub mirror or test server), ``repo_type`` ("model", the default, or "dataset") and ``private`` (whether to
    create the repository private when it is missing; default True). The repository is created on the first
    write, never on a read.

    >>> r = HubRemote("hf://user/my-runs@dev/nli-1", {"token": "hf_secret"}, min_commit_interval=0)
    >>> r.url, r.repo_id, r.revision, r.prefix
    ('hf://user/my-runs@dev/nli-1', 'user/my-runs', 'dev', 'nli-1')
    >>> "hf_secret" in repr(r) + r.url
    False
    """

    #: Lease TTL asked of :class:`syncckpt.lease.Lease`: every heartbeat is a commit, so beat rarely (every 10 min,
    #: 6 commits/hour, which with checkpoints at the default interval stays under the Hub's 128/hour).
    lease_ttl: float = 1800.0

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        min_commit_interval: float = 30.0,
        max_workers: int = 8,
        squash_every: int | None = None,
    ):
        opts = dict(storage_options or {})
        unknown = sorted(set(opts) - set(_OPTIONS))
        if unknown:
            raise ConfigError(f"{url}: unknown storage_options {unknown} for hf:// (accepted: {list(_OPTIONS)})")
        try:
            uri = parse_hf_uri(url)
        except HfUriError as e:
            raise ConfigError(
                f"{url!r} is not an hf:// run URL ({e.msg}); expected hf://USER/REPO[@BRANCH][/PREFIX]"
            ) from None
        if not url.startswith("hf://") or uri.is_bucket:
            raise ConfigError(f"{url!r}: expected hf://USER/REPO[@BRANCH][/PREFIX] (Hub buckets are not supported)")
        repo_type = opts.get("repo_type") or uri.type
        if uri.type != "model" and repo_type != uri.type:
            raise ConfigError(f"{url}: repo_type {repo_type!r} contradicts the URL's {uri.type!r}")
        if repo_type not in ("model", "dataset"):
            raise ConfigError(f"{url}: repo_type must be 'model' or 'dataset', got {repo_type!r}")
        if squash_every is not None and squash_every < 1:
            raise ConfigError(f"{url}: squash_every must be a positive number of commits or None")
        self.repo_id: str = uri.id
        self.repo_type: str = repo_type
        self.revision: str = uri.revision or "main"
        self.prefix: str = uri.path_in_repo.strip("/")
        type_part = "" if repo_type == "model" else f"{repo_type}s/"
        rev_part = f"@{quote(uri.revision, safe='')}" if uri.revision else ""  # "a/b" must stay one revision
        self.url = f"hf://{type_part}{self.repo_id}{rev_part}" + (f"/{self.prefix}" if self.prefix else "")
        self.max_workers = max_workers
        self._branch = HubBranch(
            self.url,
            self.repo_id,
            repo_type,
            self.revision,
            endpoint=opts.get("endpoint"),
            token=opts.get("token"),
            private=bool(opts.get("private", True)),
            max_workers=max_workers,
            min_commit_interval=min_commit_interval,
            squash_every=squash_every,
        )
        self._head: str | None = None  # the parent of the next commit: the head this session last wrote or saw

    def __repr__(self) -> str:
        return f"HubRemote({self.url!r})"

    @property
    def retry_policy(self) -> RetryPolicy:
        """Retries of transient failures (5xx, timeouts, resets, 429). Replace it to tune; 429 waits use
        Retry-After."""
        return self._branch.retry_policy

    @retry_policy.setter
    def retry_policy(self, policy: RetryPolicy) -> None:
        self._branch.retry_policy = policy

    # ---- reads ---------------------------------------------------------------------------------------------
    def list_checkpoints(self, *, besides: Iterable[str] = ()) -> list[str]:
        """Checkpoint folders under the prefix holding a manifest.json, from one recursive tree listing."""
        entries = self._branch.tree(self.prefix or None, "list checkpoints")
        names = set()
        for entry in entries:
            parts = self._rel(entry.path).split("/")
            if isinstance(entry, RepoFile) and len(parts) == 2 and parts[1] == MANIFEST_NAME:
                try:
                    _check_name(parts[0])
                except UnsafeCheckpoint:
                    continue
                names.add(parts[0])
        return sorted(names - set(besides))

    def read_bytes(self, rel: str, *, max_size: int = MAX_MANIFEST_BYTES) -> bytes:
        """Read a small object; its size is checked from the response headers before the body is read."""
        with self._open(rel, max_size=max_size) as f:
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise UnsafeCheckpoint(f"{self.url}/{rel}: larger than {max_size} bytes; refusing to read it")
        return data

    def open_read(self, rel: str, size: int | None = None) -> BinaryIO:
        """Stream an object from the Hub's resolve endpoint (redirects followed, reconnects resume by Range)."""
        return self._open(rel)

    def stat(self, rel: str) -> RemoteStat:
        """Size, and the SHA-256 the Hub keeps for LFS/Xet files (``git-sha1`` blob id for small ones)."""
        info = self._branch.paths_info([self._path(rel)], self.revision).get(self._path(rel))
        if not isinstance(info, RepoFile):
            raise FileNotFoundError(f"{self.url}/{rel} does not exist")
        return _stat_of(info)

    def check_uploaded(self, name: str, manifest: Manifest) -> None:
        """Check a committed checkpoint against its manifest from one tree listing: every file present with the
        manifest's size, and, for files the Hub stores as LFS/Xet, with the manifest's SHA-256. No download."""
        _check_name(name)
        folder = self._path(name)
        entries = self._branch.tree(folder, f"check {name}")
        held = {e.path: e for e in entries if isinstance(e, RepoFile)}
        for entry in manifest.files:
            info = held.get(f"{folder}/{entry.path}")
            where = f"{self.url}/{name}/{entry.path}"
            if info is None:
                raise RemoteError(f"{where}: missing from the Hub after the commit; upload it again")
            if info.size != entry.size:
                raise RemoteError(f"{where}: the Hub holds {info.size} bytes, the manifest says {entry.size}")
            if info.lfs is not None and info.lfs.sha256 != entry.sha256:
                raise RemoteError(
                    f"{where}: the Hub's SHA-256 {info.lfs.sha256[:12]}... differs from the manifest's "
                    f"{entry.sha256[:12]}...; the local file changed after its manifest was written"
                )

    # ---- writes --------------------------------------------------------------------------------------------
    def commit_checkpoint(
        self,
        name: str,
        local_dir: Path,
        manifest: Manifest,
        manifest_bytes: bytes,
        latest: Latest | LatestFn | None,
        delete: Iterable[str] = (),
        progress: ProgressFn | None = None,
        *,
        put: Put | None = None,
    ) -> Committed:
        """One commit: the data files, manifest.json, LATEST (when given) and the removal of ``delete``'s folders.

        ``progress`` is called once, with the checkpoint's size, when the commit has landed. The Hub stores whole
        files (and deduplicates their contents itself): a ``put`` other than whole files is refused.
        """
        if put not in (None, put_whole_files):
            raise NotImplementedError(f"{type(self).__name__} does not support incremental mirroring")
        if callable(latest):
            latest = latest(manifest, manifest_bytes)
        _check_name(name)
        delete = [d for d in delete if d != name]
        for d in delete:
            _check_name(d)
        local_dir = Path(local_dir)
        for entry in manifest.files:
            check_relative_path(entry.path)
            size = (local_dir / entry.path).stat().st_size
            if size != entry.size:
                raise CheckpointCorrupt(f"{local_dir / entry.path}: {size} bytes on disk, manifest says {entry.size}")

        def additions() -> list[CommitOperationAdd]:
            ops = []
            for entry in manifest.files:
                op = CommitOperationAdd(self._path(f"{name}/{entry.path}"), str(local_dir / entry.path))
                op.upload_info.sha256 = bytes.fromhex(entry.sha256)  # known: spares a second full read
                ops.append(op)
            ops.append(CommitOperationAdd(self._path(f"{name}/{MANIFEST_NAME}"), manifest_bytes))
            if latest is not None:
                ops.append(CommitOperationAdd(self._path(LATEST_NAME), latest.to_bytes()))
            return ops

        expect: dict[str, bytes | None] = {self._path(f"{name}/{MANIFEST_NAME}"): manifest_bytes}
        if latest is not None:
            expect[self._path(LATEST_NAME)] = latest.to_bytes()
        expect.update({self._path(d): None for d in delete})
        message = f"syncckpt: {name}" + (f" (delete {', '.join(delete)})" if delete else "")
        self._commit(message, additions, [(self._path(d), True) for d in delete], expect)
        if progress:
            progress(manifest.total_size)
        return Committed(manifest, manifest_bytes, latest, manifest.total_size + len(manifest_bytes))

    def delete_checkpoint(self, name: str) -> None:
        """Remove one checkpoint folder in one commit (no commit when it is already gone)."""
        _check_name(name)
        self._commit(f"syncckpt: delete {name}", list, [(self._path(name), True)], {self._path(name): None})

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` only if absent. True when this call created it.

        Guarantee: the file was absent in head commit H, and the new commit names H as its parent, so the Hub
        accepts it only while H is still the head; two sessions cannot both create the file. The session then
        continues from its own commit (it adopts whatever others committed up to H).
        """
        path = self._path(rel)
        with self._branch.gate.lock:
            self._branch.ensure()
            for _ in range(_MAX_REBASES + 1):
                head = self._branch.head()
                if path in self._branch.paths_info([path], head):
                    return False
                try:
                    self._commit(
                        f"syncckpt: create {rel}",
                        lambda: [CommitOperationAdd(path, data)],
                        [],
                        {path: data},
                        parent=head,
                    )
                    return True
                except RemoteConflict:
                    continue
        raise RemoteConflict(f"{self.url}/{rel}: the branch kept moving while creating it; retry later")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Create or overwrite a small object (one commit, parent-checked like every write)."""
        path = self._path(rel)
        self._commit(f"syncckpt: write {rel}", lambda: [CommitOperationAdd(path, data)], [], {path: data})

    def delete(self, rel: str) -> None:
        """Delete one file (one commit; none when it is absent)."""
        path = self._path(rel)
        self._commit(f"syncckpt: delete {rel}", list, [(path, False)], {path: None})

    # ---- commit machinery ----------------------------------------------------------------------------------
    def _commit(
        self,
        message: str,
        additions: Callable[[], list[CommitOperationAdd]],
        deletions: list[tuple[str, bool]],
        expect: dict[str, bytes | None],
        *,
        parent: str | None = None,
    ) -> None:
        """Commit ``additions()`` and ``deletions`` (path, is_folder) on top of the expected head.

        ``expect`` describes the result (path -> bytes, or None for absent): when an earlier attempt's fate is
        unknown (lost response, 5xx) and the Hub then refuses the retry, the head is checked against it, so a
        commit that did land is not reported as a conflict. Operations are rebuilt for each attempt because
        huggingface_hub mutates them; the Hub then tells which contents it already has.
        """
        with self._branch.gate.lock:
            self._branch.ensure()
            state = {"maybe_applied": False}
            for _ in range(_MAX_REBASES + 1):
                base = parent or self._expected_parent()
                try:
                    oid = self._branch.retry(
                        partial(self._branch.commit, message, additions, deletions, base, state), "commit"
                    )
                except Conflict:
                    if state["maybe_applied"] and self._holds(expect):
                        self._head = self._branch.head()
                        log.info("%s: an earlier attempt of %r had landed", self.url, message)
                        return
                    head = self._branch.head()
                    if parent is None and self._prefix_unchanged(base, head):
                        log.info("%s: rebasing %r onto %s (changes outside the run only)", self.url, message, head)
                        self._head = head
                        continue
                    raise RemoteConflict(
                        f"{self.url}: another writer committed to {self.repo_id}@{self.revision} since this session "
                        f"last saw it (expected head {base[:12]}, now {head[:12]}); the Hub refused {message!r} and "
                        "nothing was overwritten. Make sure one training run writes to this prefix (give each run "
                        "its own prefix or branch), then resume from the remote to continue."
                    ) from None
                except Exception as e:
                    raise self._branch.error(message, e) from e
                if oid is not None:
                    self._head = self._branch.squash_if_due() or oid
                return
            raise RemoteConflict(f"{self.url}: the branch kept moving under {message!r}; retry later")

    def _expected_parent(self) -> str:
        if self._head is None:
            self._head = self._branch.head()
        return self._head

    def _prefix_unchanged(self, old: str, new: str) -> bool:
        """Whether the run's folder has the same git tree in both commits (so the commits between touched
        only other paths). A run at the repository root has no such folder: any foreign commit conflicts."""
        if not self.prefix:
            return False
        try:
            before = self._branch.paths_info([self.prefix], old).get(self.prefix)
            after = self._branch.paths_info([self.prefix], new).get(self.prefix)
        except RemoteError:
            return False
        return _tree_id(before) == _tree_id(after)

    def _holds(self, expect: dict[str, bytes | None]) -> bool:
        """Whether the branch head has exactly the contents ``expect`` describes."""
        held = self._branch.paths_info(list(expect), self.revision)
        for path, data in expect.items():
            info = held.get(path)
            if data is None:
                if info is not None:
                    return False
            elif not isinstance(info, RepoFile) or not _same_content(info, data):
                return False
        return True

    # ---- plumbing ------------------------------------------------------------------------------------------
    def _open(self, rel: str, *, max_size: int | None = None) -> io.BufferedReader:
        return self._branch.open(self._path(rel), rel, max_size=max_size)

    def _path(self, rel: str) -> str:
        parts = rel.split("/")
        if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
            raise UnsafeCheckpoint(f"{rel!r} is not a safe relative path")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _rel(self, path: str) -> str:
        return path[len(self.prefix) + 1 :] if self.prefix else path


def _tree_id(info: RepoFile | RepoFolder | None) -> str | None:
    return info.tree_id if isinstance(info, RepoFolder) else None if info is None else info.blob_id


def _stat_of(info: RepoFile) -> RemoteStat:
    if info.lfs is not None:
        return RemoteStat(size=info.size, checksums={"sha256": info.lfs.sha256})
    return RemoteStat(size=info.size, checksums={"git-sha1": info.blob_id})


def _same_content(info: RepoFile, data: bytes) -> bool:
    if info.size != len(data):
        return False
    if info.lfs is not None:
        return info.lfs.sha256 == hashlib.sha256(data).hexdigest()
    return info.blob_id == git_hash(data)
