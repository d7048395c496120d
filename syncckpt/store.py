"""A checkpoint store as the ``syncckpt`` command sees it: a local folder or a remote run, behind one interface.

The commands (ls, verify, prune, rm, pull, push) never ask "is this a path or a URL?": they list a :class:`Store`,
verify, quarantine and delete through it, so each has one code path. Two adapters implement it:

- :class:`LocalStore`: a folder of checkpoints, over :mod:`syncckpt.local` and :mod:`syncckpt.quarantine` (a
  quarantined checkpoint is a renamed ``.quarantine-*`` folder). Writes need no lease: the folder belongs to
  whoever runs the command.
- :class:`RemoteStore`: a remote run, over :func:`syncckpt.pull.remote_listing` (quarantined checkpoints already
  left out), :meth:`Remote.download_checkpoint <syncckpt.remote.Remote.download_checkpoint>` into a temporary
  folder to verify, and the run's quarantine index. Writes happen inside :meth:`Store.writing`, which holds the
  run's :class:`~syncckpt.lease.Lease` and checks it before each write, so two writers never interleave.

A URL with ``://`` is a remote run (``file://`` included: that folder is treated as a mirror); anything else is a
local path. Where one checkpoint is meant, the URL may end in its name: see :func:`split_url`.

>>> import tempfile, pathlib
>>> from syncckpt import local
>>> from syncckpt.manifest import Manifest
>>> from syncckpt.remote import open_remote
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> for step in (1, 2):
...     _ = local.commit(d, Manifest(f"checkpoint-step-{step}", "step", step, 0, step - 1, files=[]),
...                      lambda tmp: [local.write_file(tmp, "a.json", [b"{}"])])
>>> with open_store(str(d), open_remote) as store:
...     sorted(store.listing().checkpoints), store.verify("checkpoint-step-2").error
(['checkpoint-step-1', 'checkpoint-step-2'], None)
"""

from __future__ import annotations

import abc
import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from tqdm import tqdm

from . import _bars, local
from .errors import CheckpointCorrupt, CheckpointNotFound, SyncCkptError
from .lease import Lease
from .manifest import MANIFEST_NAME, Latest, Manifest, parse_checkpoint_name, same_content
from .pull import remote_listing, split_checkpoint_url
from .quarantine import Quarantined, delete_local, list_local, quarantine_local, quarantine_remote, unmark_remote
from .remote import Remote
from .resume import repoint_latest
from .select import Candidate

OpenRemote = Callable[[str], Remote]
LocalNaming = Literal["name", "name-or-manifest", "no"]
_S = TypeVar("_S", bound="Store")


@dataclass
class Listing:
    """What a store holds, as every command sees it.

    ``checkpoints``: name -> manifest, for each checkpoint whose manifest parses and that is not quarantined;
    ``candidates`` describe the same ones (kind, step, manifest digest, health) for ordering and retention.
    ``damaged``: name -> why, for checkpoints that are there but whose manifest is missing or does not parse.
    ``quarantined``: checkpoints kept aside after failing verification (see :mod:`syncckpt.quarantine`).
    """

    checkpoints: dict[str, Manifest] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    damaged: dict[str, str] = field(default_factory=dict)
    quarantined: list[Quarantined] = field(default_factory=list)


@dataclass
class Checked:
    """The verdict on one checkpoint: ``error`` is None when every file matched its SHA-256."""

    name: str
    error: str | None
    files: int = 0
    size: int = 0


class Store(abc.ABC):
    """The operations every command needs from the place its checkpoints live; a context manager that closes it.

    >>> from syncckpt.remote import open_remote
    >>> with open_store("memory://doc-store/run", open_remote) as store:
    ...     store.url, store.where("checkpoint-step-5"), store.listing().checkpoints
    ('memory://doc-store/run', 'memory://doc-store/run/checkpoint-step-5', {})
    """

    url: str
    is_remote: bool  # a remote run mirrors itself: ls shows each of its checkpoints as mirrored

    def exists(self) -> bool:
        """Whether there is anything to list: a local folder must exist; a remote run always does (maybe empty)."""
        return True

    def where(self, name: str) -> str:
        """How messages name checkpoint ``name`` of this store."""
        return f"{self.url}/{name}"

    @abc.abstractmethod
    def listing(self) -> Listing:
        """Everything the store holds; a store that cannot be listed raises (never reads as empty)."""

    @abc.abstractmethod
    def verify(self, name: str, *, explicit: bool = False) -> Checked:
        """Check every file of ``name`` against its manifest. ``explicit``: the user named it, so a checkpoint
        that is not there at all raises CheckpointNotFound instead of reading as invalid."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """Delete one checkpoint (manifest first, so it stops counting at once); its quarantined copies stay."""

    @abc.abstractmethod
    def quarantine(self, name: str, manifest_sha256: str, reason: str) -> None:
        """Keep ``name`` (with the manifest of this digest) aside: out of every listing, never deleted by prune."""

    @abc.abstractmethod
    def forget_quarantined(self, name: str) -> None:
        """Delete the quarantined copies of ``name`` (``syncckpt rm``)."""

    def after_removal(self, removed: set[str], listing: Listing) -> None:  # noqa: B027 - nothing to do locally
        """Tidy up after checkpoints left the store (``listing``: what it held before)."""

    def missing(self, name: str) -> CheckpointNotFound:
        """The error for a checkpoint that is neither there nor quarantined."""
        return CheckpointNotFound(f"{self.where(name)}: no such checkpoint")

    @contextlib.contextmanager
    def writing(self, takeover: bool = False) -> Iterator[None]:
        """Around a batch of writes (delete, quarantine, forget_quarantined, after_removal)."""
        yield

    def close(self) -> None:  # noqa: B027 - a local folder holds nothing open
        """Release what the store holds open. Safe to call twice."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalStore(Store):
    """A local folder of checkpoints, or (``single``) one checkpoint folder listed as itself.

    ``open_remote`` opens a folder as a mirror: a checkpoint copied from an incrementally mirrored run keeps its
    blob layout in the manifest, so only the remote code can verify it.
    """

    is_remote = False

    def __init__(self, path: str | Path, open_remote: OpenRemote, *, single: bool = False) -> None:
        self.path = Path(path)
        self.url = str(self.path)
        self._open_remote = open_remote
        self._single = single

    def exists(self) -> bool:
        return self.path.is_dir()

    def where(self, name: str) -> str:
        return str(self.path / name)

    def listing(self) -> Listing:
        if self._single:  # a manifest that does not parse is an error here: the user named this checkpoint
            manifest, digest = local.read_manifest(self.path)
            found = [local.LocalCheckpoint(self.path.name, self.path, manifest, digest)]
            return _local_listing(found, {}, list_local(self.path))
        found, unreadable = local.scan(self.path)  # warns about each folder it skips
        damaged = {}
        if self.path.is_dir():
            listed = {c.name for c in found}
            for p in sorted(self.path.iterdir()):
                if p.is_dir() and parse_checkpoint_name(p.name) is not None and p.name not in listed:
                    damaged[p.name] = unreadable.get(p.name, f"{p / MANIFEST_NAME}: missing")
        return _local_listing(found, damaged, list_local(self.path))

    def verify(self, name: str, *, explicit: bool = False) -> Checked:
        folder = self.path / name
        if explicit and not folder.is_dir():
            raise folder_error(folder)
        try:
            manifest, _ = local.read_manifest(folder)
            if any(f.parts for f in manifest.files):  # a copy of an incrementally mirrored run: blob layout
                with RemoteStore(self._open_remote(str(self.path))) as mirror:
                    return mirror.verify(name, explicit=True)
            local.verify(folder)
        except CheckpointCorrupt as e:
            return Checked(name, str(e))
        return Checked(name, None, len(manifest.files), manifest.total_size)

    def delete(self, name: str) -> None:
        local.delete(self.path, name)

    def quarantine(self, name: str, manifest_sha256: str, reason: str) -> None:
        quarantine_local(self.path, name, reason)

    def forget_quarantined(self, name: str) -> None:
        delete_local(self.path, name)

    def missing(self, name: str) -> CheckpointNotFound:
        return CheckpointNotFound(f"{self.where(name)}: no such checkpoint (nor a quarantined copy of it)")


class RemoteStore(Store):
    """A remote run. Writes (delete, quarantine, commit) only inside :meth:`writing`, which holds the lease."""

    is_remote = True

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self.url = remote.url
        self._lease: Lease | None = None

    def listing(self) -> Listing:
        got = remote_listing(self.remote, strict=True)
        damaged = {name: reason for name, (_, reason) in got.unreadable.items()}
        return Listing(dict(got.manifests), list(got.candidates), damaged, list(got.quarantined))

    def read_manifest(self, name: str) -> Manifest:
        """The manifest of ``name``; CheckpointNotFound when there is none, CheckpointCorrupt when it is bad."""
        try:
            return self.remote.read_manifest(name)[0]
        except FileNotFoundError:
            raise CheckpointNotFound(f"{self.where(name)}: no such checkpoint (no {MANIFEST_NAME})") from None

    def verify(self, name: str, *, explicit: bool = False) -> Checked:
        # Downloading is the only way to hash the bytes; the copy lives in $TMPDIR only while it is checked.
        where = self.where(name)
        try:
            manifest = self.read_manifest(name)
        except CheckpointNotFound:
            if explicit:
                raise
            return Checked(name, f"{where}/{MANIFEST_NAME}: missing")
        except CheckpointCorrupt as e:
            return Checked(name, str(e))
        with (
            tempfile.TemporaryDirectory(prefix="syncckpt-verify-") as tmp,
            progress_bar(manifest.total_size, name) as bar,
        ):
            try:
                self.remote.download_checkpoint(name, manifest, Path(tmp), progress=bar.update)
            except (CheckpointCorrupt, FileNotFoundError) as e:
                msg = str(e)
                return Checked(name, msg if msg.startswith(self.url) else f"{where}/{msg}")
        return Checked(name, None, len(manifest.files), manifest.total_size)

    def holds(self, manifest: Manifest) -> bool:
        """Whether the run has this checkpoint with the same bytes (stored as plain files or as blobs)."""
        try:
            return same_content(self.remote.read_manifest(manifest.name)[0], manifest)
        except (FileNotFoundError, CheckpointCorrupt):
            return False

    @contextlib.contextmanager
    def writing(self, takeover: bool = False) -> Iterator[None]:
        lease = Lease(self.remote, takeover=takeover)
        lease.acquire()
        self._lease = lease
        try:
            yield
        finally:
            self._lease = None
            lease.release()

    def _checked_lease(self) -> None:
        # Read LEASE before every write: a session that took the run over since must stop this one at once.
        if self._lease is None:
            raise RuntimeError(f"writing to {self.url} outside RemoteStore.writing(): the lease is not held")
        self._lease.check()

    def commit(self, folder: Path, manifest: Manifest, manifest_bytes: bytes, latest: Latest | None) -> None:
        """Upload one checkpoint folder: data files, then its manifest, then ``latest`` (None: LATEST stays)."""
        self._checked_lease()
        with progress_bar(manifest.total_size, f"push {manifest.name}") as bar:
            self.remote.commit_checkpoint(manifest.name, folder, manifest, manifest_bytes, latest, progress=bar.update)

    def delete(self, name: str) -> None:
        self._checked_lease()
        self.remote.delete_checkpoint(name)

    def quarantine(self, name: str, manifest_sha256: str, reason: str) -> None:
        self._checked_lease()
        quarantine_remote(self.remote, name, manifest_sha256, reason)

    def forget_quarantined(self, name: str) -> None:
        self._checked_lease()
        unmark_remote(self.remote, name)

    def after_removal(self, removed: set[str], listing: Listing) -> None:
        """LATEST moves off the removed checkpoints; blobs no remaining manifest references are deleted."""
        self._checked_lease()
        repoint_latest(self.remote, removed, listing.candidates)
        self.remote.collect_unused_blobs()

    def close(self) -> None:
        self.remote.close()


# ---- opening a store from a command-line URL ----------------------------------------------------------------------
def is_remote_url(url: str) -> bool:
    """Whether ``url`` names a remote run (``file://`` included) rather than a local path.

    >>> is_remote_url("s3://b/run"), is_remote_url("file:///mnt/run"), is_remote_url("checkpoints/")
    (True, True, False)
    """
    return "://" in url


def split_url(url: str, local_naming: LocalNaming = "name") -> tuple[str, str | None]:
    """(store URL, checkpoint name or None). A remote URL may end in a checkpoint name; a local path does when
    its last part is one (``local_naming="name"``), also when it holds a manifest.json
    (``"name-or-manifest"``: verify judges a renamed copy too), or never (``"no"``: ls lists a checkpoint
    folder as itself, see :func:`open_store`).

    >>> split_url("s3://b/run/checkpoint-step-5")
    ('s3://b/run', 'checkpoint-step-5')
    >>> split_url("checkpoints/best_model"), split_url("checkpoints/best_model", "no")
    (('checkpoints', 'best_model'), ('checkpoints/best_model', None))
    """
    if is_remote_url(url):
        return split_checkpoint_url(url)
    p = Path(url)
    named = local_naming != "no" and parse_checkpoint_name(p.name) is not None
    if named or (local_naming == "name-or-manifest" and (p / MANIFEST_NAME).exists()):
        return str(p.parent), p.name
    return url, None


def open_store(url: str, open_remote: OpenRemote, *, itself: bool = False) -> Store:
    """The store at ``url``: a remote run, or a local folder of checkpoints. ``itself``: a local folder holding a
    manifest.json is listed as that one checkpoint (ls)."""
    if is_remote_url(url):
        return RemoteStore(open_remote(url))
    path = Path(url)
    return LocalStore(path, open_remote, single=itself and (path / MANIFEST_NAME).exists())


def open_mirror(url: str, open_remote: OpenRemote) -> RemoteStore:
    """The run at ``url``, a plain path included (a mirror on a mounted drive): the source of pull, the target of
    push, where the remote layout (blobs, LATEST, the quarantine index) is what matters."""
    return RemoteStore(open_remote(url))


def folder_error(path: Path) -> SyncCkptError | OSError:
    """Why ``path`` is not a folder to verify: it is missing, or it is a file."""
    if not path.exists():
        return CheckpointNotFound(f"{path}: no such file or folder")
    return NotADirectoryError(f"{path}: not a folder; pass a checkpoint folder or a folder of checkpoints")


def progress_bar(total: int, desc: str) -> contextlib.AbstractContextManager[tqdm]:
    """A byte progress bar on stderr, shown only when stderr is a terminal (log lines print above it)."""
    return _bars.progress(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, disable=None, leave=False)


def _local_listing(found: list[local.LocalCheckpoint], damaged: dict[str, str], held: list[Quarantined]) -> Listing:
    candidates = [
        Candidate(
            c.name,
            c.manifest.kind,
            c.manifest.global_step,
            c.manifest.epoch,
            "local",
            c.manifest_sha256,
            c.manifest.healthy,
        )
        for c in found
    ]
    return Listing({c.name: c.manifest for c in found}, candidates, damaged, held)
