"""Sending a checkpoint's data files while its local write is still going: a put strategy whose bytes leave before
the local commit.

The writer hands each file to an :class:`EarlyPut` as soon as it is written and fsynced; it is hard-linked into
the upload's staging folder (so the local rename, retention and ``best_model`` replacement never pull it away)
and a pool sends it to ``NAME/PATH`` while the writer goes on with the next file, the manifest and the rename.
The commit itself does not change: objects under ``NAME/`` are no checkpoint until ``NAME/manifest.json``
exists, and that, then LATEST, are written by the remote's one commit sequence
(:meth:`~syncckpt.remote.base.Remote.commit_checkpoint`) with this object as its ``put``: after the local commit
(the uploader gets the job only then), and after every file of the manifest is in the store and checked there
(:meth:`~syncckpt.remote.base.Remote.check_uploaded`), exactly as for :func:`~syncckpt.remote.base.put_whole_files`.
A file that did not go early, failed, or went with other bytes than the manifest lists is sent again then.

Before the first byte goes, the store is asked whether ``NAME`` is there already. A committed checkpoint of that
name (``best_model``, a step saved again after a resume) is never touched before the local commit: that save
goes the usual way (delete, then send). Otherwise what an earlier, killed attempt left under ``NAME/`` is
removed first, as put_whole_files does. So a crash at any instant leaves, in the store, the previous checkpoints
as they were plus at most manifest-less objects under the new name, which no reader lists and the next save of
that name clears.

>>> import pathlib, tempfile
>>> from syncckpt.local import write_file
>>> from syncckpt.manifest import Latest, Manifest
>>> from syncckpt.remote import open_remote
>>> work = pathlib.Path(tempfile.mkdtemp())
>>> (work / "tmp").mkdir(); (work / "staging").mkdir()
>>> r = open_remote("memory://doc-early/run")
>>> put = EarlyPut(r, "checkpoint-step-1", work / "staging")
>>> entry = write_file(work / "tmp", "model.safetensors", [b"weights"])
>>> put.send(work / "tmp", entry)  # goes now; not a checkpoint in the store yet
>>> put.wait(), r.list_checkpoints()
(True, [])
>>> m = Manifest(name="checkpoint-step-1", kind="step", global_step=1, epoch=0, batch_idx=0, files=[entry])
>>> done = r.commit_checkpoint(m.name, work / "staging", m, m.to_bytes(), Latest(m.name, 1, ""), put=put)
>>> put.close(); r.list_checkpoints(), put.early_bytes
(['checkpoint-step-1'], 7)
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

from .._failpoints import failpoint
from ..local import link_files
from ..manifest import FileEntry, Manifest
from .base import ProgressFn, Remote, put_whole_files, send_files

log = logging.getLogger("syncckpt")

__all__ = ["EarlyPut", "supports_early"]


def supports_early(remote: Remote) -> bool:
    """Whether ``remote`` commits file by file through the base sequence (not the Hub's one atomic commit)."""
    return type(remote).commit_checkpoint is Remote.commit_checkpoint and type(remote)._upload is not Remote._upload


class EarlyPut:
    """The data of checkpoint ``name``, sent to ``remote`` file by file as the writer produces it.

    ``staging``: an empty folder of the upload's own (``.upload-NAME-*``) that becomes the job's staging copy.
    ``before``: called once before any byte is sent (the uploader passes its lease check). Use it as the ``put`` of
    exactly one commit of ``name``, then :meth:`close`; :meth:`abandon` when no commit follows.
    """

    def __init__(self, remote: Remote, name: str, staging: Path, *, before: Callable[[], None] | None = None):
        self.remote, self.name, self.staging = remote, name, Path(staging)
        self.early_bytes = 0  # bytes the commit found in the store already, sent before it
        self._lock = threading.Lock()
        self._closed = False
        self._sent: dict[str, tuple[FileEntry, Future[None]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=remote.max_workers, thread_name_prefix="syncckpt-early")
        self._before = before
        self._ready = self._pool.submit(self._prepare, before)  # first in the queue: every send waits on it

    def _prepare(self, before: Callable[[], None] | None) -> bool:
        """True when files may go now; False when a committed checkpoint of that name is in the store."""
        if before is not None:
            before()
        if self.remote.clear_uncommitted(self.name):  # leftovers of a killed attempt are gone, no stray object stays
            return True
        log.debug("%s/%s is committed already: its new data waits for the local commit", self.remote.url, self.name)
        return False

    def send(self, folder: Path, entry: FileEntry) -> None:
        """Send ``folder/entry.path`` (written and fsynced, described by ``entry``) from now on, in the
        background. Never raises for the store: a failure only means the commit sends that file itself."""
        with self._lock:
            if self._closed or entry.path in self._sent:
                return
            try:
                link_files(Path(folder), self.staging, [entry])
                self._sent[entry.path] = (entry, self._pool.submit(self._send_one, entry))
            except (OSError, RuntimeError) as e:  # no link (disk full), no new thread (exiting): the commit sends
                log.debug("%s/%s not sent early: %s", self.name, entry.path, e)
                self._closed = True

    def _send_one(self, entry: FileEntry) -> None:
        if not self._ready.result():
            raise FileExistsError(f"{self.name} is committed in the store already")
        self.remote._upload(self.staging / entry.path, f"{self.name}/{entry.path}", entry.size)
        failpoint("remote-early-data")

    def wait(self) -> bool:
        """Wait until everything handed over so far is sent (or failed); True when all of it is in the store."""
        with self._lock:
            futures = [self._ready, *(f for _, f in self._sent.values())]
        wait_futures(futures)
        return all(not f.cancelled() and f.exception() is None for f in futures) and self._ready.result() is True

    def __call__(
        self, remote: Remote, name: str, local_dir: Path, manifest: Manifest, progress: ProgressFn | None
    ) -> tuple[Manifest, int]:
        """The put: wait for the early sends, send what did not go (or went with other bytes), remove objects
        the manifest does not list, then check every file in the store."""
        if remote is not self.remote or name != self.name:
            raise ValueError(f"this put carries {self.name} to {self.remote.url}, not {name} to {remote.url}")
        with self._lock:
            self._closed = True  # the manifest is final: nothing more is handed over
        self.wait()
        if self._ready.exception() is not None or self._ready.result() is not True:
            return put_whole_files(remote, name, local_dir, manifest, progress)
        wanted = {e.path: e for e in manifest.files}
        early = {}
        for path, (entry, fut) in self._sent.items():
            error = "cancelled" if fut.cancelled() else fut.exception()
            if error is not None:
                log.info("%s/%s/%s did not go early (%s); sending it now", remote.url, name, path, error)
            want = wanted.get(path)
            if want is None:
                remote.delete(f"{name}/{path}")
            elif error is None and (entry.size, entry.sha256) == (want.size, want.sha256):
                early[path] = want
        send_files(remote, name, local_dir, [e for e in manifest.files if e.path not in early], progress)
        remote.check_uploaded(name, manifest)
        self.early_bytes = sum(e.size for e in early.values())
        if progress is not None and self.early_bytes:
            progress(self.early_bytes)
        return manifest, manifest.total_size

    def close(self) -> None:
        """Stop taking files and wait for the sends in flight (after the commit, or when it failed)."""
        with self._lock:
            self._closed = True
        for _, fut in self._sent.values():
            fut.cancel()
        self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """No commit follows (the local write failed, the upload was dropped as superseded): stop, remove ``NAME/``
        from the store (best effort: it is invisible there anyway) and the staging folder."""
        self.close()
        ready = not self._ready.cancelled() and self._ready.exception() is None and self._ready.result() is True
        if ready:
            # NAME held no committed checkpoint when this put began, and only this put's commit could make one while
            # the run is this session's (the lease, checked again first: a session that took the run over may have
            # committed NAME since). The whole folder goes, so a folder store (a mounted Drive) keeps no empty NAME/.
            try:
                if self._before is not None:
                    self._before()
                self.remote.delete_checkpoint(self.name)
            except Exception as e:  # noqa: BLE001 - a leftover without a manifest harms no reader
                log.debug("Did not remove %s/%s: %s", self.remote.url, self.name, e)
        shutil.rmtree(self.staging, ignore_errors=True)
