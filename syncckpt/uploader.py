"""Background mirroring of committed checkpoints to a remote, so the training loop never waits on the network.

One daemon thread owns all remote writes (no event loop is assumed, so it works the same in a notebook cell, a
script and a DataLoader-forking job). Its queue coalesces: a step checkpoint still waiting when a newer one
arrives is skipped; epoch and best checkpoints are never skipped. Each job uploads from a hard-linked staging
copy (``.upload-NAME-*``), so local retention and ``best_model`` replacement never pull files from under it.

Transient failures are retried by the backend (with backoff and jitter); a job that still fails is kept and
retried with growing pauses, so mirroring resumes by itself after an outage. What the uploader does *not*
guarantee: a checkpoint committed locally right before the machine vanishes is only remote once ``wait()`` or
``close()`` returned True.

>>> import tempfile, torch
>>> from syncckpt import CheckpointManager
>>> remote = "memory://doc-uploader/run"
>>> with CheckpointManager(tempfile.mkdtemp(), remote=remote, handle_sigterm=False) as mgr:
...     mgr.register(model=torch.nn.Linear(2, 2))
...     mgr.save(10, epoch=0, batch_idx=9)
...     mgr.wait()
...     mgr.status()["mirrored"]
True
['checkpoint-step-10']
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import local
from ._memory import release_free_memory
from ._threads import lower_priority
from .env import check_mirror_url
from .errors import ConfigError, RemoteConflict, RemoteError
from .manifest import MANIFEST_NAME, Manifest
from .nodes import NodeMirror
from .remote import open_remote
from .remote.early import EarlyPut, supports_early
from .remote.run import RemoteRun, Retention

log = logging.getLogger("syncckpt")

__all__ = ["Uploader"]


@dataclass
class _Upload:
    manifest: Manifest
    staging: Path
    early: EarlyPut | None = None  # its data went to the store while it was written (first attempt only)

    @property
    def name(self) -> str:
        return self.manifest.name


class Uploader:
    """Mirror committed checkpoints to ``url`` from a background thread. Used by CheckpointManager.

    What is committed, and in which order, is the :class:`~syncckpt.remote.run.RemoteRun`'s business (lease,
    LATEST, retention, incremental parts); this class is the queue and the thread in front of it. ``dist``: the
    job's :class:`~syncckpt.distributed.Dist`; when each node keeps its own directory, this node's part is sent
    through a :class:`~syncckpt.nodes.NodeMirror` (uploads are then never skipped as superseded: every node must
    send the same saves).
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        on_error: str = "warn",
        takeover: bool = False,
        retention: Retention | None = None,
        remote_options: dict[str, Any] | None = None,
        max_pause: float = 60.0,
        incremental: bool = False,
        background_nice: int = 0,
        on_mirrored: Callable[[Manifest, list[str]], None] | None = None,
        dist: Any = None,
    ) -> None:
        check_mirror_url(url)
        self.storage_options = storage_options
        self.remote = open_remote(url, storage_options, **(remote_options or {}))
        local_path = self.remote.url.removeprefix("file://")
        if local_path != self.remote.url or "://" not in local_path:  # say where a local-folder mirror really is
            log.info("Mirroring to the local folder %s", os.path.abspath(local_path))
        self.url = self.remote.url
        self.on_error = on_error
        self._max_pause = max_pause
        self._cond = threading.Condition()
        self._queue: list[_Upload] = []
        self._inflight: _Upload | None = None
        self._mirrored: list[str] = []  # this session's uploads, in order (history)
        self._on_remote: list[str] = []  # of those, the ones retention has not deleted since
        self._skipped: list[str] = []
        self._failures = 0
        self._last_error: str | None = None
        self._raise: BaseException | None = None
        self._closing = False
        self._stopped: str | None = None  # why mirroring stopped for good (another session took the run over)
        self._early: dict[str, EarlyPut] = {}  # checkpoints being written whose data already goes (begin_early)
        self.incremental = incremental
        self.bytes_uploaded = 0
        # Node-local jobs (syncckpt.nodes): each node sends its own part; only rank 0 holds the lease and commits.
        node_local = dist is not None and dist.node_local
        if node_local and incremental:
            raise ConfigError("incremental mirroring is not supported when each node keeps its own directory")
        self._part = NodeMirror(self.remote, dist.node, dist.nodes) if node_local else None  # checks the store
        self._remote_run: RemoteRun | None = None
        if not node_local or dist.is_main:
            self._remote_run = RemoteRun(self.remote, takeover=takeover, retention=retention, incremental=incremental)
        if self._part is not None:
            self._part.run = self._remote_run
        self.lease = self._remote_run.lease if self._remote_run is not None else None
        self._nice = background_nice
        self._on_mirrored = on_mirrored  # (manifest, what this session mirrored that is still there)
        self._thread = threading.Thread(target=self._run, name="syncckpt-uploader", daemon=True)
        self._thread.start()

    # ---- called from the writer / training thread -------------------------------------------------------------
    def begin_early(self, directory: Path, name: str) -> EarlyPut | None:
        """Called by the writer before it writes checkpoint ``name``: an :class:`~syncckpt.remote.early.EarlyPut`
        to hand each written file to, so its data goes while the rest is written, or None for the usual way (the
        mirror is busy, node parts, incremental, a store that commits all at once). Only when nothing is queued or
        in flight: no other upload (of that name or any) runs beside it. :meth:`submit` of the same name (after
        the local commit) makes it the job's put; :meth:`abandon_early` drops it when the local commit fails."""
        if self._part is not None or self.incremental or not supports_early(self.remote):
            return None
        with self._cond:
            stale = self._early.pop(name, None)
        if stale is not None:  # removed from the store before the new put's first byte goes to the same paths
            stale.abandon()
        with self._cond:
            if self._stopped or self._closing or self._queue or self._inflight is not None:
                return None
            staging = Path(directory) / f".upload-{name}-{uuid.uuid4().hex[:8]}"
            try:
                staging.mkdir()
                put = self._early[name] = EarlyPut(self.remote, name, staging, before=self.lease.check)
            except (OSError, RuntimeError) as e:  # a full disk, an exiting interpreter: the usual way, later
                log.debug("%s: no early upload (%s)", name, e)
                shutil.rmtree(staging, ignore_errors=True)
                return None
        return put

    def abandon_early(self, name: str) -> None:
        """The local commit of ``name`` failed: no upload follows its early data."""
        with self._cond:
            put = self._early.pop(name, None)
        if put is not None:
            put.abandon()

    def submit(self, directory: Path, manifest: Manifest) -> None:
        """Queue a committed local checkpoint for mirroring (hard-links its files into a staging folder first,
        or into the one :meth:`begin_early` made, beside the files already linked there)."""
        with self._cond:
            early = self._early.pop(manifest.name, None)
        if self._stopped:
            log.warning("%s not mirrored: mirroring to %s stopped (%s)", manifest.name, self.url, self._stopped)
            if early is not None:
                early.close()
            return
        src = Path(directory) / manifest.name
        staging = early.staging if early else Path(directory) / f".upload-{manifest.name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(exist_ok=early is not None)
        try:
            files = [e for e in manifest.files if not (staging / e.path).exists()]
            local.link_files(src, staging, [*files, local.FileEntry(MANIFEST_NAME, 0, "")])
        except OSError:
            if early is not None:
                early.abandon()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        job = _Upload(manifest, staging, early)
        with self._cond:
            kept, dropped = [], []
            for q in self._queue:
                if self._part is None and _supersedes(job, q):  # node parts: every node sends every save
                    self._skipped.append(q.name)
                    log.info("Upload of %s skipped: superseded by %s", q.name, job.name)
                    dropped.append(q)
                else:
                    kept.append(q)
            self._queue = kept + [job]
            self._cond.notify_all()
        for q in dropped:
            if q.early is not None and q.name != job.name:
                q.early.abandon()  # its early objects go with it
            elif q.early is not None:
                q.early.close()  # the new job, of the same name, may be sending those objects already
            shutil.rmtree(q.staging, ignore_errors=True)

    def ensure_mirrored(self, directory: Path, manifest: Manifest) -> None:
        """After resuming from a local checkpoint the remote may not have it (the last session died before the
        upload finished): queue it unless the remote already holds an identical manifest."""
        if (self._part or self._remote_run).holds(manifest):  # type: ignore[union-attr]
            return
        log.info("Checkpoint %s is not on %s yet; mirroring it", manifest.name, self.url)
        self.submit(directory, manifest)

    def resumed(self, directory: Path, manifest: Manifest | None, source: str | None) -> None:
        """After a resume: re-read the remote's state, and mirror the local checkpoint resumed from if needed."""
        self.forget_remote_state()
        if manifest is not None and source == "local":
            self.ensure_mirrored(directory, manifest)

    def forget_remote_state(self) -> None:
        """Re-read LATEST before the next commit (resume may have quarantined what it named)."""
        if self._remote_run is not None:
            self._remote_run.forget_state()

    def wait(self, timeout: float | None = None, *, stop_on_failure: bool = False) -> bool:
        """Block until the queue is empty and nothing is in flight. False on timeout, and with
        ``stop_on_failure`` as soon as an upload fails for good (the backend's retries ran out) while waiting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            failures = self._failures
            while self._queue or self._inflight is not None:
                if self._raise is not None:
                    return True  # raise_if_failed() reports it
                if stop_on_failure and self._failures > failures:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def raise_if_failed(self) -> None:
        if self._raise is not None:
            err, self._raise = self._raise, None
            raise RemoteError(f"upload to {self.url} failed: {err}") from err

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "remote": self.url,
                "mirrored": list(self._on_remote),
                "mirrored_history": list(self._mirrored),
                "pending": [q.name for q in self._queue],
                "uploading": self._inflight.name if self._inflight else None,
                "bytes_pending": sum(j.manifest.total_size for j in [*self._queue, self._inflight] if j is not None),
                "skipped": list(self._skipped),
                "upload_failures": self._failures,
                "last_upload_error": self._last_error,
                "mirroring_stopped": self._stopped,
            }

    def close(self, timeout: float | None = None) -> None:
        """Flush (until done, ``timeout``, or an upload failing for good: a dead remote must not hang the end of
        training), then stop the thread and release the lease. What is left stays local; a later session that
        resumes from it mirrors it."""
        end = None if timeout is None else time.monotonic() + timeout
        if not self.wait(timeout, stop_on_failure=True):
            # time is up, or the store kept failing an upload past its retries: the uploads still in their retries
            # give up, and the lease's release gets one try
            self.remote.stop_retrying()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._part is not None:
            self._part.stop()
        # at the end of a grace period the thread may be in an upload's retries: it is a daemon, not waited for
        self._thread.join(timeout=5 if end is None else min(5.0, max(0.0, end - time.monotonic())))
        pending = self.status()["pending"]
        if pending:
            log.warning(
                "Closing with uploads to %s not finished: %s; they stay in the local folder and the next "
                "session that resumes from them mirrors them",
                self.url,
                pending,
            )
        with self._cond:
            early, self._early = list(self._early.values()), {}
        for put in early:
            put.abandon()
        if self._remote_run is not None:
            self._remote_run.close(None if end is None else max(0.0, end - time.monotonic()))
        else:
            self.remote.close()

    # ---- the background thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        lower_priority(self._nice)  # inherited by the transfer pools this thread starts
        pause = 1.0
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._inflight = self._queue.pop(0)
            if not job.staging.is_dir():  # its staging copy was removed (a restart's cleanup): nothing to retry
                log.warning("Upload of %s dropped: its staging copy %s is gone", job.name, job.staging)
                with self._cond:
                    self._inflight = None
                    self._cond.notify_all()
                continue
            try:
                deleted = self._upload(job)
            except RemoteConflict as e:  # another session owns the run now: stop, never interleave with it
                self._stop_mirroring(job, e)
                continue
            except Exception as e:  # noqa: BLE001 - a failed upload must never take the training loop down
                if not self._retry_later(job, e, pause):
                    return
                pause = min(pause * 2, self._max_pause)
                continue
            pause = 1.0
            with self._cond:
                self._inflight = None
                self._mirrored.append(job.name)
                gone = {job.name, *deleted}
                self._on_remote = on_remote = [*(n for n in self._on_remote if n not in gone), job.name]
                self._cond.notify_all()
            if self._on_mirrored is not None:
                self._on_mirrored(job.manifest, on_remote)

    def _retry_later(self, job: _Upload, e: Exception, pause: float) -> bool:
        """Put a failed job back at the head of the queue (unless a newer one supersedes it) and wait about
        ``pause`` seconds; False when the uploader is closing."""
        self._last_error = f"{job.name}: {e}"
        with self._cond:
            self._failures += 1
            self._inflight = None
            newer = next((q for q in self._queue if self._part is None and _supersedes(q, job)), None)
            if newer is not None:  # not retried: the newer checkpoint waiting behind it is the one worth sending
                shutil.rmtree(job.staging, ignore_errors=True)
                self._skipped.append(job.name)
            else:
                self._queue.insert(0, job)
            if self.on_error == "raise":
                self._raise = e
            self._cond.notify_all()
            if newer is not None:
                log.warning(
                    "Upload of %s to %s failed: %s; not retried: superseded by %s (training continues)",
                    job.name,
                    self.url,
                    e,
                    newer.name,
                )
            else:
                log.warning(
                    "Upload of %s to %s failed: %s; retrying in %.0fs (training continues)",
                    job.name,
                    self.url,
                    e,
                    pause,
                )
            if not self._closing:
                self._cond.wait(pause * (0.5 + random.random()))
            return not self._closing

    def _stop_mirroring(self, job: _Upload, e: RemoteConflict) -> None:
        with self._cond:
            self._stopped = str(e)
            self._last_error = f"{job.name}: {e}"
            self._failures += 1
            dropped = [job, *self._queue]
            self._queue, self._inflight = [], None
            for q in dropped:
                if q.early is not None:  # never touch the store again: another session owns the run
                    q.early.close()
                shutil.rmtree(q.staging, ignore_errors=True)
            if self.on_error == "raise":
                self._raise = e
            self._cond.notify_all()
        log.error(
            "Upload of %s to %s refused: %s. Mirroring stopped; not uploaded: %s (they stay local)",
            job.name,
            self.url,
            e,
            [q.name for q in dropped],
        )

    def _upload(self, job: _Upload) -> list[str]:
        t0 = time.monotonic()
        early, job.early = job.early, None  # a retry sends the files the usual way
        try:
            if self._part is not None:
                done = self._part.publish(job.staging)
            else:
                done = self._remote_run.publish(job.staging, put=early)  # type: ignore[union-attr]
        finally:
            if early is not None:
                early.close()
        self.bytes_uploaded += done.sent
        shutil.rmtree(job.staging, ignore_errors=True)
        release_free_memory()  # part and multipart buffers freed in the upload threads' arenas
        log.info(
            "Mirrored %s to %s (%d bytes sent for %d bytes of data, %d of them while it was written, in %.1fs)",
            done.manifest.name,
            self.url,
            done.sent,
            done.manifest.total_size,
            0 if early is None else early.early_bytes,
            time.monotonic() - t0,
        )
        for d in done.deleted:  # deleted after the new checkpoint and LATEST were written; logged after it, too
            log.info("Removed old remote checkpoint %s/%s", self.url, d)
        return done.deleted


def _supersedes(new: _Upload, old: _Upload) -> bool:
    """Whether ``new`` makes uploading ``old`` pointless: the same checkpoint again, or a newer step checkpoint
    (epoch and best checkpoints are never skipped)."""
    return new.name == old.name or (new.manifest.kind == "step" and old.manifest.kind == "step")
