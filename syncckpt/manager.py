"""CheckpointManager: the façade a training loop talks to, wiring the steps of the data path together.

The parts live in their own modules: when to save (:mod:`~syncckpt.schedule`), writing and committing
(:mod:`~syncckpt.writer`), mirroring (:mod:`~syncckpt.uploader`), what to resume from and restoring it
(:mod:`~syncckpt.resume`, :mod:`~syncckpt.restore`), and SIGTERM/exit handling (:mod:`~syncckpt.lifecycle`). The
training loop only ever waits for the in-memory snapshot.

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

import os
import time
from functools import partial
from pathlib import Path
from typing import Any

from . import local
from .assembly import SETTINGS, assemble
from .env import default_checkpoint_dir, default_inputs
from .errors import SyncCkptError
from .manifest import Kind
from .nodes import resume_nodes
from .restore import ResumeInfo, resume_run
from .schedule import BestMetric, SaveSchedule
from .snapshot import check_object_name
from .status import combined_status, status_line, wait_all

__all__ = ["CheckpointManager", "ResumeInfo"]


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
            ``grace_period`` seconds, then exit with status 143. If the loop does not come back to :meth:`step`
            within half the grace period, the live state is saved as of the last step boundary (single process).
        signals: the signals handled so (default: SIGTERM, plus SIGUSR1 under SLURM).
        requeue: under SLURM, ``scontrol requeue`` the job after that last checkpoint is mirrored.
        save_on_sigterm: take that last checkpoint (otherwise only flush what is committed).
        grace_period: seconds a SIGTERM, Ctrl-C or interpreter exit may spend flushing.
        handle_interrupt: on Ctrl-C (SIGINT: a terminal, the notebook's stop button), save a last checkpoint at
            the next :meth:`step`, flush it, then raise KeyboardInterrupt there; a second Ctrl-C stops at once.
            Only replaces Python's default SIGINT handler.
        remote_options: extra keyword arguments for the remote backend (e.g. ``min_commit_interval`` for hf://).
        incremental: mirror tensors as content-addressed blobs so unchanged ones (a frozen backbone, LoRA base
            weights) are not uploaded again (fsspec remotes; on the Hub, Xet deduplicates by itself).
        background_nice: nice value (0..19) of the writer and uploader threads and the threads they start
            (Linux). The default 19 lets them run in the CPU time training leaves idle; under full CPU load a
            save then takes longer to commit. 0 runs them at the training loop's priority.
        keep_local: with a remote, the local copies kept once mirrored and verified there: ``"all"`` that
            retention keeps (default), ``"newest"`` or ``"none"`` (resume then pulls from the remote).
        deadline: when the session ends (see :mod:`syncckpt.deadline`): ``"auto"`` (Kaggle's and Colab's limits
            from the session start), a duration from the session start (``"11h30m"``), a datetime, or ``"off"``.
            A checkpoint is taken and mirrored before it, leaving the time the last save took plus a margin.
        read_only_inputs: folders of checkpoints :meth:`resume` also considers, verified and loaded in place and
            never written to (default: on Kaggle, the runs attached under ``/kaggle/input``; elsewhere none).
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
        handle_interrupt: bool = True,
        remote_options: dict[str, Any] | None = None,
        incremental: bool = False,
        background_nice: int = 19,
        read_only_inputs: list[str | os.PathLike[str]] | None = None,
        keep_local: str = "all",
        deadline: Any = "auto",
        signals: list[int] | None = None,
        requeue: bool = True,
    ) -> None:
        schedule = SaveSchedule(save_every_n_steps, save_every_n_minutes, save_every_n_epochs, metric_for_best, mode)
        self.directory = Path(directory) if directory is not None else default_checkpoint_dir()
        self.schedule = schedule
        self._objects: dict[str, Any] = {}
        self._pid = os.getpid()
        self._closed = False
        self._best = BestMetric(schedule)
        self._last_save_time = time.monotonic()  # the clock is read here; the schedule only compares
        self._at: tuple[int, int, int | None] | None = None  # (global_step, epoch, batch_idx) of the last step()
        self._inputs = None if read_only_inputs is None else [Path(p) for p in read_only_inputs]
        self._storage_options = storage_options  # resume's too: a URL without a remote, a rank not uploading
        settings = {k: v for k, v in locals().items() if k in SETTINGS}  # the arguments the parts take, by name
        parts = assemble(
            self.directory, self._best, flush=self.wait, on_exit=partial(self.close, timeout=0), status=self.status,
            on_stalled=self._save_stalled, **settings,
        )  # fmt: skip
        self._dist, self._platform, self._uploader = parts.dist, parts.platform, parts.uploader
        self._writer, self._life = parts.writer, parts.life
        self._arena = self._writer.arena

    # ---- registration -----------------------------------------------------------------------------------------
    def register(self, **objects: Any) -> None:
        """Register objects to checkpoint under the given names: anything with ``state_dict``/``load_state_dict``
        (model, optimizer, scheduler, GradScaler, :class:`ResumableSampler`, your own objects). An object may
        also take part in resume through the hooks described in :mod:`syncckpt.restore`."""
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
        self._at = (global_step, epoch, batch_idx)
        since = time.monotonic() - self._last_save_time
        # every rank must take the same decision at the same step
        life = self._life
        ending = life.requested or life.deadline_due(global_step, self._writer.last_durable)
        terminating, interrupted, timed = self._dist.agree(ending, life.interrupted, self.schedule.minutes_due(since))
        final = partial(self._final_save, "step", global_step, epoch, batch_idx, metrics)
        last = lambda: self._writer.last_committed  # noqa: E731
        life.at_boundary(final, last, terminating=terminating, interrupted=interrupted)
        if self._uploader is not None:
            self._uploader.raise_if_failed()
        if not self.schedule.step_due(global_step, since, self._writer.last_saved_step, timed=timed):
            self._writer.prefault(self._objects)
            return False
        # If the previous checkpoint is still being written from the staging buffers, this waits for it: memory
        # stays bounded to one set of buffers, and with saves minutes apart this never blocks in practice.
        self._start(["step"], global_step, epoch, batch_idx, metrics)
        return True

    def save(
        self, global_step: int, *, epoch: int = 0, batch_idx: int | None = None, metrics: dict[str, Any] | None = None
    ) -> None:
        """Take a step checkpoint now (waits only for a previous save still reading the staging buffers)."""
        self._check_usable()
        self._start(["step"], global_step, epoch, batch_idx, metrics)

    def save_epoch(self, epoch: int, *, global_step: int, metrics: dict[str, Any] | None = None) -> bool:
        """Call at the end of every epoch: writes ``checkpoint-epoch-E`` (every ``save_every_n_epochs``) and
        replaces ``best_model`` when ``metrics[metric_for_best]`` improved. Returns whether anything was saved."""
        self._check_usable()
        final = partial(self._final_save, "epoch", global_step, epoch, -1, metrics)
        self._life.at_boundary(final, lambda: self._writer.last_committed)
        kinds = self.schedule.epoch_kinds(epoch, self._best.consider(metrics))
        kinds = self._dist.broadcast_json(kinds)  # rank 0's metrics decide, so every rank takes part
        if not kinds:
            return False
        self._start(kinds, global_step, epoch, -1, metrics)
        return True

    def _start(self, kinds: list[Kind], global_step: int, epoch: int, batch_idx: int | None, metrics: Any) -> None:
        self._writer.start(self._objects, kinds, global_step, epoch=epoch, batch_idx=batch_idx, metrics=metrics)
        self._last_save_time = time.monotonic()

    def _save_stalled(self) -> str | None:
        """SIGTERM's watchdog, when the loop is away from step() (validation, a stalled DataLoader): the weights
        and optimizer have not changed since the last step() (they change in optimizer.step(), right before it)."""
        if self._at is None or self._at[0] == self._writer.last_saved_step:
            return None
        step, epoch, batch_idx = self._at
        self._final_save("step", step, epoch, batch_idx, None)
        return (
            f"saved checkpoint-step-{step} from the live state at the last step() (epoch {epoch}, batch "
            f"{batch_idx}; its RNG streams as at the signal, so a resume from it is exact but for them)"
        )

    def _final_save(self, kind: Kind, global_step: int, epoch: int, batch_idx: int | None, metrics: Any) -> None:
        if self._objects and global_step != self._writer.last_saved_step:
            self._start([kind], global_step, epoch, -1 if batch_idx is None else batch_idx, metrics)

    # ---- waiting, status, shutdown ------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until every started save is committed (and mirrored, with a remote). True when all done."""
        return wait_all(self._writer, self._uploader, timeout)

    def status(self) -> dict[str, Any]:
        """What is committed locally, what is mirrored, what is pending, and the last errors. With a remote,
        ``mirrored`` lists this session's uploads still on the remote (retention has not deleted them since) and
        ``mirrored_history`` every upload of this session, in order."""
        return combined_status(self._writer, self._uploader)

    def status_line(self) -> str:
        """:meth:`status` in one line for a notebook cell: last committed, last mirrored, what is uploading (and
        how many bytes), errors, and when the next save falls due (see :mod:`syncckpt.status`)."""
        since = time.monotonic() - self._last_save_time
        return status_line(self.status(), self.schedule.next_due(self._writer.last_saved_step, since))

    def list_local(self) -> list[str]:
        """Names of the committed local checkpoints."""
        return [c.name for c in local.list_checkpoints(self.directory)]

    def close(self, timeout: float | None = None) -> None:
        """Wait for pending saves and uploads, then stop background work. Safe to call twice."""
        if self._closed or os.getpid() != self._pid:
            return
        try:
            self._writer.wait(timeout)  # local saves; uploads are flushed by the uploader's close
        finally:
            self._closed = True
            self._writer.close()
            if self._uploader is not None:
                self._uploader.close(timeout)
            self._life.close()
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

    # ---- resume -------------------------------------------------------------------------------------------------
    def resume(
        self, path: str | os.PathLike[str] | None = None, *, start_fresh_if_damaged: bool = False
    ) -> ResumeInfo | None:
        """Restore every registered object from the newest valid checkpoint (local, read-only input or remote), in
        place, or from ``path`` (a checkpoint folder, a folder of them, a remote checkpoint URL). None when there
        is nothing to resume. A checkpoint that fails verification is skipped with a warning and quarantined
        (:mod:`syncckpt.quarantine`); when none verifies, resume raises NoValidCheckpoint unless
        ``start_fresh_if_damaged``. CheckpointNotFound: ``path`` holds no valid checkpoint; StateMismatch: it does
        not fit the registered objects; SyncCkptError: ``path`` is older than a valid checkpoint this folder or
        remote holds (retention would delete the new run's checkpoints as they land)."""
        self._check_usable()
        if not self._objects:
            raise SyncCkptError("register() the model, optimizer, ... before resume()")
        up = self._uploader
        done = (resume_nodes if self._dist.node_local else resume_run)(
            self._objects,
            self.directory,
            self._dist,
            up.remote if up is not None else None,
            self._storage_options,
            None if path is None else str(path),
            start_fresh_if_damaged,
            default_inputs(self._platform) if self._inputs is None else self._inputs,
        )
        if up is not None:
            up.resumed(self.directory, done.manifest, done.info.source if done.info is not None else None)
        if done.info is None or done.manifest is None:
            return None
        self._writer.resumed(done.manifest, done.best_metric)
        return done.info
