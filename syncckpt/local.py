"""Checkpoints on the local disk: atomic commit, listing, verification, loading, deletion, leftover cleanup.

Atomicity is by rename (Orbax calls this strategy "rename"): a checkpoint is written into a hidden temporary
sibling, every file and the folder are fsynced, ``manifest.json`` is written last, and one ``rename`` makes it
visible. A crash at any instant leaves either the old set of checkpoints or the new one. Hidden leftovers
(``.tmp-*``, ``.old-*``, ``.del-*``, ``.upload-*``, ``.pull-*``) are cleaned up by :func:`cleanup_leftovers` on the
next start; quarantined checkpoints (``.quarantine-*``, see :mod:`syncckpt.quarantine`) are never touched.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> def write(tmp):
...     return [write_file(tmp, "a.json", [b'{"x": 1}'])]
>>> m = commit(d, Manifest("checkpoint-step-3", "step", 3, 0, 5, files=[]), write)
>>> [c.name for c in list_checkpoints(d)], verify(d / "checkpoint-step-3")[0].global_step
(['checkpoint-step-3'], 3)
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ._failpoints import failpoint
from .errors import CheckpointCorrupt, UnsafeCheckpoint
from .manifest import (
    MANIFEST_NAME,
    FileEntry,
    HashingWriter,
    Manifest,
    check_relative_path,
    parse_checkpoint_name,
    sha256_hex,
    verify_digest,
)

log = logging.getLogger("syncckpt")

_HIDDEN_PREFIXES = (".tmp-", ".old-", ".del-", ".upload-", ".pull-")


@dataclass(frozen=True)
class LocalCheckpoint:
    """A committed checkpoint folder whose manifest parsed (its data is verified only on load)."""

    name: str
    path: Path
    manifest: Manifest
    manifest_sha256: str


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable; the one fsync of folders every writer uses. Some
    file systems (FUSE mounts, Drive) cannot open or fsync a folder: that is not an error there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: O_DIRECT transfers start at, and span, multiples of this (the largest logical block size in common use).
DIRECT_BLOCK = 4096
_DIRECT_FLUSH = 8 << 20  # how much KeptFile and a direct write_file gather before they write to disk


#: Set to ``0`` to write and read every checkpoint file through the page cache (a file system on which
#: ``O_DIRECT`` is slow or misbehaves); read when a file is opened.
DIRECT_IO_ENV = "SYNCCKPT_DIRECT_IO"


def _direct_wanted() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get(DIRECT_IO_ENV, "1").strip() != "0"


def _aligned(size: int) -> mmap.mmap:
    """Zeroed, page-aligned anonymous memory (what ``O_DIRECT`` transfers need), private to this process."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class _DirectOut:
    """A new file written with ``O_DIRECT`` (past the page cache) where the file system takes it, and through
    the page cache where it does not (tmpfs refuses the flag at open; some file systems take it there and refuse
    the first transfer). Writes start at multiples of ``DIRECT_BLOCK``, from page-aligned memory."""

    def __init__(self, path: Path) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = _direct_wanted()
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as e:
            if not self.direct or e.errno != errno.EINVAL:
                raise
            self.direct = False
            self.fd = os.open(path, flags, 0o644)

    def pwrite(self, data: memoryview, offset: int) -> None:
        """All of ``data`` at ``offset`` (a multiple of ``DIRECT_BLOCK``, as is ``len(data)`` unless it ends the
        file: see :meth:`finish`)."""
        while len(data):
            try:
                n = os.pwrite(self.fd, data, offset)
            except OSError as e:
                if not self.direct or e.errno != errno.EINVAL:
                    raise
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                continue
            data, offset = data[n:], offset + n

    def finish(self, last: mmap.mmap, n: int, offset: int) -> None:
        """Write the file's last ``n`` bytes, the start of the aligned buffer ``last``, at ``offset``, and fsync.
        A direct transfer spans whole blocks: the buffer is padded with zeros up to the next block (it must have
        the room) and the file is then cut back to ``offset + n``."""
        if n % DIRECT_BLOCK and self.direct:
            padded = n + DIRECT_BLOCK - n % DIRECT_BLOCK
            last[n:padded] = bytes(padded - n)
            with memoryview(last) as whole, whole[:padded] as view:
                self.pwrite(view, offset)
            os.ftruncate(self.fd, offset + n)
        elif n:
            with memoryview(last) as whole, whole[:n] as view:
                self.pwrite(view, offset)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_BOUNCE = threading.local()  # each writing thread's staging buffer for direct writes, kept between files


class _BouncedFile:
    """The ``write`` a :class:`~syncckpt.manifest.HashingWriter` needs, for a new file written past the page cache:
    the bytes are gathered in one ``_DIRECT_FLUSH`` buffer per thread (reused, so its pages stay warm) and
    written from there with ``O_DIRECT``. A chunk is copied before ``write`` returns: the caller may reuse it."""

    def __init__(self, path: Path) -> None:
        self._out = _DirectOut(path)
        buffer = getattr(_BOUNCE, "buffer", None)
        if buffer is None:
            buffer = _BOUNCE.buffer = _aligned(_DIRECT_FLUSH)
        self._buffer: mmap.mmap = buffer
        self._fill = self._offset = 0

    def write(self, data: bytes | memoryview) -> int:
        with memoryview(data) as given, given.cast("B") as left:
            n = len(left)
            while len(left):
                take = min(len(left), _DIRECT_FLUSH - self._fill)
                self._buffer[self._fill : self._fill + take] = left[:take]
                self._fill += take
                left = left[take:]
                if self._fill == _DIRECT_FLUSH:
                    with memoryview(self._buffer) as view:
                        self._out.pwrite(view, self._offset)
                    self._offset += self._fill
                    self._fill = 0
        return n

    def finish(self) -> None:
        """Write what is gathered and fsync."""
        self._out.finish(self._buffer, self._fill, self._offset)

    def close(self) -> None:
        self._out.close()


def write_file(
    folder: Path, rel: str, chunks: Iterable[bytes | memoryview], *, crc32c: bool = False, direct: bool = False
) -> FileEntry:
    """Write ``chunks`` to ``folder/rel``, hashing on the way, fsync, and return its manifest entry.

    ``crc32c``: record the CRC32C as well (for a remote that keeps one per object: see ``Remote.keeps_crc32c``).
    ``direct``: write past the page cache (``O_DIRECT``, where the file system allows it), for a large file that
    is not read again soon, or only with :func:`read_direct` (a save's tensor files). Filling page-cache pages
    the machine has not used lately was most of a save's CPU on the CI machine kind: about 2.5 kernel CPU-s per
    GB, against 0.1 for copying the bytes into a warm buffer and writing them from there.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> e = write_file(d, "t.bin", [b"x" * 5000, memoryview(b"yz")], direct=True)
    >>> e.size, (d / "t.bin").read_bytes() == b"x" * 5000 + b"yz", e.sha256 == sha256_hex(b"x" * 5000 + b"yz")
    (5002, True, True)
    """
    check_relative_path(rel)
    target = folder / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if direct:
        out = _BouncedFile(target)
        try:
            w = HashingWriter(out, crc32c=crc32c)  # type: ignore[arg-type]  # it needs write() only
            try:
                for c in chunks:
                    w.write(c)
            finally:
                w.close()
            out.finish()
        finally:
            out.close()
        return FileEntry(rel, w.size, w.hexdigest(), crc32c=w.crc32c())
    with open(target, "wb") as f:
        w = HashingWriter(f, crc32c=crc32c)
        try:
            for c in chunks:
                w.write(c)
            f.flush()
        finally:
            w.close()
        os.fsync(f.fileno())
    return FileEntry(rel, w.size, w.hexdigest(), crc32c=w.crc32c())


def read_direct(path: Path, size: int, chunk: int = _DIRECT_FLUSH) -> Iterator[memoryview]:
    """The first ``size`` bytes of ``path``, ``chunk`` at a time, read past the page cache (``O_DIRECT``, where
    the file system allows it): for sending a file :func:`write_file` wrote with ``direct=True`` without filling
    cold page-cache pages (as costly as writing them). A file that is shorter than ``size`` now raises OSError
    (its check in the store would fail too); bytes past ``size`` are not read.

    Each chunk is read straight into aligned memory and handed over as a view of it, with no copy. A consumer
    may keep the views (obstore holds them until their part is sent): a buffer is filled again only once no view
    of it is left (:class:`_Buffers`), and new buffers are made while every one is held.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.bin"; _ = p.write_bytes(b"abc" * 3000)
    >>> b"".join(read_direct(p, 9000, chunk=4096)) == b"abc" * 3000
    True
    """
    chunk -= chunk % DIRECT_BLOCK
    if chunk <= 0:
        raise ValueError(f"chunk must be at least {DIRECT_BLOCK} bytes")
    direct = _direct_wanted()
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    except OSError as e:
        if not direct or e.errno != errno.EINVAL:
            raise
        direct = False
        fd = os.open(path, os.O_RDONLY)
    buffers = _read_buffers(chunk)
    try:
        offset = 0
        while offset < size:
            hold = buffers.take()
            try:
                got = os.preadv(fd, [hold], offset)
            except OSError as e:
                hold.release()
                if not direct or e.errno != errno.EINVAL:
                    raise
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                direct = False
                continue
            if got == 0:
                hold.release()
                raise OSError(f"{path}: ended {size - offset} bytes before its {size}")
            take = min(got, size - offset)
            offset += take
            with hold:
                view = hold[:take]
            yield view
            del view
    finally:
        os.close(fd)


class _Buffers:
    """Page-aligned buffers of one size for :func:`read_direct`, kept warm between files and saves: a fresh
    8 MiB buffer cost 0.4 to 0.7 CPU-s per GB read in page faults and zeroing on the CI machine kind, against
    0.04 for one used before. A buffer is handed out again only once no view of it is left: an mmap refuses to
    resize while a buffer of it is exported (a memoryview, or obstore's hold on one until its part is sent), so
    resizing one to its own size is the test. At most ``keep`` bytes are kept; past that, buffers are made for
    one use."""

    def __init__(self, size: int, keep: int) -> None:
        self.size, self._keep = size, keep
        self._kept: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> memoryview:
        """A view of a buffer no one else holds (the view holds it until released)."""
        with self._lock:  # the view is made under the lock: no other reader can take the same buffer
            for buffer in self._kept:
                try:
                    buffer.resize(self.size)
                except BufferError:
                    continue
                return memoryview(buffer)
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
            buffer = mmap.mmap(-1, self.size, flags=flags)
            if (len(self._kept) + 1) * self.size <= self._keep:
                self._kept.append(buffer)
            return memoryview(buffer)


#: How much warm read buffer :func:`read_direct` keeps: what obstore holds while it sends one file (4 parts of
#: 32 MiB in flight and one being gathered), for two files at once.
READ_BUFFER_BYTES = 2 * 5 * (32 << 20)
_POOLS: dict[int, _Buffers] = {}
_POOLS_LOCK = threading.Lock()


def _read_buffers(chunk: int) -> _Buffers:
    with _POOLS_LOCK:
        pool = _POOLS.get(chunk)
        if pool is None:
            pool = _POOLS[chunk] = _Buffers(chunk, READ_BUFFER_BYTES)
        return pool


class KeptFile:
    """A file of known size written from anonymous memory that stays the caller's: :meth:`close` returns it.

    For a checkpoint that is loaded right after it is downloaded: the bytes land in page-aligned anonymous
    memory, from which the tensors are then loaded (no read back), and reach the disk past the page cache
    (:class:`_DirectOut`, as :func:`write_file` with ``direct=True``). Either way the file is fsynced before
    :meth:`close` returns, and its size is exactly ``size``.

    >>> import tempfile, pathlib
    >>> f = KeptFile(pathlib.Path(tempfile.mkdtemp()) / "x.bin", 5000)
    >>> f.write(b"a" * 4999); f.write(b"b")
    >>> buf = f.close()
    >>> len(buf), f.path.read_bytes() == bytes(buf), buf[-1:]
    (5000, True, b'b')
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = Path(path), size
        # private: a process forked later (a DataLoader worker) gets its own copy-on-write pages, not these
        self._buffer: mmap.mmap | bytearray = _aligned(size) if size else bytearray()
        self._pos = self._flushed = 0
        self._out = _DirectOut(self.path)

    def write(self, chunk: bytes | memoryview) -> None:
        n = len(chunk)
        if self._pos + n > self.size:
            raise CheckpointCorrupt(f"{self.path.name}: more than the manifest's {self.size} bytes")
        self._buffer[self._pos : self._pos + n] = chunk
        self._pos += n
        if self._pos - self._flushed >= _DIRECT_FLUSH:
            self._write_out(self._pos - self._pos % DIRECT_BLOCK)

    def close(self) -> mmap.mmap | bytearray:
        """Write what is left (a last partial block padded with zeros, then the file cut back to its size),
        fsync, and return the buffer. A file shorter than announced is written as it is; the caller's size
        check refuses it."""
        try:
            self._write_out(self._pos - self._pos % DIRECT_BLOCK)
            tail = self._pos - self._flushed
            block = _aligned(DIRECT_BLOCK)
            try:
                block[:tail] = self._buffer[self._flushed : self._pos]
                self._out.finish(block, tail, self._flushed)
            finally:
                block.close()
            self._flushed = self._pos
        finally:
            self.abort()
        return self._buffer

    def abort(self) -> None:
        """Close the file without finishing it (the caller removes it); nothing once :meth:`close` ran."""
        self._out.close()

    def __enter__(self) -> KeptFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def _write_out(self, end: int) -> None:
        if end <= self._flushed:
            return
        with memoryview(self._buffer) as whole, whole[self._flushed : end] as view:
            self._out.pwrite(view, self._flushed)
        self._flushed = end


def hash_file(folder: Path, rel: str) -> FileEntry:
    """The manifest entry of a file another writer produced (DCP's shard files): one streaming read."""
    h = hashlib.sha256()
    size = 0
    with open(Path(folder) / check_relative_path(rel), "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            size += len(chunk)
    return FileEntry(rel, size, h.hexdigest())


def commit(
    directory: Path, manifest: Manifest, write: Callable[[Path], list[FileEntry]], *, tmp_name: str | None = None
) -> Manifest:
    """Atomically create ``directory/manifest.name``.

    ``write(tmp)`` writes the data files into the temporary folder and returns their entries. The manifest is
    written last with those entries. An existing folder of the same name (``best_model``, a re-saved step) is
    replaced: it is first renamed aside to ``.old-NAME-*`` and removed after the new one is in place; a crash
    between the two renames is repaired by :func:`cleanup_leftovers`.

    ``tmp_name`` names the temporary folder when other processes (the other ranks of a job) write into it too.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = manifest.name
    tmp = directory / (tmp_name or f".tmp-{name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(exist_ok=tmp_name is not None)
    try:
        entries = write(tmp)
        manifest = dataclasses.replace(manifest, files=sorted(entries, key=lambda e: e.path))
        write_file(tmp, MANIFEST_NAME, [manifest.to_bytes()])
        fsync_dir(tmp)
        failpoint("local-manifest")
        final = directory / name
        old = None
        if final.exists():
            old = directory / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        failpoint("local-rename")
        os.rename(tmp, final)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def link_files(src: Path, dst: Path, entries: Iterable[FileEntry]) -> list[FileEntry]:
    """Hard-link (or copy where links are unsupported) already-verified files into ``dst``. Files are immutable
    once committed, so sharing inodes between e.g. ``checkpoint-epoch-3`` and ``best_model`` is safe."""
    out = []
    for e in entries:
        s, d = src / e.path, dst / e.path
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(s, d)
        except OSError:
            shutil.copyfile(s, d)
        out.append(e)
    return out


def manifest_for_folder(
    path: Path,
    *,
    kind: str | None = None,
    global_step: int | None = None,
    epoch: int = 0,
    batch_idx: int = -1,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Manifest:
    """Hash an existing, complete checkpoint folder written by another tool (a transformers ``checkpoint-N``,
    a folder to ``syncckpt push``) and write its ``manifest.json`` last, so it can be mirrored and verified like
    our own. Kind and step default to what the folder name says."""
    path = Path(path)
    parsed = parse_checkpoint_name(path.name)
    if parsed is None:
        raise ValueError(
            f"{path}: folder name is not checkpoint-step-N, checkpoint-epoch-N, checkpoint-N or best_model"
        )
    kind = kind or parsed[0]
    if global_step is None:
        global_step = parsed[1] if parsed[0] == "step" else 0
    entries = [
        hash_file(path, f.relative_to(path).as_posix())
        for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    ]
    manifest = Manifest(
        name=path.name,
        kind=kind,
        global_step=global_step,
        epoch=epoch,
        batch_idx=batch_idx,
        files=entries,
        metrics=dict(metrics or {}),
        extra=dict(extra or {}),
    )
    write_file(path, MANIFEST_NAME, [manifest.to_bytes()])
    fsync_dir(path)
    return manifest


def read_manifest(path: Path) -> tuple[Manifest, str]:
    """Parse ``path/manifest.json``; returns the manifest and the SHA-256 of its bytes."""
    mpath = Path(path) / MANIFEST_NAME
    try:
        size = mpath.stat().st_size
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{mpath}: missing; {path} is not a complete checkpoint") from None
    if size > 4 * 1024 * 1024:
        raise UnsafeCheckpoint(f"{mpath}: {size} bytes is far too large for a manifest")
    data = mpath.read_bytes()
    manifest = Manifest.from_bytes(data, where=str(mpath))
    if manifest.name != Path(path).name:
        raise CheckpointCorrupt(f"{mpath}: describes {manifest.name!r}, but lives in {Path(path).name!r}")
    return manifest, sha256_hex(data)


def list_checkpoints(directory: Path) -> list[LocalCheckpoint]:
    """Committed checkpoints in ``directory``; folders with a missing or unreadable manifest are skipped with
    a warning (they never count as checkpoints)."""
    return scan(directory)[0]


def scan(directory: Path) -> tuple[list[LocalCheckpoint], dict[str, str]]:
    """:func:`list_checkpoints`, plus the folders whose manifest is present but does not parse (name -> reason).

    A folder without a manifest is not counted as damaged: another writer (the transformers Trainer) may still be
    filling it. Quarantined folders (``.quarantine-*``) and hidden leftovers are not checkpoint names."""
    directory = Path(directory)
    if not directory.is_dir():
        return [], {}
    out, bad = [], {}
    for p in sorted(directory.iterdir()):
        if not p.is_dir() or parse_checkpoint_name(p.name) is None:
            continue
        try:
            m, digest = read_manifest(p)
        except CheckpointCorrupt as e:
            _warn_once(f"Ignoring {p}: {e}")
            if (p / MANIFEST_NAME).exists():
                bad[p.name] = str(e)
            continue
        out.append(LocalCheckpoint(p.name, p, m, digest))
    return out, bad


_WARNED: set[str] = set()  # what scan() warned about in this process: every save scans, one line is enough


def _warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time, at debug level after that."""
    if message in _WARNED:
        log.debug("%s", message)
        return
    _WARNED.add(message)
    log.warning("%s", message)


#: Tensor files at least this big are mapped instead of read (:func:`read_file`).
MAP_AT_BYTES = 1 << 20


def loads_as_views(path: str, size: int) -> bool:
    """Whether a checkpoint file is handed to the loader as a mapping whose tensors are views (a tensor file of
    ``MAP_AT_BYTES`` or more) rather than as a ``bytearray`` (anything else; JSON is parsed from it)."""
    return size >= MAP_AT_BYTES and path.endswith(".safetensors")


def read_file(path: Path) -> bytearray | mmap.mmap:
    """A file's bytes in a writable buffer, so that tensors loaded from it are views of it, not copies
    (:func:`syncckpt.format.load_safetensors_bytes`).

    A tensor file of ``MAP_AT_BYTES`` or more is a private, copy-on-write mapping of the file: its pages are the
    page cache's (a fresh buffer's page faults were most of a resume's time), and writes to it (an optimizer
    updating state loaded as views) go to private pages, never to the file. Anything else is read into a
    ``bytearray``. Committed files are never rewritten in place (new files are renamed in, old ones unlinked),
    so a mapping sees the bytes that were verified.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if loads_as_views(str(path), size):
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        buf = bytearray(size)
        n = f.readinto(buf)
    del buf[n:]  # the file shrank since fstat: the caller's size or digest check fails on what was read
    return buf


def read_verified(path: Path, manifest: Manifest) -> dict[str, bytearray | mmap.mmap]:
    """Read every file of a checkpoint once, checking size and digest; returns the bytes by relative path."""
    path = Path(path)
    root = path.resolve()
    out = {}
    for e in manifest.files:
        f = (path / e.path).resolve()
        if not f.is_relative_to(root):
            raise UnsafeCheckpoint(f"{path / e.path}: resolves outside the checkpoint folder {path}")
        try:
            size = f.stat().st_size
            if size != e.size:
                raise CheckpointCorrupt(
                    f"{path / e.path}: size {size} bytes, manifest says {e.size} (truncated or altered)"
                )
            data = read_file(f)
        except FileNotFoundError:
            raise CheckpointCorrupt(f"{path / e.path}: missing (listed in the manifest)") from None
        except OSError as err:
            raise CheckpointCorrupt(f"{path / e.path}: cannot be read ({err.strerror or err})") from None
        try:
            verify_digest(e, len(data), hashlib.sha256(data).hexdigest())
        except CheckpointCorrupt as err:
            raise CheckpointCorrupt(f"{path}/{err}") from None
        out[e.path] = data
    return out


def verify(path: Path) -> tuple[Manifest, dict[str, bytearray | mmap.mmap]]:
    """Read and fully verify a checkpoint folder; raise CheckpointCorrupt naming the first bad file."""
    manifest, _ = read_manifest(path)
    return manifest, read_verified(path, manifest)


def delete(directory: Path, name: str) -> None:
    """Remove a checkpoint: first rename it out of view (atomic), then delete the files."""
    if parse_checkpoint_name(name) is None:
        raise UnsafeCheckpoint(f"refusing to delete {name!r}: not a checkpoint folder name")
    src = Path(directory) / name
    if not src.exists():
        return
    trash = Path(directory) / f".del-{name}-{uuid.uuid4().hex[:8]}"
    os.rename(src, trash)
    shutil.rmtree(trash, ignore_errors=True)


def cleanup_leftovers(directory: Path) -> list[str]:
    """Repair what an interrupted save, replace or delete left behind; returns what was done (for logs)."""
    directory = Path(directory)
    done: list[str] = []
    if not directory.is_dir():
        return done
    for p in sorted(directory.iterdir()):
        if not p.is_dir() or not p.name.startswith(_HIDDEN_PREFIXES):
            continue
        if p.name.startswith(".old-"):
            name = p.name[len(".old-") :].rsplit("-", 1)[0]
            final = directory / name
            if not final.exists() and parse_checkpoint_name(name) is not None:
                try:
                    ok = Manifest.from_bytes((p / MANIFEST_NAME).read_bytes(), where=str(p)).name == name
                except (OSError, CheckpointCorrupt):
                    ok = False
                if ok:
                    os.rename(p, final)  # crash between the two renames of a replace: keep the old one
                    done.append(f"restored {name} from an interrupted replace")
                    continue
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed leftover {p.name}")
    return done
