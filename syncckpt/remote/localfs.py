"""A plain path (a local disk, a mounted Drive or NFS share) as a store: atomic replacement, an exclusive create
that publishes complete content, and durable copies, each fsynced before the manifest that vouches for it.

>>> import os, tempfile
>>> d = tempfile.mkdtemp()
>>> write_atomic(os.path.join(d, "LATEST"), b"a"); create_exclusive(os.path.join(d, "LATEST"), b"b")
False
>>> open(os.path.join(d, "LATEST"), "rb").read(), [n for n in os.listdir(d) if ".tmp-" in n]
(b'a', [])
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..errors import CheckpointCorrupt, RemoteError
from ..local import fsync_dir, hash_file
from ..manifest import Manifest, verify_digest
from .base import CHUNK
from .streams import Progress

__all__ = ["copy_durable", "create_exclusive", "read_back", "rmtree_quiet", "unlink_quiet", "write_atomic"]


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data`` with a rename: readers see the old bytes or the new, never a mix."""
    tmp = _write_tmp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise
    fsync_dir(Path(path).parent)


def create_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True when created. A hard link publishes the complete
    file atomically; without links (some FUSE mounts) ``O_EXCL`` is still atomic, but the content lands after."""
    tmp = _write_tmp(path, data)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    finally:
        unlink_quiet(tmp)
    fsync_dir(Path(path).parent)
    return True


def copy_durable(src: Path, dst: str, counter: Progress) -> None:
    """Copy ``src`` to ``dst`` and fsync it: durable before the manifest that vouches for it is written."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(CHUNK):
            fo.write(chunk)
            counter.relative_update(len(chunk))
        fo.flush()
        os.fsync(fo.fileno())
    fsync_dir(Path(dst).parent)


def read_back(folder: str, manifest: Manifest, where: str) -> None:
    """Read every file of ``manifest`` back from ``folder`` and check its SHA-256. A mounted Drive (or another
    FUSE or network mount) acknowledges a write before it holds the bytes; a mirror is only called mirrored once
    it holds them. The kernel's cached copy of each file is dropped first (:func:`drop_cached`), so the bytes are
    read from the mount, not from the page cache the copy just filled. Raises RemoteError naming the first file
    that differs."""
    for entry in manifest.files:
        try:
            drop_cached(os.path.join(folder, entry.path))
            seen = hash_file(Path(folder), entry.path)
            verify_digest(entry, seen.size, seen.sha256)
        except (OSError, CheckpointCorrupt) as e:
            raise RemoteError(f"{where}/{entry.path}: read back after the copy: {e}") from None


def drop_cached(path: str) -> None:
    """Ask the kernel to drop its cached pages of ``path`` (``POSIX_FADV_DONTNEED``; the copy was fsynced, so they
    are clean), so that the next read goes to the file system itself. Best effort: where the call does not exist
    or the file system ignores it, the read comes from the cache as before."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the read that follows reports it
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def unlink_quiet(path: str) -> None:
    """Delete a file; absent is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def rmtree_quiet(path: str) -> None:
    """Delete a folder and all in it; absent is fine."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def _write_tmp(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp
