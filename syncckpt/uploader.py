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

import dataclasses
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import local, quarantine
from ._failpoints import failpoint
from ._memory import ByteBudget, release_free_memory
from ._threads import lower_priority
from .blobs import blob_rel, part_ranges
from .errors import CheckpointCorrupt, RemoteConflict, RemoteError
from .lease import Lease
from .manifest import LATEST_NAME, MANIFEST_NAME, Latest, Manifest, same_content, sha256_hex
from .remote import open_remote
from .retention import Ref, next_latest

log = logging.getLogger("syncckpt")

__all__ = ["Uploader"]


# Parts are read whole and held until sent; parts go up to blobs.CHUNK_BYTES (64 MiB), so bound their bytes, not
# their number (max_workers x 64 MiB, plus the copy the client makes, was 0.5 GB over the staging buffers).
_BLOB_BYTES_IN_FLIGHT = 128 << 20


@dataclass
class _Upload:
    manifest: Manifest
    staging: Path

    @property
    def name(self) -> str:
        return self.manifest.name


class Uploader:
    """Mirror committed checkpoints to ``url`` from a background thread. Used by CheckpointManager."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        on_error: str = "warn",
        takeover: bool = False,
        retention: Callable[[list[Ref]], list[str]] | None = None,
        remote_options: dict[str, Any] | None = None,
        max_pause: float = 60.0,
        incremental: bool = False,
        background_nice: int = 0,
    ) -> None:
        self.storage_options = storage_options
        self.remote = open_remote(url, storage_options, **(remote_options or {}))
        self.url = self.remote.url
        self.on_error = on_error
        self._retention = retention
        self._max_pause = max_pause
        self._cond = threading.Condition()
        self._queue: list[_Upload] = []
        self._inflight: _Upload | None = None
        self._mirrored: list[str] = []
        self._skipped: list[str] = []
        self._failures = 0
        self._last_error: str | None = None
        self._raise: BaseException | None = None
        self._closing = False
        self._stopped: str | None = None  # why mirroring stopped for good (another session took the run over)
        self._latest: Latest | None = None
        self._remote_manifests: dict[str, Manifest] = {}
        self._pid = os.getpid()
        self.incremental = incremental
        self._known_blobs: set[str] | None = None
        self.bytes_uploaded = 0
        self.lease = Lease(self.remote, takeover=takeover)
        self.lease.acquire()
        self._nice = background_nice
        self._thread = threading.Thread(target=self._run, name="syncckpt-uploader", daemon=True)
        self._thread.start()

    # ---- called from the writer / training thread -------------------------------------------------------------
    def submit(self, directory: Path, manifest: Manifest) -> None:
        """Queue a committed local checkpoint for mirroring (hard-links its files into a staging folder first)."""
        if self._stopped:
            log.warning("%s not mirrored: mirroring to %s stopped (%s)", manifest.name, self.url, self._stopped)
            return
        src = Path(directory) / manifest.name
        staging = Path(directory) / f".upload-{manifest.name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            local.link_files(src, staging, [*manifest.files, local.FileEntry(MANIFEST_NAME, 0, "")])
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        job = _Upload(manifest, staging)
        with self._cond:
            kept = []
            for q in self._queue:
                superseded = q.name == job.name or (q.manifest.kind == "step" and job.manifest.kind == "step")
                if superseded:
                    self._skipped.append(q.name)
                    log.info("Upload of %s skipped: superseded by %s", q.name, job.name)
                    shutil.rmtree(q.staging, ignore_errors=True)
                else:
                    kept.append(q)
            self._queue = kept + [job]
            self._cond.notify_all()

    def ensure_mirrored(self, directory: Path, manifest: Manifest) -> None:
        """After resuming from a local checkpoint the remote may not have it (the last session died before the
        upload finished): queue it unless the remote already holds an identical manifest."""
        try:
            remote_manifest, _ = self.remote.read_manifest(manifest.name)
            if same_content(remote_manifest, manifest) and manifest.name not in self._quarantine_index():
                return
        except (FileNotFoundError, CheckpointCorrupt, OSError, RemoteError):
            pass
        log.info("Checkpoint %s is not on %s yet; mirroring it", manifest.name, self.url)
        self.submit(directory, manifest)

    def forget_remote_state(self) -> None:
        """Re-read LATEST before the next commit (resume may have quarantined what it named)."""
        self._latest = None

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
                "mirrored": list(self._mirrored),
                "pending": [q.name for q in self._queue],
                "uploading": self._inflight.name if self._inflight else None,
                "skipped": list(self._skipped),
                "upload_failures": self._failures,
                "last_upload_error": self._last_error,
                "mirroring_stopped": self._stopped,
            }

    def close(self, timeout: float | None = None) -> None:
        """Flush (until done, ``timeout``, or an upload failing for good: a dead remote must not hang the end of
        training), then stop the thread and release the lease. What is left stays local; a later session that
        resumes from it mirrors it."""
        self.wait(timeout, stop_on_failure=True)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        pending = self.status()["pending"]
        if pending:
            log.warning("Closing with uploads to %s not finished: %s; they stay in the local folder and the next "
                        "session that resumes from them mirrors them", self.url, pending)
        self.lease.release()
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
                self._upload(job)
            except RemoteConflict as e:  # another session owns the run now: stop, never interleave with it
                self._stop_mirroring(job, e)
                continue
            except Exception as e:  # noqa: BLE001 - a failed upload must never take the training loop down
                self._last_error = f"{job.name}: {e}"
                with self._cond:
                    self._failures += 1
                    self._inflight = None
                    superseded = any(
                        q.name == job.name or (q.manifest.kind == "step" and job.manifest.kind == "step")
                        for q in self._queue
                    )
                    if superseded:
                        shutil.rmtree(job.staging, ignore_errors=True)
                    else:
                        self._queue.insert(0, job)
                    if self.on_error == "raise":
                        self._raise = e
                    self._cond.notify_all()
                    log.warning(
                        "Upload of %s to %s failed: %s; retrying in %.0fs (training continues)",
                        job.name,
                        self.url,
                        e,
                        pause,
                    )
                    if not self._closing:
                        self._cond.wait(pause * (0.5 + random.random()))
                    pause = min(pause * 2, self._max_pause)
                    if self._closing:
                        return
                continue
            pause = 1.0
            with self._cond:
                self._inflight = None
                self._mirrored.append(job.name)
                self._cond.notify_all()

    def _stop_mirroring(self, job: _Upload, e: RemoteConflict) -> None:
        with self._cond:
            self._stopped = str(e)
            self._last_error = f"{job.name}: {e}"
            self._failures += 1
            dropped = [job, *self._queue]
            self._queue, self._inflight = [], None
            for q in dropped:
                shutil.rmtree(q.staging, ignore_errors=True)
            if self.on_error == "raise":
                self._raise = e
            self._cond.notify_all()
        log.error("Upload of %s to %s refused: %s. Mirroring stopped; not uploaded: %s (they stay local)",
                  job.name, self.url, e, [q.name for q in dropped])

    def _upload(self, job: _Upload) -> None:
        t0 = time.monotonic()
        manifest_bytes = (job.staging / MANIFEST_NAME).read_bytes()
        manifest = Manifest.from_bytes(manifest_bytes)
        self.lease.check()
        index = self._quarantine_index()
        deletions = self._plan_remote_retention(manifest, index)
        if self.incremental:
            manifest, manifest_bytes, sent = self._upload_parts(job.staging, manifest)
            latest = self._next_latest(manifest, manifest_bytes, index)
            failpoint("remote-manifest")
            self.remote.write_bytes(f"{manifest.name}/{MANIFEST_NAME}", manifest_bytes)
            if latest is not None:
                failpoint("remote-latest")
                self.remote.write_bytes(LATEST_NAME, latest.to_bytes())
            for d in deletions:
                failpoint("remote-delete")
                self.remote.delete_checkpoint(d)
        else:
            latest = self._next_latest(manifest, manifest_bytes, index)
            self.remote.commit_checkpoint(manifest.name, job.staging, manifest, manifest_bytes, latest, deletions)
            sent = manifest.total_size + len(manifest_bytes)
        self.bytes_uploaded += sent
        if manifest.name in index:  # a verified copy replaced the quarantined one
            quarantine.unmark_remote(self.remote, manifest.name)
            log.info("The quarantined copy of %s on %s is replaced by a verified one", manifest.name, self.url)
        self._remote_manifests[manifest.name] = manifest
        for d in deletions:
            self._remote_manifests.pop(d, None)
        if latest is not None:
            self._latest = latest
        if self.incremental:
            unused = self.remote.collect_unused_blobs(self._remote_manifests, self._known_blobs)
            if self._known_blobs is not None:
                self._known_blobs -= set(unused)
        shutil.rmtree(job.staging, ignore_errors=True)
        release_free_memory()  # part and multipart buffers freed in the upload threads' arenas
        log.info(
            "Mirrored %s to %s (%d bytes sent for %d bytes of data, in %.1fs)",
            manifest.name,
            self.url,
            sent,
            manifest.total_size,
            time.monotonic() - t0,
        )
        for d in deletions:  # deleted after the new checkpoint and LATEST were written; logged after it, too
            log.info("Removed old remote checkpoint %s/%s", self.url, d)

    def _upload_parts(self, folder: Path, manifest: Manifest) -> tuple[Manifest, bytes, int]:
        """Upload the blobs of ``manifest``'s files that the remote lacks; return the remote manifest."""
        if self._known_blobs is None:
            self._known_blobs = set(self.remote.list_blobs())
        known, queued, sent = self._known_blobs, {}, 0
        budget = ByteBudget(_BLOB_BYTES_IN_FLIGHT)

        def put(digest: str, data: bytes) -> None:
            try:
                self.remote.write_bytes(blob_rel(digest), data)
            finally:
                budget.release(len(data))

        entries, futures = [], []
        with ThreadPoolExecutor(self.remote.max_workers, thread_name_prefix="syncckpt-blob") as ex:
            for e in manifest.files:
                parts = []
                with open(folder / e.path, "rb") as f:
                    head = f.read(min(e.size, 1 << 20))
                    for offset, size in part_ranges(head, e.size):
                        f.seek(offset)
                        data = f.read(size)
                        digest = sha256_hex(data)
                        parts.append((size, digest))
                        if digest not in known and digest not in queued:
                            queued[digest] = size
                            sent += size
                            budget.acquire(size)  # parts read ahead of the upload stay within the budget
                            futures.append(ex.submit(put, digest, data))
                entries.append(dataclasses.replace(e, parts=tuple(parts)))
            failpoint("remote-data")
            for fut in futures:
                fut.result()
        stats = self.remote._parallel(lambda d: self.remote.stat(blob_rel(d)), list(queued))
        for (digest, size), st in zip(
            queued.items(), stats, strict=True
        ):  # check sizes without downloading, as for files
            if st.size != size:
                raise RemoteError(f"{self.url}/{blob_rel(digest)}: store holds {st.size} bytes, expected {size}")
        known.update(queued)
        remote_manifest = dataclasses.replace(manifest, files=entries)
        data = remote_manifest.to_bytes()
        return remote_manifest, data, sent + len(data)

    def _next_latest(self, manifest: Manifest, manifest_bytes: bytes, index: dict[str, Any]) -> Latest | None:
        if self._latest is None:
            self._latest = self.remote.read_latest()
        current = None if self._latest is not None and self._latest.name in index else self._latest
        return next_latest(current, manifest, manifest_bytes)

    def _quarantine_index(self) -> dict[str, Any]:
        try:
            return quarantine.read_index(self.remote)
        except (OSError, RemoteError) as e:
            log.warning("Cannot read %s/%s (%s)", self.url, quarantine.INDEX_NAME, e)
            return {}

    def _plan_remote_retention(self, new: Manifest, index: dict[str, Any]) -> list[str]:
        """Quarantined checkpoints are neither kept nor deleted by retention: they take no slot."""
        if self._retention is None:
            return []
        names = set(self.remote.list_checkpoints()) - set(index)
        refs = [Ref(new.name, new.kind, new.global_step, new.epoch, new.healthy)]
        for name in names - {new.name}:
            m = self._remote_manifests.get(name)
            if m is None:
                try:
                    m, _ = self.remote.read_manifest(name)
                except (CheckpointCorrupt, FileNotFoundError):
                    continue  # a damaged remote checkpoint is left for a human, never guessed about
                self._remote_manifests[name] = m
            refs.append(Ref(name, m.kind, m.global_step, m.epoch, m.healthy))
        return [n for n in self._retention(refs) if n != new.name]
