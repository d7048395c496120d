"""CheckpointManager: when to save, what to resume from, and the orchestration between the two.

The data path lives in the other modules (snapshot -> format -> local commit -> uploader -> remote); this class
decides *when* (every N optimizer steps or M minutes, epoch ends, best metric, SIGTERM) and wires the steps
together. The training loop only ever waits for the in-memory snapshot.

Example (runs as a doctest):

>>> import tempfile, torch
>>> from syncckpt import CheckpointManager
>>> model = torch.nn.Linear(4, 2)
>>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
>>> with CheckpointManager(tempfile.mkdtemp(), save_every_n_steps=2, handle_sigterm=False) as mgr:
...     mgr.register(model=model, optimizer=opt)
...     print(mgr.resume())
...     for step in range(1, 5):
...         model(torch.randn(3, 4)).sum().backward(); opt.step(); opt.zero_grad()
...         _ = mgr.step(step, epoch=0, batch_idx=step - 1)
...     mgr.wait()
...     sorted(mgr.list_local())
None
True
['checkpoint-step-4']
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import local, rng, sharded
from ._failpoints import failpoint
from ._memory import release_free_memory
from ._threads import lower_priority
from .distributed import Dist
from .env import check_disk_budget, default_checkpoint_dir
from .errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    ConfigError,
    NoValidCheckpoint,
    StateMismatch,
    SyncCkptError,
)
from .format import iter_file_chunks, load_safetensors_bytes, unflatten_state
from .manifest import Manifest, checkpoint_name, json_safe_metrics
from .resume import find_resumable, newer_valid, pull_checkpoint_url
from .retention import Ref, plan_deletions
from .sampler import ResumableSampler
from .snapshot import Snapshot, StagingArena, check_object_name, collect_state, state_sizes, take_snapshot

log = logging.getLogger("syncckpt")

STATE_FILE = "state.json"
DCP_DIR = "dcp/"


@dataclass(frozen=True)
class ResumeInfo:
    """Where training continues after :meth:`CheckpointManager.resume`.

    ``epoch`` is the epoch to continue in and ``batch_idx`` the last micro-batch of it already trained (-1 when
    the epoch starts from its beginning, e.g. after an epoch checkpoint). ``path`` is the local checkpoint folder.
    """

    global_step: int
    epoch: int
    batch_idx: int
    path: str
    metrics: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    kind: str = "step"
    source: str = "local"


@dataclass
class _Decoded:
    states: dict[str, Any]
    trainer: dict[str, Any]
    sharded: bool  # DTensor leaves to load through DCP


_Loaded = tuple[Manifest, _Decoded, Path, str]  # manifest, decoded states, local folder, where it came from


@dataclass
class _Job:
    snapshot: Snapshot
    trainer: dict[str, Any]
    commits: list[Manifest]  # first one gets the data written, the others (best_model) hard-link to it
    seq: int = 0  # the same on every rank: names the shared temporary folder
    shards: Any = None  # sharded.ShardSnapshot of DTensor leaves, written through DCP by every rank


class CheckpointManager:
    """Step, epoch and best-model checkpoints with background writing, verification and optional mirroring.

    Args:
        directory: local checkpoint folder (created if missing); default ``/kaggle/working/checkpoints`` on
            Kaggle, ``/content/checkpoints`` on Colab, ``./checkpoints`` elsewhere.
        save_every_n_steps: save a step checkpoint every N optimizer steps (``None`` disables).
        save_every_n_minutes: also save when this much wall-clock time passed since the last save.
        keep_last: step checkpoints kept (locally and remotely).
        keep_epochs: epoch checkpoints kept (the seed's ``save_total_limit``).
        save_every_n_epochs: write an epoch checkpoint every N epochs.
        metric_for_best, mode: keep ``best_model`` by this metric of :meth:`save_epoch` (``"max"``/``"min"``).
        remote: URL mirrored in the background (``s3://``, ``gs://``, ``hf://``, ``file://``, a path, ...).
        storage_options: passed to the remote backend (credentials, endpoint_url, ...); never logged.
        on_upload_error: ``"warn"`` (default: training never crashes because of the network) or ``"raise"``.
        takeover: take over a remote run another live session holds (see :class:`syncckpt.errors.LeaseHeld`).
        handle_sigterm: on SIGTERM, save a last checkpoint at the next :meth:`step` and flush uploads within
            ``grace_period`` seconds, then exit with status 143.
        save_on_sigterm: take that last checkpoint (otherwise only flush what is committed).
        grace_period: seconds a SIGTERM or interpreter exit may spend flushing.
        remote_options: extra keyword arguments for the remote backend (e.g. ``min_commit_interval`` for hf://).
        incremental: mirror tensors as content-addressed blobs so unchanged ones (a frozen backbone, LoRA base
            weights) are not uploaded again (fsspec remotes; on the Hub, Xet deduplicates by itself).
        background_nice: nice value (0..19) of the writer and uploader threads and the threads they start
            (Linux). The default 19 lets them run in the CPU time training leaves idle; under full CPU load a
            save then takes longer to commit. 0 runs them at the training loop's priority.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        save_every_n_steps: int | None = 500,
        save_every_n_minutes: float | None = None,
        keep_last: int = 1,
        keep_epochs: int = 3,
        metric_for_best: str | None = None,
        mode: str = "max",
        *,
        save_every_n_epochs: int = 1,
        remote: str | None = None,
        storage_options: dict[str, Any] | None = None,
        on_upload_error: str = "warn",
        takeover: bool = False,
        handle_sigterm: bool = True,
        save_on_sigterm: bool = True,
        grace_period: float = 60.0,
        remote_options: dict[str, Any] | None = None,
        incremental: bool = False,
        background_nice: int = 19,
    ) -> None:
        if save_every_n_steps is not None and save_every_n_steps < 1:
            raise ConfigError(f"save_every_n_steps must be >= 1 or None, got {save_every_n_steps}")
        if save_every_n_minutes is not None and save_every_n_minutes <= 0:
            raise ConfigError(f"save_every_n_minutes must be > 0 or None, got {save_every_n_minutes}")
        if keep_last < 1 or keep_epochs < 0 or save_every_n_epochs < 1:
            raise ConfigError("keep_last must be >= 1, keep_epochs >= 0 and save_every_n_epochs >= 1")
        if mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', got {mode!r}")
        if on_upload_error not in ("warn", "raise"):
            raise ConfigError(f"on_upload_error must be 'warn' or 'raise', got {on_upload_error!r}")
        if not 0 <= background_nice <= 19:
            raise ConfigError(f"background_nice must be between 0 and 19, got {background_nice}")
        self.directory = Path(directory) if directory is not None else default_checkpoint_dir()
        self.save_every_n_steps = save_every_n_steps
        self.save_every_n_minutes = save_every_n_minutes
        self.keep_last = keep_last
        self.keep_epochs = keep_epochs
        self.save_every_n_epochs = save_every_n_epochs
        self.metric_for_best = metric_for_best
        self.mode = mode
        self.grace_period = grace_period
        self.save_on_sigterm = save_on_sigterm

        self._objects: dict[str, Any] = {}
        self._arena = StagingArena()
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="syncckpt-writer", initializer=lower_priority, initargs=(background_nice,)
        )
        self._futures: list[Future[None]] = []
        self._futures_lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        self._last_save_time = time.monotonic()
        self._last_saved_step: int | None = None
        self._best: float | None = None
        self._best_candidate: float | None = None
        self._warned_no_batch = False
        self._best_warned = False
        self._resumed_from: str | None = None
        self._fresh_beside_damaged = False
        self._last_committed: str | None = None
        self._save_error: str | None = None
        self._prefaulted = False
        self._term_at: float | None = None
        self._term_done = threading.Event()
        self._prev_sigterm: Any = None

        self._dist = Dist.detect()
        self._sharded: bool | None = None  # known at the first save: does the state hold DTensors?
        self._is_main = self._dist is None or self._dist.is_main
        self._save_seq = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file in the way, a read-only mount: the user's setting, not a bug
            raise ConfigError(f"checkpoint directory {self.directory}: {e.strerror or e}") from None
        if self._is_main:
            for what in local.cleanup_leftovers(self.directory):
                log.info("Checkpoint folder %s: %s", self.directory, what)
        if self._dist is not None:
            # One token for this job's temporary folders; every rank waits until rank 0 cleaned up.
            self._token = self._dist.broadcast_json(uuid.uuid4().hex[:8])
        self._uploader = None
        if remote is not None and self._is_main:
            from .uploader import Uploader

            self._uploader = Uploader(
                remote,
                storage_options=storage_options,
                on_error=on_upload_error,
                takeover=takeover,
                retention=self._remote_retention,
                remote_options=remote_options or {},
                incremental=incremental,
                background_nice=background_nice,
            )
        # Files get a CRC32C only when the mirror's store can check an upload against it (GCS).
        self._crc32c = self._uploader is not None and self._uploader.remote.keeps_crc32c

        self_ref = weakref.ref(self)
        self._atexit = lambda: (m := self_ref()) is not None and m._flush_at_exit()
        atexit.register(self._atexit)
        if handle_sigterm and threading.current_thread() is threading.main_thread():
            self._prev_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._sigterm_installed = True
        else:
            self._sigterm_installed = False

    # ---- registration -----------------------------------------------------------------------------------------
    def register(self, **objects: Any) -> None:
        """Register objects to checkpoint under the given names: anything with ``state_dict``/``load_state_dict``
        (model, optimizer, scheduler, GradScaler, :class:`ResumableSampler`, your own objects)."""
        for name, obj in objects.items():
            check_object_name(name)
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise TypeError(f"cannot register {name!r}: {type(obj).__name__} has no state_dict/load_state_dict")
            self._objects[name] = obj

    # ---- saving -----------------------------------------------------------------------------------------------
    def step(
        self, global_step: int, *, epoch: int = 0, batch_idx: int | None = None, metrics: dict[str, Any] | None = None
    ) -> bool:
        """Call after every optimizer step; saves a step checkpoint when one is due. Returns whether a save started.

        ``batch_idx`` is the index within ``epoch`` of the last micro-batch already trained.
        """
        self._check_usable()
        timed = bool(self.save_every_n_minutes) and (
            time.monotonic() - self._last_save_time >= self.save_every_n_minutes * 60  # type: ignore[operator]
        )
        terminating = self._term_at is not None
        if self._dist is not None:  # every rank must take the same decision at the same step
            terminating, timed = self._dist.agree(terminating, timed)
            if terminating and self._term_at is None:
                self._term_at = time.monotonic()
        if terminating:
            self._finish_sigterm(global_step, epoch, batch_idx, metrics)
        if self._uploader is not None:
            self._uploader.raise_if_failed()
        due = timed or bool(self.save_every_n_steps and global_step % self.save_every_n_steps == 0)
        if not due or global_step == self._last_saved_step:
            if not self._prefaulted and self._objects:
                self._prefault()
            return False
        # If the previous checkpoint is still being written from the staging buffers, wait for it: memory stays
        # bounded to one set of buffers, and with saves minutes apart this never blocks in practice.
        self._arena.lock.acquire()
        self._start_save("step", global_step, epoch, self._batch(batch_idx), metrics)
        return True

    def _batch(self, batch_idx: int | None) -> int:
        if batch_idx is None:
            if not self._warned_no_batch:
                log.warning(
                    "step()/save() without batch_idx: resuming from such a checkpoint restarts its epoch from "
                    "the first batch; pass batch_idx for an exact mid-epoch resume"
                )
                self._warned_no_batch = True
            return -1
        return batch_idx

    def save(
        self, global_step: int, *, epoch: int = 0, batch_idx: int | None = None, metrics: dict[str, Any] | None = None
    ) -> None:
        """Take a step checkpoint now (waits only for a previous save still reading the staging buffers)."""
        self._check_usable()
        self._arena.lock.acquire()
        self._start_save("step", global_step, epoch, self._batch(batch_idx), metrics)

    def save_epoch(self, epoch: int, *, global_step: int, metrics: dict[str, Any] | None = None) -> bool:
        """Call at the end of every epoch: writes ``checkpoint-epoch-E`` (every ``save_every_n_epochs``) and
        replaces ``best_model`` when ``metrics[metric_for_best]`` improved. Returns whether anything was saved."""
        self._check_usable()
        if self._term_at is not None:
            self._finish_sigterm(global_step, epoch, None, metrics, epoch_done=True)
        kinds = []
        if (epoch + 1) % self.save_every_n_epochs == 0:
            kinds.append("epoch")
        if self._improves_best(metrics):
            kinds.append("best")
        if self._dist is not None:  # rank 0's metrics decide, so every rank takes part in the same save
            kinds = self._dist.broadcast_json(kinds)
        if not kinds:
            return False
        self._arena.lock.acquire()
        self._start_save(kinds, global_step, epoch, -1, metrics)
        return True

    def _improves_best(self, metrics: dict[str, Any] | None) -> bool:
        if not self.metric_for_best:
            return False
        value = (metrics or {}).get(self.metric_for_best)
        if value is None:
            if not self._best_warned:
                log.warning(
                    "metric_for_best %r is not in the metrics passed to save_epoch (%s); best_model is not updated",
                    self.metric_for_best,
                    sorted(metrics or {}),
                )
                self._best_warned = True
            return False
        value = float(value.item() if hasattr(value, "item") else value)
        if value != value:  # NaN never improves
            return False
        bar = self._best_candidate if self._best_candidate is not None else self._best
        better = bar is None or (value > bar if self.mode == "max" else value < bar)
        if better:
            self._best_candidate = value  # becomes the bar only once best_model is committed
        return better

    def _start_save(
        self, kinds: str | list[str], global_step: int, epoch: int, batch_idx: int, metrics: dict[str, Any] | None
    ) -> None:
        """Snapshot on the caller's thread (arena lock already held), then hand off to the writer."""
        kinds = [kinds] if isinstance(kinds, str) else kinds
        shards = None
        try:
            states = collect_state(self._objects) if (self._is_main or self._dist is not None) else {}
            if self._dist is not None and self._sharded is not False:
                # Sharded (FSDP2/DTensor) leaves go through DCP, every rank writing its own shards.
                states, dtensors = sharded.split_dtensors(states)
                self._sharded = bool(dtensors)
                if dtensors:
                    shards = sharded.snapshot_shards(dtensors)
            if self._is_main:
                for name, obj in self._objects.items():
                    if isinstance(obj, ResumableSampler):
                        states[name] = {**states[name], "position": {"epoch": epoch, "batch_idx": batch_idx}}
                states["rng"] = rng.capture()
            else:  # replicated state is written once, by rank 0; each rank keeps its own RNG streams
                states = {f"rng-rank{self._dist.rank}": rng.capture()}  # type: ignore[union-attr]
            snap = take_snapshot(states, self._arena)
            failpoint("snapshot")
        except BaseException:
            self._arena.lock.release()
            raise
        self._last_save_time = time.monotonic()
        self._last_saved_step = global_step
        safe_metrics = json_safe_metrics(metrics)
        best = self._best_candidate if "best" in kinds else self._best
        trainer = {
            "global_step": global_step,
            "epoch": epoch,
            "batch_idx": batch_idx,
            "metrics": safe_metrics,
            "best_metric": best,
        }
        commits = []
        for kind in kinds:
            name = checkpoint_name(kind, global_step if kind == "step" else epoch)
            commits.append(
                Manifest(
                    name=name,
                    kind=kind,
                    global_step=global_step,
                    epoch=epoch,
                    batch_idx=batch_idx,
                    files=[],
                    metrics=safe_metrics,
                    versions=_versions(),
                    extra={"best_metric": best, "metric_for_best": self.metric_for_best},
                )
            )
        self._save_seq += 1
        fut = self._executor.submit(self._write, _Job(snap, trainer, commits, self._save_seq, shards))
        with self._futures_lock:
            self._futures = [f for f in self._futures if not f.done()] + [fut]

    def _write(self, job: _Job) -> None:
        """Writer thread: health check, files + hashes, atomic commit, retention, hand-off to the uploader."""
        released = False
        try:
            bad = job.snapshot.nonfinite_tensors()
            if bad:
                log.warning(
                    "Non-finite values in %s; %s is marked unhealthy and will not replace the last healthy checkpoint",
                    ", ".join(bad[:5]),
                    job.commits[0].name,
                )
            state_bytes = _state_json(job.snapshot.structure, job.trainer)
            rank = self._dist.rank if self._dist is not None else 0
            state_file = STATE_FILE if rank == 0 else f"state-rank{rank}.json"

            def write_own(tmp: Path) -> list[local.FileEntry]:
                nonlocal released
                entries = []
                if job.shards is not None:  # first, so that no rank skips DCP's collectives
                    rels = sharded.save_shards(job.shards, tmp, process_group=self._dist.save_group)  # type: ignore[union-attr]
                    entries.extend(local.hash_file(tmp, rel) for rel in rels)
                for lay, buf in zip(job.snapshot.layouts, job.snapshot.buffers, strict=True):
                    entries.append(
                        local.write_file(tmp, lay.filename, iter_file_chunks(lay, buf), crc32c=self._crc32c)
                    )
                    failpoint("serialize")
                self._arena.lock.release()  # buffers are on disk: the next snapshot may reuse them
                released = True
                entries.append(local.write_file(tmp, state_file, [state_bytes], crc32c=self._crc32c))
                return entries

            def write_data(tmp: Path) -> list[local.FileEntry]:
                if self._dist is None:
                    return write_own(tmp)
                return self._write_with_ranks(tmp, write_own, bad)

            tmp_name = None if self._dist is None else f".tmp-{job.commits[0].name}-{self._token}-{job.seq}"
            if not self._is_main:  # other ranks write their part into rank 0's temporary folder, then report
                tmp = self.directory / tmp_name  # type: ignore[operator]
                tmp.mkdir(parents=True, exist_ok=True)
                write_data(tmp)
                return
            first: Manifest | None = None
            for m in job.commits:
                m.healthy, m.unhealthy_tensors = not bad, bad
                if self._dist is not None:
                    m.world_size = self._dist.world_size
                if first is None:
                    first = local.commit(self.directory, m, write_data, tmp_name=tmp_name)
                    committed = first
                else:
                    src = self.directory / first.name
                    committed = local.commit(
                        self.directory, m, lambda tmp, s=src, f=first: local.link_files(s, tmp, f.files)
                    )
                if self._last_committed is None:  # sizes are known now: warn early if retention cannot fit
                    check_disk_budget(
                        self.directory,
                        committed.total_size,
                        self.keep_last + self.keep_epochs + (1 if self.metric_for_best else 0),
                    )
                self._last_committed = committed.name
                if self._save_error:
                    log.warning("Checkpoints are being saved again (%s)", committed.name)
                    self._save_error = None
                log.info(
                    "Checkpoint committed: %s (global step %d%s)",
                    committed.name,
                    committed.global_step,
                    "" if committed.healthy else ", UNHEALTHY",
                )
                if committed.kind == "best":
                    self._best = committed.extra.get("best_metric")
                if self._uploader is not None:
                    self._uploader.submit(self.directory, committed)
            if self._resumed_from is not None:
                self._resumed_from = None  # a newer checkpoint exists now
            self._apply_local_retention()
            release_free_memory()  # the writer thread's arena: hashing and health-check buffers
        except Exception as e:  # noqa: BLE001 - the training loop must survive a failed save (full disk, ...)
            if any(m.kind == "best" for m in job.commits) and self._best != job.trainer["best_metric"]:
                self._best_candidate = self._best  # a best_model that never landed does not raise the bar
            self._save_error = f"{job.commits[0].name}: {e}"
            log.warning(
                "Checkpoint %s was NOT saved: %s. Checkpoints are not being saved until this is fixed; "
                "training continues and the previous checkpoint is intact.",
                job.commits[0].name,
                e,
            )
        finally:
            if not released:
                self._arena.lock.release()

    def _write_with_ranks(self, tmp: Path, write_own: Any, bad: list[str]) -> list[local.FileEntry]:
        """Write this rank's files, then gather every rank's entries on all ranks (a collective on the writer
        thread's group). Rank 0 commits only when every rank reports success; a dead rank fails the gather."""
        error = None
        own: list[local.FileEntry] = []
        try:
            own = write_own(tmp)
        except Exception as e:  # noqa: BLE001 - reported through the gather so no rank waits forever
            error = e
        reports = self._dist.gather_json(  # type: ignore[union-attr]
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
        return entries

    def _apply_local_retention(self) -> None:
        refs = [
            Ref(c.name, c.manifest.kind, c.manifest.global_step, c.manifest.epoch, c.manifest.healthy)
            for c in local.list_checkpoints(self.directory)
        ]
        protected = {self._resumed_from} if self._resumed_from else set()
        for name in plan_deletions(refs, self.keep_last, self.keep_epochs, protected):
            failpoint("retention-delete")
            local.delete(self.directory, name)
            log.info("Removed old checkpoint %s", name)

    def _remote_retention(self, refs: list[Ref]) -> list[str]:
        protected = {self._resumed_from} if self._resumed_from else set()
        return plan_deletions(refs, self.keep_last, self.keep_epochs, protected)

    def _prefault(self) -> None:
        """Size and touch the staging buffers in the background before the first save is due."""
        self._prefaulted = True
        if not self._arena.lock.acquire(blocking=False):
            return
        try:
            sizes = state_sizes(collect_state(self._objects))
        except Exception:  # noqa: BLE001 - a state problem surfaces with a clear error at the first real save
            self._arena.lock.release()
            return

        def run() -> None:
            try:
                for filename, nbytes in sizes.items():
                    self._arena.buffer(filename, nbytes)
            finally:
                self._arena.lock.release()

        self._executor.submit(run)

    # ---- waiting, status, shutdown ------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until every started save is committed (and mirrored, with a remote). True when all done."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._futures_lock:
            futures = list(self._futures)
        done, pending = wait_futures(futures, timeout=timeout)
        if pending:
            return False
        if self._uploader is not None:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._uploader.wait(remaining):
                return False
            self._uploader.raise_if_failed()
        return True

    def status(self) -> dict[str, Any]:
        """What is committed locally, what is mirrored, what is pending, and the last errors."""
        with self._futures_lock:
            writing = sum(not f.done() for f in self._futures)
        st: dict[str, Any] = {
            "directory": str(self.directory),
            "local": sorted(c.name for c in local.list_checkpoints(self.directory)),
            "last_committed": self._last_committed,
            "saves_in_progress": writing,
            "save_error": self._save_error,
        }
        if self._uploader is not None:
            st.update(self._uploader.status())
        return st

    def list_local(self) -> list[str]:
        """Names of the committed local checkpoints."""
        return [c.name for c in local.list_checkpoints(self.directory)]

    def close(self, timeout: float | None = None) -> None:
        """Wait for pending saves and uploads, then stop background work. Safe to call twice."""
        if self._closed or os.getpid() != self._pid:
            return
        try:
            with self._futures_lock:
                futures = list(self._futures)
            wait_futures(futures, timeout=timeout)  # local saves; uploads are flushed by the uploader's close
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)
            if self._uploader is not None:
                self._uploader.close(timeout)
            atexit.unregister(self._atexit)
            if self._sigterm_installed and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._prev_sigterm or signal.SIG_DFL)
                self._sigterm_installed = False
        if self._uploader is not None:
            self._uploader.raise_if_failed()  # on_upload_error="raise": the run ends with the upload error

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise SyncCkptError("this CheckpointManager is closed; create a new one")
        if os.getpid() != self._pid:
            raise SyncCkptError("CheckpointManager used in a forked child process; create one in that process")

    def _flush_at_exit(self) -> None:
        if self._closed or os.getpid() != self._pid:
            return
        try:  # an exception here would only reach stderr as "Exception ignored in atexit callback"
            if not self.wait(self.grace_period):
                log.warning(
                    "Exiting with checkpoint work still pending after %.0fs: %s", self.grace_period, self.status()
                )
            self.close(timeout=0)
        except SyncCkptError as e:  # on_upload_error="raise" and the mirror failed: say so plainly
            log.error("At exit: %s", e)

    # ---- SIGTERM ------------------------------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._term_at is not None or os.getpid() != self._pid:
            return
        self._term_at = time.monotonic()
        log.warning(
            "SIGTERM received: %s at the next step, then flushing uploads (grace period %.0fs)",
            "saving a last checkpoint" if self.save_on_sigterm else "stopping",
            self.grace_period,
        )
        threading.Thread(target=self._sigterm_watchdog, name="syncckpt-sigterm", daemon=True).start()

    def _finish_sigterm(
        self,
        global_step: int,
        epoch: int,
        batch_idx: int | None,
        metrics: dict[str, Any] | None,
        epoch_done: bool = False,
    ) -> None:
        """Called from step()/save_epoch() after SIGTERM, at a consistent point of the training loop."""
        if self._term_done.is_set():
            return
        try:
            if self.save_on_sigterm and self._objects and global_step != self._last_saved_step:
                self._arena.lock.acquire()
                if epoch_done:
                    self._start_save("epoch", global_step, epoch, -1, metrics)
                else:
                    self._start_save("step", global_step, epoch, -1 if batch_idx is None else batch_idx, metrics)
            remaining = max(0.0, self._term_at + self.grace_period - time.monotonic())  # type: ignore[operator]
            ok = self.wait(remaining)
            done = "checkpoint saved and mirrored" if self._uploader is not None else "checkpoint saved"
            log.warning("SIGTERM: %s; exiting", done if ok else "flush incomplete")
        finally:
            self._term_done.set()
        raise SystemExit(143)

    def _sigterm_watchdog(self) -> None:
        # If the loop does not reach step() in time (a long validation), flush what is committed and exit anyway.
        if self._term_done.wait(self.grace_period * 0.5):
            return
        remaining = max(0.0, self._term_at + self.grace_period - time.monotonic())  # type: ignore[operator]
        ok = self.wait(remaining)
        done = "committed checkpoints are mirrored" if self._uploader is not None else "committed checkpoints are saved"
        log.warning(
            "SIGTERM: training did not reach a step boundary in time; %s; exiting", done if ok else "flush incomplete"
        )
        logging.shutdown()
        os._exit(143)

    # ---- resume -------------------------------------------------------------------------------------------------
    def resume(
        self, path: str | os.PathLike[str] | None = None, *, start_fresh_if_damaged: bool = False
    ) -> ResumeInfo | None:
        """Restore every registered object from the newest valid checkpoint (local or remote), in place.

        With ``path`` (a checkpoint folder, a folder of checkpoints, or a remote checkpoint URL) resume from that.
        Returns None when there is nothing to resume. A checkpoint that fails verification is skipped with a
        warning and quarantined (moved aside, never deleted; see :mod:`syncckpt.quarantine`). When checkpoints
        exist but none verifies, one warning names each and its reason, and resume raises NoValidCheckpoint
        unless ``start_fresh_if_damaged`` is True (then it returns None). Raises CheckpointNotFound when
        ``path`` holds no valid checkpoint, StateMismatch when a checkpoint does not fit the registered objects,
        and SyncCkptError when ``path`` is older than a valid checkpoint this manager's folder or remote already
        holds (retention would delete the new run's checkpoints as they land; save the new run elsewhere or
        move the newer ones away).
        """
        self._check_usable()
        if not self._objects:
            raise SyncCkptError("register() the model, optimizer, ... before resume()")
        if self._is_main:
            try:
                loaded = (
                    self._load_explicit(str(path)) if path is not None else self._load_newest(start_fresh_if_damaged)
                )
                if path is not None and loaded is not None:
                    self._refuse_older_than_saved(loaded[0], loaded[2])
            except SyncCkptError as e:
                if self._dist is not None:  # the other ranks wait for the choice: tell them it failed
                    self._dist.broadcast_json({"error": f"{type(e).__name__}: {e}"})
                raise
            if self._dist is not None:
                choice = None if loaded is None else {"path": str(loaded[2]), "source": loaded[3]}
                self._dist.broadcast_json({"error": None, "choice": choice})
        else:  # rank 0 chose (and pulled, when remote); every rank loads that same checkpoint
            msg = self._dist.broadcast_json(None)  # type: ignore[union-attr]
            if msg["error"]:
                raise SyncCkptError(f"rank 0 could not resume: {msg['error']}")
            choice = msg["choice"]
            loaded = None
            if choice is not None:
                ckpt = Path(choice["path"])
                manifest, files = local.verify(ckpt)
                loaded = manifest, self._decode(manifest, files, ckpt), ckpt, choice["source"]
        if loaded is None:
            if not self._fresh_beside_damaged:
                where = str(self.directory) + (f" or {self._uploader.url}" if self._uploader else "")
                log.info("No checkpoint found in %s; starting from scratch", where)
            return None
        manifest, decoded, ckpt_path, source = loaded
        self._restore(manifest, decoded, ckpt_path)
        if manifest.kind == "step":  # batch_idx -1: saved without a batch index, the epoch restarts
            epoch, batch_idx = manifest.epoch, manifest.batch_idx
        else:
            epoch, batch_idx = manifest.epoch + 1, -1
        info = ResumeInfo(
            manifest.global_step,
            epoch,
            batch_idx,
            str(ckpt_path),
            dict(manifest.metrics),
            manifest.name,
            manifest.kind,
            source,
        )
        log.info("Resuming from checkpoint: %s", ckpt_path)
        log.info("Resuming from global step %d", manifest.global_step)
        log.info(
            "Checkpoint epoch: %d, batch: %s",
            manifest.epoch,
            manifest.batch_idx if manifest.batch_idx >= 0 else ("none" if manifest.kind == "step" else "end of epoch"),
        )
        if batch_idx >= 0:
            log.info("Resuming mid-epoch from epoch %d", epoch + 1)
        else:
            log.info("Resuming at the start of epoch %d", epoch + 1)
        self._last_saved_step = manifest.global_step
        self._resumed_from = manifest.name if (self.directory / manifest.name).exists() else None
        if self._uploader is not None and source == "local":
            self._uploader.ensure_mirrored(self.directory, manifest)
        return info

    def _load_explicit(self, path: str) -> _Loaded:
        if "://" in path and not path.startswith("file://"):
            manifest, files, ckpt = pull_checkpoint_url(path, self.directory, self._storage_options())
            return manifest, self._decode(manifest, files, ckpt), ckpt, "remote"
        p = Path(path.removeprefix("file://"))
        if (p / "manifest.json").exists():
            try:
                manifest, files = local.verify(p)
            except CheckpointCorrupt as e:
                raise CheckpointNotFound(f"--resume-from {p}: {e}") from None
            return manifest, self._decode(manifest, files, p), p, "local"
        if p.is_dir():  # someone else's folder (a read-only input, an older run): verified, never quarantined
            search = find_resumable(p, decode=self._decode, quarantine_damaged=p.resolve() == self.directory.resolve())
            if search.found is not None:
                f = search.found
                return f.manifest, f.decoded, f.path, f.source
        raise CheckpointNotFound(
            f"{p}: no valid checkpoint there (expected a checkpoint folder with manifest.json "
            "or a folder of checkpoint-* folders)"
        )

    def _refuse_older_than_saved(self, manifest: Manifest, source: Path) -> None:
        """Resuming an explicit checkpoint while this run's folder (or remote) holds newer valid ones would lose the
        new run: retention keeps the highest global steps, so it would delete each new checkpoint as it is
        committed, and a later automatic resume would pick the old run's newest. Refuse before anything is
        restored. Newer ones that fail verification are quarantined instead: they never block going back."""
        where = newer_valid(self.directory, self._uploader.remote if self._uploader else None, manifest)
        if where:
            raise SyncCkptError(
                f"cannot resume from {source} (global step {manifest.global_step}): newer checkpoints of an earlier "
                f"run are kept in {'; '.join(where)}. New checkpoints would be deleted by retention (it keeps the "
                "highest global steps) and a later automatic resume would pick the newer ones. Move or delete "
                "them first, or save this run elsewhere (another checkpoint directory and remote prefix)"
            )

    def _load_newest(self, start_fresh_if_damaged: bool) -> _Loaded | None:
        remote = self._uploader.remote if self._uploader is not None else None
        search = find_resumable(self.directory, remote, decode=self._decode)
        if self._uploader is not None:
            self._uploader.forget_remote_state()  # LATEST or the quarantine index may have changed
        if search.found is not None:
            f = search.found
            return f.manifest, f.decoded, f.path, f.source
        if search.nothing_valid:
            where = str(self.directory) + (f" or {self._uploader.url}" if self._uploader else "")
            report = search.damage_report()
            log.warning("No valid checkpoint in %s: %s", where, report)
            if not start_fresh_if_damaged:
                raise NoValidCheckpoint(
                    f"no valid checkpoint in {where}: every one failed verification ({report}); they are kept "
                    "aside (quarantined). Resume from a good copy with resume(path), or pass "
                    "start_fresh_if_damaged=True to train from scratch beside them",
                    where=where,
                    report=report,
                )
            log.warning("Starting from scratch as asked (start_fresh_if_damaged); the damaged checkpoints stay "
                        "quarantined")
            self._fresh_beside_damaged = True
        return None

    def _load_sharded(self, states: dict[str, Any], path: Path) -> dict[str, Any]:
        """Fill the registered objects' own DTensors (laid out for the current world size) from the checkpoint's
        DCP shards, resharding as DCP does; collective on every rank."""
        if self._dist is None:
            raise StateMismatch(f"{path} holds sharded (DTensor) state: resume it under torch.distributed")
        wanted = _dtensor_keys(states)
        sharded.ensure_optimizer_state(self._objects)
        _, targets = sharded.split_dtensors(collect_state(self._objects))
        missing = sorted(wanted - set(targets))
        if missing:
            raise StateMismatch(
                f"{path}: sharded tensors {missing[:5]} have no DTensor counterpart in the registered "
                "objects (shard the model the same way, e.g. fully_shard, before resume())"
            )
        targets = {k: v for k, v in targets.items() if k in wanted}
        sharded.load_shards(targets, path, process_group=self._dist.step_group)
        return {name: sharded.join_dtensors(state, targets) for name, state in states.items()}

    def _storage_options(self) -> dict[str, Any] | None:
        return self._uploader.storage_options if self._uploader is not None else None

    def _decode(self, manifest: Manifest, files: dict[str, bytes], path: Path) -> _Decoded:
        """Parse a verified checkpoint's files into states, touching no registered object. Raises
        CheckpointCorrupt/UnsafeCheckpoint for content that passed its digests but is not what it claims
        (a hostile writer controls both), so resume can fall back to an older checkpoint."""
        import json

        if STATE_FILE not in files:
            raise CheckpointCorrupt(f"{path}: {STATE_FILE} is missing from the manifest")
        try:
            state = json.loads(files[STATE_FILE])
            structures, trainer = state["objects"], state["trainer"]
            if not isinstance(structures, dict) or not isinstance(trainer, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise CheckpointCorrupt(f"{path}/{STATE_FILE}: not a syncckpt state file") from None
        for rel, data in files.items():  # other ranks' RNG structures (distributed checkpoints)
            if rel.startswith("state-rank") and rel.endswith(".json"):
                try:
                    structures.update(json.loads(data)["objects"])
                except (ValueError, KeyError, TypeError):
                    raise CheckpointCorrupt(f"{path}/{rel}: not a syncckpt state file") from None
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for rel, data in files.items():
            if rel.endswith(".safetensors") and not rel.startswith(DCP_DIR):
                tensors[rel.removesuffix(".safetensors")] = load_safetensors_bytes(data, where=f"{path}/{rel}")
        try:
            states = {
                name: unflatten_state(s, tensors.get(name, {}), where=f"{path}: {name}")
                for name, s in structures.items()
            }
        except StateMismatch as e:  # the structure names a tensor no file holds
            raise CheckpointCorrupt(str(e)) from None
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise CheckpointCorrupt(f"{path}/{STATE_FILE}: malformed state structure ({e})") from None
        return _Decoded(states, trainer, any(rel.startswith(DCP_DIR) for rel in files))

    def _restore(self, manifest: Manifest, decoded: _Decoded, path: Path) -> None:
        """Load decoded states into the registered objects (after checking they fit), then the RNG streams."""
        states, trainer = decoded.states, decoded.trainer
        rank = self._dist.rank if self._dist is not None else 0
        if decoded.sharded:
            states = self._load_sharded(states, path)
        missing = [n for n in self._objects if n not in states]
        if missing:
            raise StateMismatch(
                f"{path}: holds no state for {missing} (it has {sorted(set(states) - {'rng'})}); "
                "register the same objects as the run that saved it"
            )
        extra = sorted(n for n in set(states) - set(self._objects) - {"rng"} if not n.startswith("rng-rank"))
        if extra:
            log.warning("%s: state for %s is not restored (not registered)", path, extra)
        for name, obj in self._objects.items():
            if isinstance(obj, torch.nn.Module):
                _check_module_fits(name, obj, states[name], path)
        for name, obj in self._objects.items():
            try:
                obj.load_state_dict(states[name])
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise StateMismatch(f"{path}: cannot load {name!r}: {e}") from None
        rng_state = states.get("rng" if rank == 0 else f"rng-rank{rank}")
        if rng_state is None and rank:
            log.warning(
                "%s holds no RNG state for rank %d (saved with world size %d); this rank's random streams "
                "are not restored",
                path,
                rank,
                manifest.world_size,
            )
        if rng_state is not None:
            rng.restore(rng_state)
            if manifest.kind == "step" and manifest.batch_idx >= 0:
                # DataLoader draws its worker seed from the global RNG when the resumed pass starts; the
                # uninterrupted run had no such draw at this point, so re-apply the state after it.
                for obj in self._objects.values():
                    if isinstance(obj, ResumableSampler):
                        obj._run_at_resumed_iter(lambda s=rng_state: rng.restore(s))
        best = trainer.get("best_metric")
        if isinstance(best, (int, float)):
            self._best = float(best)


def _dtensor_keys(state: Any) -> set[str]:
    if isinstance(state, dict):
        if len(state) == 1 and sharded.DTENSOR_MARKER in state:
            return {state[sharded.DTENSOR_MARKER]}
        return set().union(*(_dtensor_keys(v) for v in state.values())) if state else set()
    if isinstance(state, (list, tuple)):
        return set().union(*(_dtensor_keys(v) for v in state)) if state else set()
    return set()


def _check_module_fits(name: str, module: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """Compare keys and shapes before touching the model, so a checkpoint of another model changes nothing."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}{'...' if len(shapes) > 3 else ''}")
        raise StateMismatch(f"{path} was saved from a different {name}: " + "; ".join(parts))


def _state_json(structure: dict[str, Any], trainer: dict[str, Any]) -> bytes:
    import json

    return json.dumps({"objects": structure, "trainer": trainer}, allow_nan=False).encode()


_VERSIONS: dict[str, str] = {}


def _versions() -> dict[str, str]:
    if not _VERSIONS:
        import platform

        import safetensors

        from . import __version__

        _VERSIONS.update(
            syncckpt=__version__,
            torch=torch.__version__,
            safetensors=safetensors.__version__,
            python=platform.python_version(),
        )
    return dict(_VERSIONS)
