"""s3://, gs://, file://, plain paths, memory:// and any other fsspec protocol behind the :class:`Remote` interface.

Options go to the fsspec backend unchanged, as ``storage_options`` (``key``/``secret``/``client_kwargs`` for s3fs,
``token``/``endpoint_url`` for gcsfs, ...). A mounted Google Drive or NFS share is just a local path.

>>> import pathlib, tempfile
>>> from syncckpt.manifest import FileEntry, Latest, Manifest, sha256_hex
>>> src = pathlib.Path(tempfile.mkdtemp())
>>> _ = (src / "model.safetensors").write_bytes(b"weights")
>>> m = Manifest(name="checkpoint-step-10", kind="step", global_step=10, epoch=0, batch_idx=9,
...              files=[FileEntry("model.safetensors", 7, sha256_hex(b"weights"))])
>>> r = FsspecRemote("memory://fsspec-doc/run")
>>> _ = r.commit_checkpoint(m.name, src, m, m.to_bytes(), Latest(m.name, 10, sha256_hex(m.to_bytes())))
>>> r.list_checkpoints(), r.read_latest().name
(['checkpoint-step-10'], 'checkpoint-step-10')
>>> r.create_exclusive(".lease", b"session-a"), r.create_exclusive(".lease", b"session-b")
(True, False)
>>> r.delete_checkpoint("checkpoint-step-10"); r.list_checkpoints()
[]
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from fsspec.asyn import AsyncFileSystem, sync
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractFileSystem

from .._secrets import Scrubber, safe_url
from ..blobs import BLOB_DIR
from ..errors import RemoteError, SyncCkptError, UnsafeCheckpoint
from ..manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, check_relative_path, parse_checkpoint_name
from . import localfs, s3_direct, streams
from .base import ProgressFn, Remote, RemoteStat, _check_name
from .client_options import put_options, with_client_defaults
from .retry import DEFAULT_POLICY, RetryPolicy, describe, is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# memory:// lives in this process; one lock makes its check-then-create atomic for every remote in it.
_MEMORY_CREATE_LOCK = threading.Lock()


class FsspecRemote(Remote):
    """A run prefix in any fsspec filesystem.

    ``url`` is the run prefix (``s3://bucket/runs/nli-1``, ``gs://...``, ``/content/drive/MyDrive/run``,
    ``memory://name``); ``storage_options`` go to the backend; ``max_workers`` files move at once (s3fs and gcsfs
    also split large files into parallel parts); ``retry`` says how hard to retry transient failures.

    Every relative path is checked with ``check_relative_path`` and every checkpoint name with
    ``parse_checkpoint_name`` before it is joined to the prefix, so nothing outside the prefix is ever touched.
    The backend is rebuilt in a forked child, whose copy of the parent's event loop and sessions is unusable.

    >>> r = FsspecRemote("memory://fsspec-doc-2/run")
    >>> r.write_bytes("notes/a.txt", b"hi"); r.read_bytes("notes/a.txt"), r.stat("notes/a.txt").size
    (b'hi', 2)
    >>> r.read_bytes("../outside")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    syncckpt.errors.UnsafeCheckpoint: memory://fsspec-doc-2/run: file path '../outside' escapes ...
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        max_workers: int = 8,
        *,
        retry: RetryPolicy | None = None,
    ):
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.url = safe_url(url)
        self.max_workers = max_workers
        self.retry = retry or DEFAULT_POLICY
        self._no_more_retries = threading.Event()  # set by stop_retrying()
        self._raw_url = url
        self._options = dict(storage_options or {})
        self._scrub = Scrubber(self._options, urls=[url])
        self._lock = threading.Lock()
        self._fs: AbstractFileSystem | None = None
        self._pid = -1
        self._root = ""
        self._warned_not_atomic = False
        self._read_budget = streams.read_budget()
        self._direct: s3_direct.DirectS3Put | None = None  # S3 data files through obstore (s3_direct)
        self._direct_pid = -1  # the process _direct was built in (-1: not yet; rebuilt after fork)
        self._direct_refused = False  # it failed where s3fs did not: s3fs for good
        self._filesystem()
        self.keeps_crc32c = self._kind == "gcs"

    def __repr__(self) -> str:
        return f"FsspecRemote({self.url!r})"

    def stop_retrying(self) -> None:
        self._no_more_retries.set()

    # ---- the backend, rebuilt after fork ---------------------------------------------------------------------
    def _filesystem(self) -> AbstractFileSystem:
        if self._fs is not None and self._pid == os.getpid():
            return self._fs
        if self._pid != os.getpid():
            self._lock = threading.Lock()  # a lock copied by fork may be held by a thread that no longer exists
        with self._lock:
            if self._fs is None or self._pid != os.getpid():
                try:
                    # skip_instance_cache: this remote's sessions and listing cache are its own, and a child
                    # process never reuses an instance (with its event loop) inherited from its parent.
                    options = with_client_defaults(self._raw_url, self._options)
                    fs, root = url_to_fs(self._raw_url, skip_instance_cache=True, **options)
                except Exception as e:
                    raise RemoteError(f"{self.url}: cannot open the store: {self._scrub(describe(e))}") from None
                root = root.rstrip("/")
                if not root and not isinstance(fs, LocalFileSystem):
                    raise RemoteError(f"{self.url}: the URL names no bucket or folder")
                self._fs, self._root, self._pid = fs, root, os.getpid()
        return self._fs

    @property
    def _kind(self) -> str:
        fs = self._filesystem()
        if isinstance(fs, LocalFileSystem):
            return "local"
        if isinstance(fs, MemoryFileSystem):
            return "memory"
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if protocols & {"s3", "s3a"}:
            return "s3"
        if protocols & {"gs", "gcs"}:
            return "gcs"
        return "other"

    def close(self) -> None:
        """Drop the backend instance; the next call builds a fresh one."""
        with self._lock:
            self._fs = None
            self._direct, self._direct_pid = None, -1

    # ---- paths ----------------------------------------------------------------------------------------------
    def _path(self, rel: str) -> str:
        _check_rel(rel, self.url)
        self._filesystem()
        return f"{self._root}/{rel}"

    # ---- Remote primitives ------------------------------------------------------------------------------------
    def list_checkpoints(self, *, besides: Iterable[str] = ()) -> list[str]:
        """Checkpoint folders that hold a manifest.json (but ``besides``: no HEAD for those); listing caches are
        dropped first (others may write)."""
        fs = self._filesystem()
        fs.invalidate_cache()
        try:
            entries = self._run("list", "", fs.ls, self._root, detail=True, not_found=True)
        except FileNotFoundError:
            missing = self._missing_bucket_error("list")
            if missing is not None:
                raise missing from None
            return []
        names, skip = [], set(besides)
        for entry in entries:
            base = str(entry.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "directory" and parse_checkpoint_name(base) is not None and base not in skip:
                names.append(base)
        complete = self._parallel(lambda n: self.exists(f"{n}/{MANIFEST_NAME}"), names)
        return [n for n, ok in zip(names, complete, strict=True) if ok]

    def read_bytes(self, rel: str, *, max_size: int = MAX_MANIFEST_BYTES) -> bytes:
        """Read a small object whole; FileNotFoundError when absent, UnsafeCheckpoint when over ``max_size``."""
        path = self._path(rel)
        fs = self._filesystem()
        if self._kind not in ("s3", "gcs"):  # a store that may not honour ranges: the size is checked first
            size = self.stat(rel).size
            if size > max_size:
                raise UnsafeCheckpoint(f"{self.url}/{rel}: {size} bytes is over the {max_size}-byte limit; refusing it")

        def ranged() -> bytes:
            # One request: the first max_size + 1 bytes (one more than allowed tells an object that is too large),
            # instead of a metadata request first; S3 answers 404 for a missing key (s3fs's info would list too).
            try:
                return fs.cat_file(path, start=0, end=max_size + 1)
            except FileNotFoundError:
                raise
            except IsADirectoryError as e:  # a folder (a local store) is no object, as on S3
                raise FileNotFoundError(path) from e
            except Exception as e:  # a ranged read of an empty object is answered 416 (S3, GCS); others stay errors
                if not _range_refused(e) or self._info(path).get("size") != 0:
                    raise
                return b""

        data = self._run("read", rel, ranged, not_found=True)
        if len(data) > max_size:
            raise UnsafeCheckpoint(f"{self.url}/{rel}: over the {max_size}-byte limit; refusing it")
        return data

    def open_read(self, rel: str, size: int | None = None) -> BinaryIO:
        """A sequential reader. An S3 object of up to ``streams.STREAM_MAX`` bytes is one streamed GET, read a
        chunk ahead (:class:`~syncckpt.remote.streams.StreamReader`); a larger object, or any on GCS, is read as
        parallel ranges, each retried on its own (one stream per large file is bound by one connection; s3fs/gcsfs
        ``get`` fetch parts concurrently too); elsewhere a stream that reopens at its offset and carries on after a
        transient failure."""
        path = self._path(rel)
        if self._kind in ("local", "memory"):
            return streams.RetryingReader(self, rel, path)  # type: ignore[return-value]
        if size is None:
            size = self.stat(rel).size
        if self._kind == "s3" and size <= streams.STREAM_MAX:
            return streams.StreamReader(self, rel, path, size)  # type: ignore[return-value]
        return streams.PrefetchReader(self, rel, path, size)  # type: ignore[return-value]

    def stat(self, rel: str) -> RemoteStat:
        """Size and the checksums the store keeps: GCS ``md5`` (hex) and ``crc32c`` (base64); S3 ``etag``
        (the MD5 hex only for single-part unencrypted uploads) and any ``Checksum*`` it reports (``sha256`` as hex,
        CRCs as base64). Local files and memory:// report none."""
        path = self._path(rel)
        info = self._run("stat", rel, self._info, path, not_found=True)
        if info.get("type") == "directory":
            raise FileNotFoundError(f"{self.url}/{rel}: is a folder, not an object")
        return RemoteStat(size=int(info.get("size") or 0), checksums=_checksums(info))

    def exists(self, rel: str) -> bool:
        """On S3 one HEAD: s3fs's info of a missing key lists its prefix too (is it a folder?), a second request
        for every checkpoint retention weighs while the newest one's manifest is not written yet."""
        if self._kind != "s3":
            return super().exists(rel)
        fs = self._filesystem()
        bucket, key, _ = fs.split_path(self._path(rel))
        return self._run("stat", rel, _head_s3, fs, bucket, key)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Create or overwrite a small object; on a local path the replacement is atomic (rename)."""
        path = self._path(rel)
        if self._kind == "local":
            self._run("write", rel, localfs.write_atomic, path, data)
            return
        fs = self._filesystem()
        if not isinstance(fs, AsyncFileSystem):
            # Object stores have no folders; sync backends (sftp, smb, ...) want the parent to exist. Never done
            # for object stores: s3fs.makedirs would create a missing bucket instead of failing.
            self._run("mkdir", rel, fs.makedirs, fs._parent(path), exist_ok=True)
        self._run("write", rel, fs.pipe_file, path, data)

    def delete(self, rel: str) -> None:
        """Delete one object; absent is fine."""
        self._delete_path(rel, self._path(rel))

    def delete_checkpoint(self, name: str) -> None:
        """Delete ``NAME/manifest.json`` first, so the folder stops counting as a checkpoint, then the rest."""
        _check_name(name)
        self.delete(f"{name}/{MANIFEST_NAME}")
        folder = self._path(name)
        if self._kind == "local":
            self._run("delete", name, localfs.rmtree_quiet, folder)
            return
        fs = self._filesystem()
        inside = self._objects_under(name)
        self._parallel(lambda p: self._delete_path(name, p), inside)
        if not isinstance(fs, AsyncFileSystem):
            self._run("delete", name, _rmdir_quiet, fs, folder)

    def clear_uncommitted(self, name: str) -> bool:
        """On S3 one listing of ``NAME/`` instead of a HEAD of its manifest and then the deletion's own requests
        (four requests before a save's first byte, against one): a manifest among the objects means committed;
        otherwise the objects listed, usually none, are deleted. Elsewhere the base's stat, then delete."""
        if self._kind != "s3":  # a metadata request is as cheap there, and needs no consistent listing
            return super().clear_uncommitted(name)
        _check_name(name)
        inside = self._objects_under(name)
        if f"{self._path(name)}/{MANIFEST_NAME}" in inside:  # S3 lists what was written, at once
            return False
        self._parallel(lambda p: self._delete_path(name, p), inside)
        return True

    def list_blobs(self) -> list[str]:
        """Digests of the blobs under ``blobs/`` (incremental mirroring), bypassing listing caches."""
        fs = self._filesystem()
        root = self._path(BLOB_DIR)
        fs.invalidate_cache(root)
        found = self._run("list", BLOB_DIR, _find_quiet, fs, root)
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in found if _HEX64.match(p.rstrip("/").rsplit("/", 1)[-1])]

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if it does not exist yet; True when created. The store's own
        conditional write where it has one (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, a hard link or
        ``O_EXCL`` on local paths, a lock for ``memory://``); elsewhere check-then-write, with a warning. A create
        whose reply was lost and that was retried counts as ours when the object holds exactly ``data``: put
        something unique in it (a session id)."""
        path = self._path(rel)
        kind = self._kind
        if kind == "local":
            return self._run("create", rel, localfs.create_exclusive, path, data)
        fs = self._filesystem()
        if kind == "memory":
            with _MEMORY_CREATE_LOCK:
                if fs.exists(path):
                    return False
                fs.pipe_file(path, data)
                return True
        if kind in ("s3", "gcs"):
            try:
                self._run("create", rel, fs.pipe_file, path, data, mode="create")
                return True
            except FileExistsError:
                return self._holds(rel, data)
        if not self._warned_not_atomic:
            self._warned_not_atomic = True
            log.warning(
                "%s: this store offers no conditional create; create_exclusive checks then writes, "
                "so two writers racing can both believe they created the object",
                self.url,
            )
        if self.exists(rel):
            return False
        self.write_bytes(rel, data)
        return True

    def check_uploaded(self, name: str, manifest: Manifest) -> None:
        """Sizes (and GCS's CRC32C) in the store; on a local path every file is also read back and its SHA-256
        checked (a mounted Drive acknowledges writes before it holds them)."""
        super().check_uploaded(name, manifest)
        if self._kind == "local":
            localfs.read_back(self._path(name), manifest, f"{self.url}/{name}")

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _upload(self, local: Path, rel: str, size: int, progress: ProgressFn | None = None) -> None:
        """Upload one file; on object stores fsspec's ``put_file`` streams it from disk and switches to multipart
        or resumable uploads for large files, and on S3 the file goes through obstore where it can
        (:mod:`~syncckpt.remote.s3_direct`, which reads the file past the page cache). A retry starts the file
        again; its bytes are not counted twice."""
        path = self._path(rel)
        counter = streams.Progress(progress, size)

        def once() -> None:
            counter.restart()
            if self._kind == "local":
                localfs.copy_durable(local, path, counter)
                return
            direct = self._direct_put()
            failure: BaseException | None = None
            if direct is not None:
                try:
                    report = None if progress is None else counter.relative_update
                    direct.put(local, path.split("/", 1)[1], size, progress=report)
                    return
                except Exception as e:
                    if s3_direct.transient_status(e):  # the store's passing trouble: retried, on this path
                        raise ConnectionError(self._scrub(s3_direct.summary(e))) from None
                    failure = e  # refused, or no HTTP answer at all: s3fs tries the same file next
                if self._no_more_retries.is_set():
                    raise ConnectionError(self._scrub(s3_direct.summary(failure))) from None
            counter.restart()  # obstore may have reported part of the file: s3fs counts from 0 (never twice)
            self._filesystem().put_file(str(local), path, callback=counter, **self._put_options())
            if failure is not None:
                self._drop_direct(direct, failure)

        self._run("upload", rel, once)
        counter.finish()

    def _direct_put(self) -> s3_direct.DirectS3Put | None:
        """The obstore path for S3 uploads, built once per process (None: uploads stay on s3fs)."""
        if self._kind != "s3" or self._direct_refused:
            return None
        fs, pid = self._filesystem(), os.getpid()
        with self._lock:
            if self._direct_pid == pid:
                return self._direct
        built = None
        try:  # outside the lock: on AWS it asks the bucket's region, which close() must not wait for
            built = s3_direct.DirectS3Put.for_filesystem(fs, self._root.split("/", 1)[0], self._options)
        except Exception as e:  # s3fs opened this store; what it uploads still gets there
            log.info("%s: S3 uploads go through s3fs: %s", self.url, self._scrub(describe(e)))
        with self._lock:
            if self._direct_pid != pid and not self._direct_refused:
                self._direct, self._direct_pid = built, pid
            return self._direct

    def _drop_direct(self, direct: Any, failure: BaseException) -> None:
        """s3fs uploaded what the direct path could not: not the store failing, so keep to s3fs from now on (for
        this remote, also after :meth:`close`); one warning, from the thread that dropped it."""
        with self._lock:
            if self._direct is not direct or self._direct_refused:
                return
            self._direct, self._direct_refused = None, True
        log.warning(
            "%s: S3 uploads go through s3fs from now on; the direct path failed where s3fs did not: %s",
            self.url,
            self._scrub(s3_direct.summary(failure)),
        )

    def _put_options(self) -> dict[str, Any]:
        return put_options(self._kind, self._options)

    def _info(self, path: str) -> dict[str, Any]:
        fs = self._filesystem()
        fs.invalidate_cache(path)  # a listing cached earlier may hold an old size
        return fs.info(path)

    def _holds(self, rel: str, data: bytes) -> bool:
        try:
            return self.read_bytes(rel, max_size=len(data)) == data
        except (FileNotFoundError, UnsafeCheckpoint):
            return False

    def _objects_under(self, name: str) -> list[str]:
        """Every object under ``NAME/`` (paths without the protocol), bypassing listing caches. On S3 one
        ListObjectsV2 per 1,000 keys: s3fs's ``find`` of an empty prefix asks twice more (a HEAD and a listing) to
        tell a missing folder from an object, and an empty answer is the usual one before a save's first byte."""
        fs = self._filesystem()
        folder = self._path(name)
        fs.invalidate_cache(folder)
        if self._kind == "s3":
            bucket, key, _ = fs.split_path(folder)
            return self._run("list", name, _list_s3, fs, bucket, key + "/")
        paths = self._run("list", name, _find_quiet, fs, folder)
        # Only exact descendants of the folder: checkpoint-step-1 must never take checkpoint-step-10 with it.
        return [p for p in map(fs._strip_protocol, paths) if p.startswith(folder + "/")]

    def _delete_path(self, rel: str, path: str) -> None:
        fs = self._filesystem()

        def rm() -> None:
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass

        self._run("delete", rel, rm)

    def _run(self, op: str, rel: str, fn: Callable[..., T], *args: Any, not_found: bool = False, **kwargs: Any) -> T:
        """Call ``fn`` under the retry policy and turn what escapes into errors that name the URL, never secrets.

        ``not_found``: a FileNotFoundError means "no such object" and is raised as one; otherwise it means a
        missing bucket or folder and becomes a RemoteError.
        """
        where = f"{self.url}/{rel}" if rel else self.url
        err: BaseException
        try:
            return self.retry.call(
                fn, *args, what=f"{op} {where}", scrub=self._scrub, abort=self._no_more_retries, **kwargs
            )
        except (SyncCkptError, FileExistsError):
            raise
        except FileNotFoundError as e:
            if _no_such_bucket(e):
                bucket = self._root.split("/")[0]
                err = RemoteError(f"{where}: {op} failed: bucket {bucket!r} does not exist; create it or fix the URL")
                cause = None
            elif not_found:
                err, cause = FileNotFoundError(f"{where}: no such object"), None
            else:
                err = self._missing_bucket_error(op) or self._error(op, where, e)
                cause = self._scrub.safe_cause(e)
        except Exception as e:
            err, cause = self._error(op, where, e), self._scrub.safe_cause(e)
        # Raised outside the handler, so Python does not attach the store's exception as __context__: one that
        # carries a secret must not travel with ours; a clean one is chained explicitly.
        raise err from cause

    def _error(self, op: str, where: str, e: BaseException) -> RemoteError:
        if is_transient(e):
            hint = "the store or the network kept failing; check connectivity and try again later"
            return RemoteError(f"{where}: {op} gave up after retries: {self._scrub(describe(e))}; {hint}")
        if isinstance(e, PermissionError):
            hint = "access denied: check the credentials in storage_options and the bucket's permissions"
            return RemoteError(f"{where}: {op} failed: {self._scrub(describe(e))}; {hint}")
        return RemoteError(f"{where}: {op} failed: {self._scrub(describe(e))}")

    def _missing_bucket_error(self, op: str) -> RemoteError | None:
        """Stores like GCS answer a bare 404 for a missing bucket too; ask about the bucket itself."""
        fs = self._filesystem()
        split = getattr(fs, "split_path", None)
        if split is None:
            return None
        bucket = split(self._root)[0]
        try:
            fs.info(bucket)
        except FileNotFoundError:
            return RemoteError(f"{self.url}: {op} failed: bucket {bucket!r} does not exist; create it or fix the URL")
        except Exception:
            pass  # no permission to look at the bucket, or a hiccup: not evidence it is missing
        return None


# ---- any filesystem ---------------------------------------------------------------------------------------------
def _find_quiet(fs: AbstractFileSystem, path: str) -> list[str]:
    try:
        return list(fs.find(path))
    except FileNotFoundError:
        return []


def _list_s3(fs: Any, bucket: str, prefix: str) -> list[str]:
    """``bucket/key`` of every object whose key starts with ``prefix``, through s3fs's client (which adds the
    storage options' ``s3_additional_kwargs``; requester pays is passed here, as s3fs before 2026.9 does not)."""
    out: list[str] = []
    token: dict[str, str] = {}
    while True:
        resp = sync(fs.loop, fs._call_s3, "list_objects_v2", Bucket=bucket, Prefix=prefix, **token, **fs.req_kw)
        out.extend(f"{bucket}/{o['Key']}" for o in resp.get("Contents", []))
        if not resp.get("IsTruncated"):
            return out
        token = {"ContinuationToken": resp["NextContinuationToken"]}


def _range_refused(e: BaseException | None) -> bool:
    """A 416: gcsfs's ``HttpError.code``, or s3fs's error with botocore's InvalidRange (or a 416 status) as its
    cause, whatever message the store sent."""
    while e is not None:
        if getattr(e, "code", None) == 416 or "range is not satisfiable" in str(e):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code in ("InvalidRange", "416") or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 416:
                return True
        e = e.__cause__ or e.__context__
    return False


def _head_s3(fs: Any, bucket: str, key: str) -> bool:
    try:
        sync(fs.loop, fs._call_s3, "head_object", Bucket=bucket, Key=key, **fs.req_kw)
        return True
    except FileNotFoundError:
        return False


def _rmdir_quiet(fs: AbstractFileSystem, path: str) -> None:
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _check_rel(rel: str, url: str) -> None:
    """check_relative_path, plus dot-files at the run root (``.lease``)."""
    if isinstance(rel, str) and rel.startswith(".") and "/" not in rel and rel not in (".", ".."):
        check_relative_path(rel[1:], where=url)
    else:
        check_relative_path(rel, where=url)


def _no_such_bucket(e: BaseException) -> bool:
    """S3 names a missing bucket in the error code (s3fs keeps the botocore error as the cause)."""
    cur: BaseException | None = e
    seen: set[int] = set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        response = getattr(cur, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") == "NoSuchBucket":
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _checksums(info: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        if info.get("md5Hash"):  # GCS, base64
            out["md5"] = base64.b64decode(info["md5Hash"]).hex()
        if info.get("crc32c"):  # GCS, base64 big-endian
            out["crc32c"] = str(info["crc32c"])
        if info.get("ETag"):  # S3
            out["etag"] = str(info["ETag"]).strip('"')
        for key, value in info.items():
            # S3 additional checksums; composite ones ("...-3", multipart) cannot be compared with a whole-file hash
            if key.startswith("Checksum") and key != "ChecksumType" and isinstance(value, str) and "-" not in value:
                algo = key[len("Checksum") :].lower()
                out[algo] = base64.b64decode(value).hex() if algo == "sha256" else value
    except (ValueError, TypeError):
        pass  # a checksum we cannot decode is only a missed shortcut; sizes and SHA-256 still protect the data
    return out
