"""snapshot -> files + hashes -> atomic commit -> local retention -> hand-off to the uploader, off the training thread.

:class:`Writer` owns the staging arena, the one background writer thread and the rank commit. The training thread
only waits for :meth:`Writer.start`'s memory copy into reused staging buffers (a reservation on the arena, held
until the writer has the files on disk); serialising, hashing, fsync and the commit run on the writer thread at
low CPU priority. Under torch.distributed every rank writes its own part into rank 0's temporary folder and rank 0
commits only when every rank reported success; on nodes without a shared folder each node's first rank commits its
node's part (:mod:`syncckpt.nodes`).

>>> import tempfile, torch
>>> from pathlib import Path
>>> from syncckpt.distributed import Solo
>>> from syncckpt.schedule import BestMetric, SaveSchedule
>>> best = BestMetric(SaveSchedule())
>>> w = Writer(Path(tempfile.mkdtemp()), Solo(), uploader=None, keep_last=1, keep_epochs=1, best=best)
>>> w.start({"model": torch.nn.Linear(2, 2)}, ["step"], 5, epoch=0, batch_idx=4, metrics=None)
>>> w.wait(), w.last_committed
(True, 'checkpoint-step-5')
>>> w.close()
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import local, nodes, rng, sharded
from ._failpoints import failpoint
from ._memory import release_free_memory
from ._threads import lower_priority
from .distributed import Dist
from .env import check_disk_budget
from .errors import ConfigError
from .format import STATE_FILE, encode_state, iter_file_chunks, versions
from .manifest import Kind, Manifest, checkpoint_name, json_safe_metrics, same_content
from .restore import own_states, positions
from .retention import KEEP_LOCAL, Ref, local_copies_to_drop, plan_deletions
from .schedule import BestMetric
from .snapshot import Reservation, Snapshot, StagingArena, collect_state, state_sizes, take_snapshot

log = logging.getLogger("syncckpt")


def check_settings(
    keep_last: int, keep_epochs: int, on_upload_error: str, background_nice: int, keep_local: str, mirrored: bool
) -> None:
    """Raise ConfigError for a setting no writer can work with (before anything is created)."""
    if keep_local not in KEEP_LOCAL:
        raise ConfigError(f"keep_local must be one of {', '.join(map(repr, KEEP_LOCAL))}, got {keep_local!r}")
    if keep_local != "all" and not mirrored:
        raise ConfigError(f"keep_local={keep_local!r} needs a remote: without one the local copies are the only ones")
    if keep_last < 1 or keep_epochs < 0:
        raise ConfigError("keep_last must be >= 1, keep_epochs >= 0 and save_every_n_epochs >= 1")
    if on_upload_error not in ("warn", "raise"):
        raise ConfigError(f"on_upload_error must be 'warn' or 'raise', got {on_upload_error!r}")
    if not 0 <= background_nice <= 19:
        raise ConfigError(f"background_nice must be between 0 and 19, got {background_nice}")


def open_directory(directory: Path, dist: Dist) -> str:
    """Create the checkpoint folder. Under torch.distributed it also finds out whether every node sees rank 0's
    folder or each node keeps its own (``dist.node_local``, see :mod:`syncckpt.nodes`). Returns the job's token
    for its temporary folders: the same on every rank. Then :func:`clean_directory`, once the remote's lease is
    taken."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, a read-only mount: the user's setting, not a bug
        raise ConfigError(f"checkpoint directory {directory}: {e.strerror or e}") from None
    token = dist.broadcast_json(uuid.uuid4().hex[:8]) if dist.active else ""
    if dist.active:
        dist.node_local, dist.token = nodes.private_directories(directory, dist, token), token
    return token


def clean_directory(directory: Path, dist: Dist) -> None:
    """The process that commits into ``directory`` cleans up what a killed save left there; every rank waits until
    its folder is clean. Called after the uploader took the remote's lease: a second session refused with
    LeaseHeld must not delete the live session's temporary folders (its upload's staging copy among them)."""
    if dist.commits:
        for what in local.cleanup_leftovers(directory):
            log.info("Checkpoint folder %s: %s", directory, what)
    dist.barrier()


@dataclass
class _Job:
    snapshot: Snapshot
    reservation: Reservation
    trainer: dict[str, Any]
    commits: list[Manifest]  # the first one gets the data written, the others (best_model) hard-link to it
    seq: int  # the same on every rank: names the shared temporary folder
    shards: Any = None  # sharded.ShardSnapshot of DTensor leaves, written through DCP by every rank
    early: Any = None  # remote.early.EarlyPut: each file goes to the store once written (one process only)


class Writer:
    """Background writing and committing of checkpoints into ``directory``."""

    def __init__(
        self,
        directory: Path,
        dist: Dist,
        uploader: Any,
        *,
        keep_last: int,
        keep_epochs: int,
        best: BestMetric,
        token: str = "",
        background_nice: int = 19,
        keep_local: str = "all",
    ) -> None:
        self.directory = directory
        self.keep_local = keep_local
        self._verified: dict[str, Manifest] = {}  # mirrored by this session and still in the store
        self._started: dict[str, float] = {}  # when each save in flight started (monotonic)
        self.last_durable: float | None = None  # seconds the last save took to commit (and be mirrored)
        self.dist = dist
        self.uploader = uploader
        self.keep_last, self.keep_epochs = keep_last, keep_epochs
        self.best = best  # the best-metric bar; best_model's metric is its schedule's metric_for_best
        self.metric_for_best = best.schedule.metric_for_best
        self.arena = StagingArena()
        self.last_committed: str | None = None
        self.last_saved_step: int | None = None
        self.save_error: str | None = None
        self.protected: str | None = None  # the checkpoint a run resumed from, until a newer one exists
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="syncckpt-writer", initializer=lower_priority, initargs=(background_nice,)
        )
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()
        self._seq = 0
        self._sharded: bool | None = None  # known at the first save: does the state hold DTensors?
        self._prefaulted = False
        # Files get a CRC32C only when the mirror's store can check an upload against it (GCS).
        self._crc32c = uploader is not None and uploader.remote.keeps_crc32c
        self._token = token  # the same on every rank of a job: names the shared temporary folders
        self._warned_no_batch = False

    # ---- the training thread --------------------------------------------------------------------------------
    def start(
        self,
        objects: dict[str, Any],
        kinds: list[Kind],
        global_step: int,
        *,
        epoch: int,
        batch_idx: int | None,
        metrics: dict[str, Any] | None,
    ) -> None:
        """Snapshot ``objects`` now (waiting only for a previous save still reading the staging buffers), then
        write and commit one checkpoint per kind in the background (best_model hard-links the first).
        ``batch_idx`` None (not known) warns once: resuming such a checkpoint restarts its epoch."""
        if batch_idx is None:
            if not self._warned_no_batch:
                log.warning(
                    "step()/save() without batch_idx: resuming from such a checkpoint restarts its epoch from "
                    "the first batch; pass batch_idx for an exact mid-epoch resume"
                )
                self._warned_no_batch = True
            batch_idx = -1
        reservation = self.arena.reserve()
        assert reservation is not None
        try:
            states, shards = self._states(objects, epoch, batch_idx)
            snap = take_snapshot(states, self.arena)
            failpoint("snapshot")
        except BaseException:
            reservation.release()
            raise
        self.last_saved_step = global_step
        started = time.monotonic()
        safe_metrics = json_safe_metrics(metrics)
        best = self.best.bar if "best" in kinds else self.best.best
        trainer = {
            "global_step": global_step,
            "epoch": epoch,
            "batch_idx": batch_idx,
            "metrics": safe_metrics,
            "best_metric": best,
        }
        commits = [
            Manifest(
                name=checkpoint_name(kind, global_step if kind == "step" else epoch),
                kind=kind,
                global_step=global_step,
                epoch=epoch,
                batch_idx=batch_idx,
                files=[],
                metrics=safe_metrics,
                versions=versions(),
                extra={"best_metric": best, "metric_for_best": self.metric_for_best},
            )
            for kind in kinds
        ]
        self._seq += 1
        with self._lock:  # before the writer thread can commit it
            self._started.update((m.name, started) for m in commits)
        fut = self._executor.submit(self._write, _Job(snap, reservation, trainer, commits, self._seq, shards))
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()] + [fut]

    def _states(self, objects: dict[str, Any], epoch: int, batch_idx: int) -> tuple[dict[str, Any], Any]:
        states = collect_state(objects)
        shards = None
        if self.dist.active and self._sharded is not False:
            # Sharded (FSDP2/DTensor) leaves go through DCP, every rank writing its own shards.
            states, dtensors = sharded.split_dtensors(states)
            self._sharded = bool(dtensors)
            if dtensors:
                shards = sharded.snapshot_shards(dtensors)
        if not self.dist.is_main:  # replicated state is written once, by rank 0; each rank its RNG and own data
            r = self.dist.rank
            return {f"rng-rank{r}": rng.capture(), **own_states(objects, states, r, epoch, batch_idx)}, shards
        for name, extra in positions(objects, epoch, batch_idx).items():
            states[name] = {**states[name], **extra}
        states["rng"] = rng.capture()
        return states, shards

    def prefault(self, objects: dict[str, Any]) -> None:
        """Size and touch the staging buffers in the background before the first save is due (once)."""
        if self._prefaulted or not objects:
            return
        self._prefaulted = True
        reservation = self.arena.reserve(blocking=False)
        if reservation is None:
            return
        try:
            sizes = state_sizes(collect_state(objects))
        except Exception:  # noqa: BLE001 - a state problem surfaces with a clear error at the first real save
            reservation.release()
            return

        def run() -> None:
            try:
                for filename, nbytes in sizes.items():
                    self.arena.buffer(filename, nbytes)
            finally:
                reservation.release()

        self._executor.submit(run)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every started save is committed locally (or failed). True when all done."""
        with self._lock:
            futures = list(self._futures)
        _, pending = wait_futures(futures, timeout=timeout)
        return not pending

    def in_progress(self) -> int:
        with self._lock:
            return sum(not f.done() for f in self._futures)

    def close(self, timeout: float | None = None) -> None:
        self.wait(timeout)
        self._executor.shutdown(wait=True)

    def status(self) -> dict[str, Any]:
        """The local half of the manager's status: committed checkpoints, the last one, saves running, errors."""
        return {
            "directory": str(self.directory),
            "local": sorted(c.name for c in local.list_checkpoints(self.directory)),
            "last_committed": self.last_committed,
            "saves_in_progress": self.in_progress(),
            "save_error": self.save_error,
        }

    def resumed(self, manifest: Manifest, best_metric: float | None) -> None:
        """A run resumed from ``manifest``: its step counts as saved, the best bar is its best, and its local copy
        (if any) is kept until a newer checkpoint exists."""
        if best_metric is not None:
            self.best.landed(best_metric)
        self.last_saved_step = manifest.global_step
        self.protected = manifest.name if (self.directory / manifest.name).exists() else None

    # ---- the writer thread ----------------------------------------------------------------------------------
    def _write(self, job: _Job) -> None:
        """Health check, files + hashes, atomic commit, retention, hand-off to the uploader."""
        try:
            bad = job.snapshot.nonfinite_tensors()
            if bad:
                log.warning(
                    "Non-finite values in %s; %s is marked unhealthy and will not replace the last healthy checkpoint",
                    ", ".join(bad[:5]),
                    job.commits[0].name,
                )
            tmp_name = f".tmp-{job.commits[0].name}-{self._token}-{job.seq}" if self.dist.active else None
            if not self.dist.commits:  # other ranks write their part into their committer's temporary folder
                tmp = self.directory / tmp_name  # type: ignore[operator]
                tmp.mkdir(parents=True, exist_ok=True)
                self._write_with_ranks(tmp, job, bad)
                return
            self._commit_all(job, bad, tmp_name)
            if self.protected is not None:
                self.protected = None  # a newer checkpoint exists now
            self._apply_local_retention()
            release_free_memory()  # the writer thread's arena: hashing and health-check buffers
        except Exception as e:  # noqa: BLE001 - the training loop must survive a failed save (full disk, ...)
            if job.early is not None:  # no commit follows the data that went early (a no-op once submitted)
                self.uploader.abandon_early(job.commits[0].name)
            if any(m.kind == "best" for m in job.commits) and self.best.best != job.trainer["best_metric"]:
                self.best.lost()
            self.save_error = f"{job.commits[0].name}: {e}"
            log.warning(
                "Checkpoint %s was NOT saved: %s. Checkpoints are not being saved until this is fixed; "
                "training continues and the previous checkpoint is intact.",
                job.commits[0].name,
                e,
            )
        finally:
            job.reservation.release()

    def _commit_all(self, job: _Job, bad: list[str], tmp_name: str | None) -> None:
        first: Manifest | None = None
        for m in job.commits:
            m.healthy, m.unhealthy_tensors, m.world_size = not bad, bad, self.dist.world_size
            if first is None:
                if self.uploader is not None and not self.dist.active:  # files go as written (remote.early)
                    job.early = self.uploader.begin_early(self.directory, m.name)
                first = committed = local.commit(
                    self.directory, m, lambda tmp: self._write_with_ranks(tmp, job, bad), tmp_name=tmp_name
                )
            else:
                src = self.directory / first.name
                committed = local.commit(
                    self.directory, m, lambda tmp, s=src, f=first: local.link_files(s, tmp, f.files)
                )
            self._committed(committed)

    def _committed(self, committed: Manifest) -> None:
        if self.uploader is None:
            self._durable(committed.name)
        if self.last_committed is None:  # sizes are known now: warn early if retention cannot fit
            kept = self.keep_last + self.keep_epochs + (1 if self.metric_for_best else 0)
            # with keep_local, the newest (or none) stays, plus one still uploading beside the one being written
            keep = {"newest": 2, "none": 1}.get(self.keep_local, kept)
            check_disk_budget(self.directory, committed.total_size, keep, keep_local=self.keep_local)
        self.last_committed = committed.name
        if self.save_error:
            log.warning("Checkpoints are being saved again (%s)", committed.name)
            self.save_error = None
        log.info(
            "Checkpoint committed: %s (global step %d%s)",
            committed.name,
            committed.global_step,
            "" if committed.healthy else ", UNHEALTHY",
        )
        if committed.kind == "best":
            self.best.landed(committed.best_metric)
        if self.uploader is not None:
            self.uploader.submit(self.directory, committed)

    def _write_own(self, tmp: Path, job: _Job) -> list[local.FileEntry]:
        entries = []
        if job.shards is not None:  # first, so that no rank skips DCP's collectives
            rels = sharded.save_shards(job.shards, tmp, process_group=self.dist.save_group)
            entries.extend(local.hash_file(tmp, rel) for rel in rels)
        staged = zip(job.snapshot.layouts, job.snapshot.buffers, strict=True)
        for lay, buf in sorted(staged, key=lambda s: -s[0].data_size):  # largest first: it goes early longest
            chunks = iter_file_chunks(lay, buf)
            entries.append(local.write_file(tmp, lay.filename, chunks, crc32c=self._crc32c, direct=True))
            if job.early is not None:
                job.early.send(tmp, entries[-1])
            failpoint("serialize")
        job.reservation.release()  # buffers are on disk: the next snapshot may reuse them
        state_file = STATE_FILE if self.dist.rank == 0 else f"state-rank{self.dist.rank}.json"
        state_bytes = encode_state(job.snapshot.structure, job.trainer)
        entries.append(local.write_file(tmp, state_file, [state_bytes], crc32c=self._crc32c))
        if job.early is not None:
            job.early.send(tmp, entries[-1])
        return entries

    def _write_with_ranks(self, tmp: Path, job: _Job, bad: list[str]) -> list[local.FileEntry]:
        """Write this rank's files, then gather every rank's entries on all ranks (a collective on the writer
        thread's group; one rank alone gathers only its own). Rank 0 commits only when every rank reports
        success; a dead rank fails the gather."""
        error = None
        own: list[local.FileEntry] = []
        try:
            own = self._write_own(tmp, job)
        except Exception as e:  # noqa: BLE001 - reported through the gather so no rank waits forever
            error = e
        if not self.dist.active:
            if error is not None:
                raise error
            return own
        reports = self.dist.gather_json(
            {"files": [e.to_dict() for e in own], "bad": bad, "error": None if error is None else str(error)}
        )
        if error is not None:
            raise error
        failed = [f"rank {r}: {rep['error']}" for r, rep in enumerate(reports) if rep["error"]]
        if failed:
            raise OSError("not every rank wrote its part: " + "; ".join(failed))
        entries: list[local.FileEntry] = []
        for rep in reports:
            entries.extend(
                local.FileEntry(f["path"], f["size"], f["sha256"], crc32c=f.get("crc32c")) for f in rep["files"]
            )
            bad.extend(x for x in rep["bad"] if x not in bad)
        if self.dist.node_local:  # this node's part, and which rank wrote which file (for resume)
            entries = nodes.node_part(self.dist, job, reports, f"{self._token}-{job.seq}")
        return entries

    def _apply_local_retention(self) -> None:
        refs = [
            Ref(c.name, c.manifest.kind, c.manifest.global_step, c.manifest.epoch, c.manifest.healthy)
            for c in local.list_checkpoints(self.directory)
        ]
        keep_last, keep_epochs = self.keep_last, self.keep_epochs
        if self.keep_local != "all":  # the store keeps the history: locally the newest (plus any uploading) will do
            keep_last, keep_epochs = 1, min(keep_epochs, 1)
        for name in plan_deletions(refs, keep_last, keep_epochs, self.protected_names()):
            failpoint("retention-delete")
            local.delete(self.directory, name)
            log.info("Removed old checkpoint %s", name)

    def mirrored(self, manifest: Manifest, on_remote: list[str]) -> None:
        """The uploader verified ``manifest`` in the store (called from its thread; ``on_remote``: what this
        session mirrored and retention kept there). Under ``keep_local`` the local copies the store holds are
        deleted on the writer thread, so that no commit of the same name (best_model) runs meanwhile."""
        self._durable(manifest.name)
        if self.keep_local == "all":
            return
        with self._lock:
            self._verified = {n: m for n, m in self._verified.items() if n in on_remote}
            self._verified[manifest.name] = manifest
        try:
            self._executor.submit(self._drop_mirrored)
        except RuntimeError:  # the writer is closed: no commit runs any more
            self._drop_mirrored()

    def _durable(self, name: str) -> None:
        with self._lock:
            started = self._started.pop(name, None)
        if started is not None:
            self.last_durable = time.monotonic() - started

    def _drop_mirrored(self) -> None:
        with self._lock:
            verified = dict(self._verified)
        listed = local.list_checkpoints(self.directory)
        same = [c.name for c in listed if c.name in verified and same_content(c.manifest, verified[c.name])]
        refs = [Ref(c.name, c.manifest.kind, c.manifest.global_step, c.manifest.epoch) for c in listed]
        for name in local_copies_to_drop(refs, same, self.keep_local):
            local.delete(self.directory, name)
            log.info("Removed the local copy of %s: mirrored and verified (keep_local=%r)", name, self.keep_local)

    def protected_names(self) -> set[str]:
        return {self.protected} if self.protected else set()

    def remote_retention(self, refs: list[Ref]) -> list[str]:
        """The uploader's retention plan: the same rule as the local folder's."""
        return plan_deletions(refs, self.keep_last, self.keep_epochs, self.protected_names())
