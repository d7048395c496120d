"""A remote run: one session writing one run prefix, and what it keeps track of meanwhile.

It holds the lease (one writer per run), the LATEST it last wrote or read, the manifests it has seen (so
retention does not read every manifest again for every checkpoint), the quarantine index, the retention plan
and the put strategy (whole files, or content-addressed parts for incremental runs). :meth:`RemoteRun.publish`
commits one checkpoint through the remote's one commit sequence (data -> manifest -> LATEST -> deletions). It
runs on one thread: the uploader's.

>>> import pathlib, tempfile
>>> from syncckpt.manifest import FileEntry, Manifest, sha256_hex
>>> from syncckpt.remote import open_remote
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "model.safetensors").write_bytes(b"weights")
>>> m = Manifest(name="checkpoint-step-10", kind="step", global_step=10, epoch=0, batch_idx=9,
...              files=[FileEntry("model.safetensors", 7, sha256_hex(b"weights"))])
>>> _ = (folder / "manifest.json").write_bytes(m.to_bytes())
>>> run = RemoteRun(open_remote("memory://doc-run/run"))
>>> done = run.publish(folder)
>>> done.manifest.name, run.remote.read_latest().name, run.holds(m)
('checkpoint-step-10', 'checkpoint-step-10', True)
>>> run.close()
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import quarantine
from .._failpoints import failpoint
from ..errors import CheckpointCorrupt, RemoteError
from ..lease import Lease
from ..manifest import LATEST_NAME, MANIFEST_NAME, Latest, Manifest, same_content
from ..retention import Ref, next_latest
from .base import Committed, Put, Remote
from .incremental import BlobPut

log = logging.getLogger("syncckpt")

__all__ = ["Published", "RemoteRun"]

Retention = Callable[[list[Ref]], list[str]]  # the checkpoints to delete, given every one the run keeps


@dataclass(frozen=True)
class Published:
    """One checkpoint :meth:`RemoteRun.publish` committed."""

    manifest: Manifest  # as the store holds it
    sent: int  # bytes sent, the manifest included
    deleted: list[str]  # older checkpoints retention removed after it


class RemoteRun:
    """Write access to the run at ``remote``: takes its lease now (raises LeaseHeld when another session writes
    it; ``takeover`` takes a live one over). ``retention`` plans which remote checkpoints to delete after each
    commit; ``incremental`` mirrors files as content-addressed parts."""

    def __init__(
        self,
        remote: Remote,
        *,
        takeover: bool = False,
        retention: Retention | None = None,
        incremental: bool = False,
    ) -> None:
        self.remote = remote
        self.lease = Lease(remote, takeover=takeover)
        self._retention = retention
        self._put = BlobPut() if incremental else None
        self._latest: Latest | None = None
        self._manifests: dict[str, Manifest] = {}  # by name, as the store holds them
        self.lease.acquire()

    def forget_state(self) -> None:
        """Re-read LATEST before the next commit (resume may have quarantined what it named)."""
        self._latest = None

    def holds(self, manifest: Manifest) -> bool:
        """Whether the store holds ``manifest``'s checkpoint: an identical manifest, and not quarantined."""
        try:
            remote_manifest, _ = self.remote.read_manifest(manifest.name)
        except (FileNotFoundError, CheckpointCorrupt, OSError, RemoteError):
            return False
        return same_content(remote_manifest, manifest) and manifest.name not in self.quarantine_index()

    def publish(self, folder: Path, *, put: Put | None = None) -> Published:
        """Commit the checkpoint in ``folder`` (its files and manifest.json): checks the lease first, then data,
        manifest, LATEST (when it is the newest) and retention's deletions, in that order; then a quarantined copy
        it replaced is unmarked, and on incremental runs the blobs nothing refers to any more are deleted.
        ``put``: how the data travels this time (an :class:`~syncckpt.remote.early.EarlyPut` whose files went
        while they were written), instead of the run's own."""
        manifest_bytes = (folder / MANIFEST_NAME).read_bytes()
        manifest = Manifest.from_bytes(manifest_bytes)
        self.lease.check()
        index = self.quarantine_index()
        deletions = self.plan_retention(manifest, index)
        done = self.remote.commit_checkpoint(
            manifest.name,
            folder,
            manifest,
            manifest_bytes,
            lambda stored, stored_bytes: self.next_latest(stored, stored_bytes, index),
            deletions,
            put=put or self._put,
        )
        return self._published(done, index, deletions)

    def publish_assembled(self, manifest: Manifest) -> Published:
        """Commit a checkpoint whose data files are already in the store, checked there by the nodes that sent
        them (:mod:`syncckpt.nodes`): the lease first, then manifest, LATEST (when it is the newest) and
        retention's deletions, the same sequence as :meth:`publish` after the data."""
        manifest_bytes = manifest.to_bytes()
        self.lease.check()
        index = self.quarantine_index()
        deletions = self.plan_retention(manifest, index)
        latest = self.next_latest(manifest, manifest_bytes, index)
        failpoint("remote-manifest")
        self.remote.write_bytes(f"{manifest.name}/{MANIFEST_NAME}", manifest_bytes)
        if latest is not None:
            failpoint("remote-latest")
            self.remote.write_bytes(LATEST_NAME, latest.to_bytes())
        for old in deletions:
            failpoint("remote-delete")
            self.remote.delete_checkpoint(old)
        return self._published(Committed(manifest, manifest_bytes, latest, len(manifest_bytes)), index, deletions)

    def _published(self, done: Committed, index: dict[str, Any], deletions: list[str]) -> Published:
        name = done.manifest.name
        if name in index:  # a verified copy replaced the quarantined one
            quarantine.unmark_remote(self.remote, name)
            log.info("The quarantined copy of %s on %s is replaced by a verified one", name, self.remote.url)
        self._manifests[name] = done.manifest
        for d in deletions:
            self._manifests.pop(d, None)
        if done.latest is not None:
            self._latest = done.latest
        if self._put is not None:
            self._put.collect_unused(self.remote, self._manifests)
        return Published(done.manifest, done.sent, deletions)

    def next_latest(self, manifest: Manifest, manifest_bytes: bytes, index: dict[str, Any]) -> Latest | None:
        """The LATEST to write with ``manifest``, or None when the current one names a newer checkpoint. A
        quarantined checkpoint named by LATEST counts as none."""
        if self._latest is None:
            self._latest = self.remote.read_latest()
        current = None if self._latest is not None and self._latest.name in index else self._latest
        return next_latest(current, manifest, manifest_bytes)

    def quarantine_index(self) -> dict[str, Any]:
        """The run's quarantine index; empty (with a warning) when it cannot be read."""
        try:
            return quarantine.read_index(self.remote)
        except (OSError, RemoteError) as e:
            log.warning("Cannot read %s/%s (%s)", self.remote.url, quarantine.INDEX_NAME, e)
            return {}

    def candidates(self, index: dict[str, Any], besides: str = "") -> dict[str, Manifest]:
        """The run's committed checkpoints retention may weigh (but ``besides``), by name: quarantined ones take
        no slot and are never deleted by it, and a damaged one is left for a human, never guessed about."""
        out = {}
        for name in set(self.remote.list_checkpoints(besides=[besides])) - set(index):
            m = self._manifests.get(name)
            if m is None:
                try:
                    m, _ = self.remote.read_manifest(name)
                except (CheckpointCorrupt, FileNotFoundError):
                    continue
                self._manifests[name] = m
            out[name] = m
        return out

    def plan_retention(self, new: Manifest, index: dict[str, Any]) -> list[str]:
        """The remote checkpoints to delete once ``new`` is committed."""
        if self._retention is None:
            return []
        refs = [Ref(new.name, new.kind, new.global_step, new.epoch, new.healthy)]
        for name, m in self.candidates(index, besides=new.name).items():
            refs.append(Ref(name, m.kind, m.global_step, m.epoch, m.healthy))
        return [n for n in self._retention(refs) if n != new.name]

    def close(self, timeout: float | None = None) -> None:
        """Release the lease (within ``timeout``, see :meth:`Lease.release`) and the store's clients; the clients
        stay open while a release that ran out of time may still be using them (the process is exiting)."""
        if self.lease.release(timeout):
            self.remote.close()
