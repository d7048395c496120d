"""The small interface every remote store implements, and the logic all stores share.

A run lives under one prefix (``s3://bucket/runs/nli-1``, ``hf://user/repo``). Layout under it::

    LATEST                          JSON hint: newest committed checkpoint (name, global_step, manifest_sha256)
    .lease                          JSON: which session writes this run, and its heartbeat
    checkpoint-step-500/
        model.safetensors ...       data files, exactly as in the local folder
        manifest.json               written after every data file; its presence makes the checkpoint complete

Backends implement the abstract methods and the ``_upload`` primitive (one file); everything else is written
once here: the commit sequence (data -> manifest.json -> LATEST -> deletions; how the data travels is a ``Put``
strategy, whole files or content-addressed parts), downloading with a streaming digest, reading manifests
defensively. Relative paths are always checked with
``check_relative_path`` before they reach a backend, so a backend never sees ``..`` or an absolute path.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .. import local
from .._failpoints import failpoint
from ..blobs import blob_rel
from ..errors import CheckpointCorrupt, RemoteError, UnsafeCheckpoint
from ..manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Latest,
    Manifest,
    check_relative_path,
    parse_checkpoint_name,
    verify_digest,
)

log = logging.getLogger("syncckpt")

CHUNK = 8 * 1024 * 1024

ProgressFn = Callable[[int], None]  # called with a number of bytes just transferred


@dataclass(frozen=True)
class RemoteStat:
    """What a store says about one object without downloading it."""

    size: int
    checksums: dict[str, str] = field(default_factory=dict)  # e.g. {"md5": hex, "crc32c": base64}


#: The LATEST a commit writes, computed from the manifest the store is to hold and its bytes.
LatestFn = Callable[[Manifest, bytes], "Latest | None"]


@dataclass(frozen=True)
class Committed:
    """What :meth:`Remote.commit_checkpoint` left in the store."""

    manifest: Manifest  # as the store holds it (an incremental put lists each file's parts)
    manifest_bytes: bytes
    latest: Latest | None  # the LATEST written, or None when it was left alone
    sent: int  # bytes sent, the manifest included


class Remote(abc.ABC):
    """A run prefix in some store.

    Implementations: :class:`syncckpt.remote.fsspec.FsspecRemote` (s3://, gs://, file://, memory://, any fsspec
    protocol) and :class:`syncckpt.remote.hub.HubRemote` (hf://). Obtain one with
    :func:`syncckpt.remote.open_remote`.
    """

    #: URL of the run prefix, safe to log (never carries credentials).
    url: str
    #: Parallel transfers (files at once); backends may also parallelise parts within a file.
    max_workers: int = 8
    #: The store keeps a CRC32C of every object that :meth:`check_uploaded` compares with the manifest's (GCS):
    #: writers record one only then, since computing it costs a copy of every byte.
    keeps_crc32c: bool = False

    # ---- primitives each backend implements -------------------------------------------------------------
    @abc.abstractmethod
    def list_checkpoints(self, *, besides: Iterable[str] = ()) -> list[str]:
        """Names of the checkpoint folders under the prefix that hold a manifest.json, bypassing listing caches;
        never those in ``besides``, which are not looked at (the save being committed: its data may be in the
        store already, its manifest not yet)."""

    @abc.abstractmethod
    def read_bytes(self, rel: str, *, max_size: int = MAX_MANIFEST_BYTES) -> bytes:
        """Read a small object. Raise FileNotFoundError when absent, UnsafeCheckpoint when over max_size."""

    @abc.abstractmethod
    def open_read(self, rel: str, size: int | None = None) -> BinaryIO:
        """Open an object for streaming reads. Raise FileNotFoundError when absent. ``size``: the object's size
        when the caller already checked it in the store (saves a metadata request where the reader needs it)."""

    @abc.abstractmethod
    def stat(self, rel: str) -> RemoteStat:
        """Size (and store checksums when kept) of one object. Raise FileNotFoundError when absent."""

    def exists(self, rel: str) -> bool:
        """Whether the object ``rel`` is in the store (one :meth:`stat`)."""
        try:
            self.stat(rel)
            return True
        except FileNotFoundError:
            return False

    @abc.abstractmethod
    def delete_checkpoint(self, name: str) -> None:
        """Remove one checkpoint folder: its manifest first, then its data files."""

    def clear_uncommitted(self, name: str) -> bool:
        """Before new data goes under ``NAME/``: False, touching nothing, when a committed checkpoint of that name is
        there (it holds a manifest); else remove what an interrupted attempt left there and return True."""
        if self.exists(f"{name}/{MANIFEST_NAME}"):
            return False
        self.delete_checkpoint(name)
        return True

    @abc.abstractmethod
    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create an object only if it does not exist (conditional write). True when created."""

    @abc.abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Create or overwrite a small object."""

    @abc.abstractmethod
    def delete(self, rel: str) -> None:
        """Delete one object; absent objects are not an error."""

    def _upload(self, local: Path, rel: str, size: int, progress: ProgressFn | None = None) -> None:
        """Backend hook: upload one local file of ``size`` bytes to ``rel``, streamed from disk, calling
        ``progress(nbytes)`` as bytes go and never counting retried bytes twice. The primitive
        :func:`put_whole_files` builds on; a store that overrides :meth:`commit_checkpoint` with an atomic commit of
        its own (the Hub) needs none."""
        raise NotImplementedError(f"{type(self).__name__} uploads checkpoints in one commit, not file by file")

    def list_blobs(self) -> list[str]:
        """Digests of the content-addressed blobs under ``blobs/`` (incremental mirroring)."""
        raise NotImplementedError(f"{type(self).__name__} does not support incremental mirroring")

    def collect_unused_blobs(
        self, manifests: dict[str, Manifest] | None = None, known: set[str] | None = None
    ) -> list[str]:
        """Delete the blobs no remaining checkpoint's manifest refers to (runs mirrored incrementally); returns
        their digests. ``manifests`` caches manifests by name, ``known`` the blobs present (else listed). Nothing
        is deleted when any manifest cannot be read: its blobs might be among them."""
        if known is None:
            try:
                known = set(self.list_blobs())
            except NotImplementedError:
                return []
        if not known:
            return []
        cache = manifests if manifests is not None else {}
        referenced: set[str] = set()
        for name in self.list_checkpoints():
            m = cache.get(name)
            if m is None:
                try:
                    m, _ = self.read_manifest(name)
                except (CheckpointCorrupt, FileNotFoundError, OSError, RemoteError) as e:
                    log.warning("Not collecting unused blobs on %s: cannot read %s (%s)", self.url, name, e)
                    return []
                cache[name] = m
            referenced.update(d for f in m.files for _, d in f.parts or ())
        unused = sorted(known - referenced)
        for digest in unused:
            self.delete(blob_rel(digest))
        if unused:
            log.info("Deleted %d unused blobs from %s", len(unused), self.url)
        return unused

    # ---- the one commit sequence ----------------------------------------------------------------------------
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
        """Publish one checkpoint in the order that keeps the store consistent at every instant: the data files
        (sent and checked in the store by ``put``), then ``NAME/manifest.json``, then LATEST (when given), then
        delete the checkpoints named in ``delete`` (manifest first, so a half-deleted one never looks complete).

        ``put`` says how the data travels: :func:`put_whole_files` (the default) or an incremental put
        (:class:`syncckpt.remote.incremental.BlobPut`), which may rewrite the manifest the store holds; ``latest``
        may then be a function of that manifest and its bytes. ``progress(nbytes)`` is called as bytes go, from
        worker threads but never two at once. A store with atomic multi-file commits (the Hub) overrides this and
        does it all in one commit.
        """
        local_dir = Path(local_dir)
        doomed = self._check_commit(name, local_dir, manifest, delete)
        stored, sent = (put or put_whole_files)(self, name, local_dir, manifest, _one_at_a_time(progress))
        stored_bytes = manifest_bytes if stored is manifest else stored.to_bytes()
        new_latest = latest(stored, stored_bytes) if callable(latest) else latest
        if new_latest is not None:
            _check_name(new_latest.name)
        failpoint("remote-data")
        failpoint("remote-manifest")
        self.write_bytes(f"{name}/{MANIFEST_NAME}", stored_bytes)
        if new_latest is not None:
            failpoint("remote-latest")
            self.write_bytes(LATEST_NAME, new_latest.to_bytes())
        for old in doomed:
            failpoint("remote-delete")
            self.delete_checkpoint(old)
        return Committed(stored, stored_bytes, new_latest, sent + len(stored_bytes))

    def _check_commit(self, name: str, local_dir: Path, manifest: Manifest, delete: Iterable[str]) -> list[str]:
        """Refuse a commit that could touch anything outside the run or is missing local files; the names to
        delete after it."""
        _check_name(name)
        if manifest.name != name:
            raise ValueError(f"manifest describes {manifest.name!r} but the checkpoint is committed as {name!r}")
        for entry in manifest.files:
            check_relative_path(entry.path, where=f"{self.url}/{name}/{MANIFEST_NAME}")
        doomed = list(delete)
        for old in doomed:
            _check_name(old)
            if old == name:
                raise ValueError(f"{name!r} is both committed and deleted; refusing the commit")
        missing = [e.path for e in manifest.files if not (local_dir / e.path).is_file()]
        if missing:
            raise FileNotFoundError(f"{local_dir}: missing {missing[:5]} listed in the manifest of {name}")
        return doomed

    # ---- shared logic --------------------------------------------------------------------------------------
    def read_manifest(self, name: str) -> tuple[Manifest, bytes]:
        """Fetch and validate ``NAME/manifest.json``; raise CheckpointCorrupt (or subclass) when it is bad."""
        _check_name(name)
        data = self.read_bytes(f"{name}/{MANIFEST_NAME}")
        manifest = Manifest.from_bytes(data, where=f"{self.url}/{name}/{MANIFEST_NAME}")
        if manifest.name != name:
            raise CheckpointCorrupt(f"{self.url}/{name}/{MANIFEST_NAME}: manifest describes {manifest.name!r}")
        return manifest, data

    def read_latest(self) -> Latest | None:
        """The LATEST hint, or None when missing or damaged."""
        try:
            return Latest.from_bytes(self.read_bytes(LATEST_NAME, max_size=64 * 1024))
        except (FileNotFoundError, UnsafeCheckpoint):
            return None

    def check_uploaded(self, name: str, manifest: Manifest) -> None:
        """Check a just-uploaded checkpoint without downloading it: every file exists with the manifest's size.
        Backends that know a store checksum they can compare cheaply may extend this."""
        stats = self._parallel(lambda e: self.stat(f"{name}/{e.path}"), manifest.files)
        for entry, st in zip(manifest.files, stats, strict=True):
            if st.size != entry.size:
                raise RemoteError(
                    f"{self.url}/{name}/{entry.path}: store holds {st.size} bytes, manifest says {entry.size}"
                )
            store_crc = _crc32c_hex(st.checksums.get("crc32c"))
            if entry.crc32c and store_crc and store_crc != entry.crc32c:
                raise RemoteError(
                    f"{self.url}/{name}/{entry.path}: store's CRC32C {store_crc} differs from the manifest's "
                    f"{entry.crc32c}: the upload was damaged"
                )

    def download_checkpoint(
        self,
        name: str,
        manifest: Manifest,
        dest_dir: Path,
        progress: ProgressFn | None = None,
        *,
        keep: bool = False,
    ) -> dict[str, Any]:
        """Download every file of ``manifest`` into ``dest_dir``, hashing while the bytes arrive.

        Sizes are checked against the store before any byte is fetched, and every file against its digest as it
        streams, so a hostile or damaged object is refused without a second read. Raises CheckpointCorrupt.
        ``keep``: also return every file's verified bytes, by path, in anonymous memory the files were written
        from (:class:`~syncckpt.local.KeptFile`), for a caller that loads them next; else an empty dict.
        """
        dest_dir = Path(dest_dir)
        for entry in manifest.files:
            check_relative_path(entry.path)
        objects = [(rel, size) for entry in manifest.files for rel, size, _ in _objects(name, entry)]
        try:
            stats = self._parallel(lambda o: self.stat(o[0]), objects)
        except FileNotFoundError as e:  # a file the manifest lists is not in the store: damaged, not absent
            raise CheckpointCorrupt(f"{self.url}/{name}: a file the manifest lists is missing ({e})") from None
        for (rel, size), st in zip(objects, stats, strict=True):
            if st.size != size:
                raise CheckpointCorrupt(f"{self.url}/{rel}: store holds {st.size} bytes, manifest says {size}")
        free = _free_bytes(dest_dir)
        if free is not None and manifest.total_size > free:
            raise CheckpointCorrupt(
                f"{self.url}/{name}: needs {manifest.total_size} bytes but {dest_dir} has {free} free"
            )
        try:
            kept = self._parallel(lambda e: self._download_one(name, e, dest_dir, progress, keep), manifest.files)
        except FileNotFoundError as e:  # deleted between the size check and the download
            raise CheckpointCorrupt(f"{self.url}/{name}: a file vanished while downloading ({e})") from None
        return {e.path: buf for e, buf in zip(manifest.files, kept, strict=True)} if keep else {}

    def _download_one(
        self, name: str, entry: FileEntry, dest_dir: Path, progress: ProgressFn | None, keep: bool = False
    ) -> Any:
        target = (dest_dir / entry.path).resolve()
        if not target.is_relative_to(dest_dir.resolve()):
            raise UnsafeCheckpoint(f"{entry.path}: resolves outside {dest_dir}")
        target.parent.mkdir(parents=True, exist_ok=True)
        whole = hashlib.sha256()
        total = 0
        kept = None
        with local.KeptFile(target, entry.size) if keep else open(target, "wb") as dst:
            for rel, size, digest in _objects(name, entry):
                part = hashlib.sha256() if digest else None
                got = 0
                with self.open_read(rel, size) as src:  # sizes checked against the store above
                    while True:
                        chunk = src.read(min(CHUNK, size - got + 1))  # +1 detects an object longer than promised
                        if not chunk:
                            break
                        got += len(chunk)
                        if got > size:
                            raise CheckpointCorrupt(f"{self.url}/{rel}: longer than the manifest's {size} bytes")
                        whole.update(chunk)
                        if part is not None:
                            part.update(chunk)
                        dst.write(chunk)
                        if progress:
                            progress(len(chunk))
                if part is not None and (got != size or part.hexdigest() != digest):
                    raise CheckpointCorrupt(f"{self.url}/{rel}: blob does not match its digest (part of {entry.path})")
                total += got
            if isinstance(dst, local.KeptFile):
                kept = dst.close()
            else:
                dst.flush()
                os.fsync(dst.fileno())
        try:
            verify_digest(entry, total, whole.hexdigest())
        except CheckpointCorrupt as e:
            raise CheckpointCorrupt(f"{self.url}/{name}/{e}") from None
        return kept

    def _parallel(self, fn, items):  # type: ignore[no-untyped-def]
        items = list(items)
        if len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(
            max_workers=min(self.max_workers, len(items)), thread_name_prefix="syncckpt-xfer"
        ) as ex:
            return list(ex.map(fn, items))

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release clients and pools. Safe to call twice."""

    def stop_retrying(self) -> None:  # noqa: B027 - optional hook: a backend without retries has nothing to stop
        """From now on no transient failure is retried and a wait between attempts ends at once (the end of a
        grace period: the process is about to exit, and what did not reach the store stays local)."""


#: How a checkpoint's data reaches the store: ``put(remote, name, local_dir, manifest, progress)`` sends the data
#: of ``manifest``'s files from ``local_dir``, checks it in the store without downloading it, and returns the
#: manifest the store is to hold and the number of bytes sent.
Put = Callable[[Remote, str, Path, Manifest, "ProgressFn | None"], tuple[Manifest, int]]


def put_whole_files(
    remote: Remote, name: str, local_dir: Path, manifest: Manifest, progress: ProgressFn | None
) -> tuple[Manifest, int]:
    """Each file to ``NAME/PATH`` (``max_workers`` at once), then :meth:`Remote.check_uploaded`.

    A checkpoint of the same name already in the store (``best_model`` saved again) is deleted first, so its old
    manifest never describes a mix of old and new files.
    """
    remote.delete_checkpoint(name)
    send_files(remote, name, local_dir, manifest.files, progress)
    remote.check_uploaded(name, manifest)
    return manifest, manifest.total_size


def send_files(
    remote: Remote, name: str, local_dir: Path, files: Iterable[FileEntry], progress: ProgressFn | None
) -> None:
    """Upload each of ``files`` from ``local_dir`` to ``NAME/PATH``, ``max_workers`` at once (the one loop every
    whole-file put uses)."""
    remote._parallel(lambda e: remote._upload(local_dir / e.path, f"{name}/{e.path}", e.size, progress), files)


def _one_at_a_time(progress: ProgressFn | None) -> ProgressFn | None:
    if progress is None:
        return None
    lock = threading.Lock()

    def report(n: int) -> None:
        with lock:
            progress(n)

    return report


def _crc32c_hex(value: str | None) -> str | None:
    """GCS reports CRC32C as base64 of 4 big-endian bytes; the manifest keeps 8 hex digits."""
    if not value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return raw.hex() if len(raw) == 4 else None


def _objects(name: str, entry: FileEntry) -> list[tuple[str, int, str | None]]:
    """The store objects holding one file: the file itself, or its content-addressed parts (incremental runs)."""
    if entry.parts is None:
        return [(f"{name}/{entry.path}", entry.size, None)]
    return [(blob_rel(digest), size, digest) for size, digest in entry.parts]


def _check_name(name: str) -> None:
    if parse_checkpoint_name(name) is None:
        raise UnsafeCheckpoint(f"{name!r} is not a checkpoint folder name")


def _free_bytes(path: Path) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
