"""Mirror a ``transformers.Trainer``'s ``checkpoint-N`` folders to a remote, and resume from there in a new session.

The Trainer keeps writing its own checkpoints (model, optimizer, scheduler, RNG, ``trainer_state.json``) exactly as
it always does; :class:`SyncCheckpointCallback` hashes each finished folder into a SHA-256 ``manifest.json`` and
mirrors it in the background (same manifest and ``LATEST`` protocol as :class:`syncckpt.CheckpointManager`), and
:func:`resume_checkpoint` brings the newest verified one back into an empty ``output_dir`` after the machine is gone.

Example (a Kaggle or Colab session that may be cut off at any time)::

    from transformers import Trainer, TrainingArguments
    from syncckpt.integrations.transformers import SyncCheckpointCallback, resume_checkpoint

    REMOTE = "s3://my-bucket/runs/nli-1"          # or gs://..., hf://user/repo, a mounted Drive folder
    args = TrainingArguments("out", save_strategy="steps", save_steps=500, save_total_limit=2)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                      callbacks=[SyncCheckpointCallback(REMOTE, takeover=True)])

    # In every session, the first one included: None on the first run, then the newest verified checkpoint
    # (a local one when it is at least as new as the remote's, otherwise pulled and verified).
    path = resume_checkpoint(REMOTE, args.output_dir)
    trainer.train(resume_from_checkpoint=path)

Each mirrored checkpoint also gets its ``manifest.json`` locally, so :func:`resume_checkpoint` trusts a local
folder only when every file matches: a folder the Trainer was still writing when the session died (the Trainer
does not write atomically) is never resumed from. The Trainer ignores the extra file.

SIGTERM (a preemption, ``scancel``, a Kaggle/Colab shutdown) and Ctrl-C are handled by the shared
:class:`syncckpt.lifecycle.Lifecycle`: at the next optimizer step the callback asks the Trainer for a checkpoint
(``control.should_save``), mirrors it within the grace period and exits with status 143 (Ctrl-C: raises
KeyboardInterrupt there instead, so a notebook kernel lives on).

Mid-epoch resume without the Trainer's own skip: with ``ignore_data_skip=True`` and the sampler from
:meth:`SyncCheckpointCallback.train_sampler`, the resumed epoch starts at the saved position by index arithmetic
(see :class:`syncckpt.ResumableSampler`), bit-identical to an uninterrupted run.

What this does not guarantee: a checkpoint saved right before the machine vanishes is remote only once the
upload finished (``on_train_end`` waits for it, ``callback.wait()`` does so on demand). The plain Trainer's own
files are ``torch.save`` pickles (optimizer, scheduler, RNG) that it loads with ``torch.load(weights_only=True)``;
syncckpt opens none of them to find, verify or pull a checkpoint. Train with :class:`PicklefreeTrainer` (or mix
:class:`PicklefreeCheckpoints` into your own subclass) and no checkpoint file is a pickle, nor is one ever loaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .. import local
from ..deadline import resolve_deadline, session_start
from ..distributed import Dist
from ..env import detect_platform
from ..errors import SyncCkptError
from ..lifecycle import Lifecycle, check_grace_period
from ..manifest import MANIFEST_NAME, FileEntry, json_safe_metrics
from ..retention import Ref
from ..sampler import ResumableSampler
from ..writer import check_settings
from ._trainer_checkpoints import place_manifest, plan_rotation, resume_checkpoint
from ._trainer_files import PicklefreeCheckpoints, PicklefreeTrainer
from ._trainer_skip import ResumedPass, TrainerSampler, arm_sampler, sampler_for

log = logging.getLogger("syncckpt")

__all__ = ["PicklefreeCheckpoints", "PicklefreeTrainer", "SyncCheckpointCallback", "plan_rotation", "resume_checkpoint"]

#: Hidden folder in ``output_dir`` holding hard-linked copies of checkpoints while they are hashed and uploaded.
STAGE_DIR = ".syncckpt-upload"


class SyncCheckpointCallback(TrainerCallback):
    """A ``TrainerCallback`` that mirrors every ``checkpoint-N`` the Trainer saves to ``remote``.

    On the main process only (``state.is_world_process_zero``; other ranks never touch the remote), each
    ``on_save`` hard-links the finished folder into a hidden staging folder (instant, so the Trainer's rotation may
    delete the original at any time), then a background thread hashes it into ``manifest.json`` and hands it to the
    uploader: training does not wait for hashing or the network. Remote retention mirrors the Trainer's rotation
    (see :func:`plan_rotation`); ``on_train_end`` waits up to ``flush_timeout`` seconds for the uploads.

    After SIGTERM (or a first Ctrl-C) the next optimizer step ends with a Trainer checkpoint (``control.should_save``)
    that is mirrored within ``grace_period`` seconds of the signal; then the process exits with status 143 (Ctrl-C:
    KeyboardInterrupt is raised from ``trainer.train()``). A step that does not end within half the grace period
    (a long evaluation) is not waited for: what is saved is flushed and the process exits with 143 anyway. Under
    torch.distributed every rank handles the signals and the ranks agree at each step end, so all of them save at
    the same step.

    Args:
        remote: run URL (``s3://``, ``gs://``, ``hf://``, ``file://``, a local or mounted path, any fsspec URL).
        storage_options: passed to the remote backend (credentials, ``endpoint_url``, ...); never logged.
        on_upload_error: ``"warn"`` (training never stops because of the network) or ``"raise"`` (the next
            Trainer step raises :class:`syncckpt.errors.RemoteError`).
        takeover: take over the remote run even though another session's lease looks alive. A session killed a
            moment ago keeps its lease until the lease TTL passes; pass True when you know it is gone.
        keep_last: ``checkpoint-N`` folders kept on the remote; default ``args.save_total_limit`` (None keeps all).
        flush_timeout: seconds ``on_train_end`` (and interpreter exit) waits for pending uploads.
        remote_options: extra keyword arguments for the remote backend (e.g. ``min_commit_interval`` for hf://).
        handle_sigterm: on SIGTERM, save and mirror a last checkpoint at the next step, then exit with status 143.
        handle_interrupt: the same on Ctrl-C, then KeyboardInterrupt; a second Ctrl-C stops at once. Only
            replaces Python's default SIGINT handler.
        grace_period: seconds from the signal to the exit, saving and mirroring included.
        deadline: when the session ends, as for :class:`syncckpt.CheckpointManager` (``"auto"``: Kaggle's and
            Colab's limits from the session start; a duration, a datetime, or ``"off"``): shortly before it the
            Trainer saves a last checkpoint, it is mirrored, and the run exits with status 143, as on SIGTERM.
            Until a mirror has been timed, a save is assumed to take 5 minutes (plus the 2-minute margin).

    >>> cb = SyncCheckpointCallback("memory://doc-callback/run", keep_last=2)
    >>> cb.status()
    {'remote': 'memory://doc-callback/run', 'started': False}
    """

    def __init__(
        self,
        remote: str,
        storage_options: dict[str, Any] | None = None,
        on_upload_error: str = "warn",
        takeover: bool = False,
        keep_last: int | None = None,
        *,
        flush_timeout: float = 600.0,
        remote_options: dict[str, Any] | None = None,
        handle_sigterm: bool = True,
        handle_interrupt: bool = True,
        grace_period: float = 60.0,
        deadline: Any = "auto",
    ) -> None:
        check_settings(1, 0, on_upload_error, 0, "all", True)
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.remote = remote
        self.storage_options = storage_options
        self.on_upload_error = on_upload_error
        self.takeover = takeover
        self.keep_last = keep_last
        self.flush_timeout = flush_timeout
        self.remote_options = dict(remote_options or {})
        self.handle_sigterm = handle_sigterm
        self.handle_interrupt = handle_interrupt
        self.grace_period = check_grace_period(grace_period)
        self.deadline = deadline
        self._uploader: Any = None
        self._hasher: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()
        self._seq = 0
        self._stage_root: Path | None = None
        self._rotation_limit: int | None = None
        self._best_name: str | None = None
        self._error: str | None = None
        self._pid = os.getpid()
        self._life: Lifecycle | None = None  # signals and the interpreter-exit flush, as the manager's
        self._dist: Dist | None = None
        self._stop: list[bool] | None = None  # (SIGTERM, Ctrl-C) every rank agreed on: the save now ends the run
        self._sampler: TrainerSampler | None = None
        self._resumed: ResumedPass | None = None
        self._step_ended = time.monotonic()  # the Trainer saves between on_step_end and on_save
        self._saved_at: dict[str, float] = {}  # checkpoint -> when its save began (mirrored: how long it took)
        self._last_durable: float | None = None  # seconds from the last save to mirrored (the deadline reads it)

    # ---- Trainer events ---------------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._sampler is not None and args.ignore_data_skip:
            self._resumed = arm_sampler(self._sampler, args, state, len(kwargs["train_dataloader"]))
        elif args.ignore_data_skip and state.global_step > 0:
            log.warning(
                "ignore_data_skip=True without SyncCheckpointCallback.train_sampler(): the resumed epoch starts again "
                "from its first batch (the Trainer skips nothing)"
            )
        if self._dist is None and (self.handle_sigterm or self.handle_interrupt or self.deadline not in (None, "off")):
            self._dist = Dist.detect()  # collective: every rank is here
        if state.is_world_process_zero:
            self._start(args)  # opens the remote and takes its lease now, so a LeaseHeld surfaces before step 1
        elif self._life is None:  # the other ranks only take part in the last save
            self._life = self._lifecycle(flush=lambda timeout: True, mirrored=False, on_exit=lambda: None)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._step_ended = time.monotonic()
        if self._resumed is not None:
            self._resumed = self._resumed.fix_epoch(state)
        if state.is_world_process_zero and self._uploader is not None:
            self._raise_if_failed()
        if self._dist is not None and self._life is not None:
            ending = self._life.requested or self._life.deadline_due(state.global_step, self._last_durable)
            stop = self._dist.agree(ending, self._life.interrupted)  # every rank stops at one step
            if any(stop):
                control.should_save = True  # the Trainer saves right after this event; on_save then ends the run
                self._stop = stop

    @property
    def terminating(self) -> bool:
        """SIGTERM arrived in this process: the run ends with a checkpoint at the next step.

        >>> SyncCheckpointCallback("memory://doc-terminating/run").terminating
        False
        """
        return self._life is not None and self._life.requested

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Called after the Trainer finished writing (and rotating) ``output_dir/checkpoint-{global_step}``."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero:
            self._mirror(args, state, folder)
        if self._stop is not None and self._life is not None:
            (terminating, interrupted), self._stop = self._stop, None
            # flush, then exit 143 (or raise KeyboardInterrupt)
            self._life.at_boundary(lambda: None, lambda: folder.name, terminating=terminating, interrupted=interrupted)

    def _mirror(self, args: TrainingArguments, state: TrainerState, folder: Path) -> None:
        self._start(args)
        self._raise_if_failed()
        if not folder.is_dir():
            log.warning(
                "on_save: %s does not exist; nothing to mirror (hyperparameter search runs are not mirrored)", folder
            )
            return
        best = state.best_model_checkpoint
        with self._lock:
            self._saved_at[folder.name] = self._step_ended
            self._best_name = os.path.basename(os.path.normpath(best)) if best else None
            self._seq += 1
            seq = self._seq
        assert self._stage_root is not None
        stage = self._stage_root / folder.name
        shutil.rmtree(stage, ignore_errors=True)
        rels = [
            p.relative_to(folder).as_posix()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        ]
        local.link_files(folder, stage, [FileEntry(r, 0, "") for r in rels])
        last_log = state.log_history[-1] if state.log_history else {}
        metrics = json_safe_metrics({k: v for k, v in last_log.items() if isinstance(v, (int, float))})
        extra = {
            "source": "transformers.Trainer",
            "best_model_checkpoint": self._best_name,
            "best_metric": state.best_metric,
        }
        job = self._hasher.submit(
            self._hash_and_submit,
            seq,
            folder,
            stage,  # type: ignore[union-attr]
            state.global_step,
            int(state.epoch or 0),
            metrics,
            extra,
        )
        with self._lock:
            self._futures = [f for f in self._futures if not f.done()] + [job]

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero and self._life is not None:
            self._life.close()
            self._life = None
        if not state.is_world_process_zero or self._uploader is None:
            return
        t0 = time.monotonic()
        done = self.wait(self.flush_timeout)
        if done:
            log.info("All checkpoints mirrored to %s (waited %.1fs)", self._uploader.url, time.monotonic() - t0)
        else:
            log.warning(
                "Training ended with uploads to %s still pending after %.0fs: %s",
                self._uploader.url,
                self.flush_timeout,
                self._uploader.status()["pending"],
            )
        self.close(remove_staging=done)

    # ---- public helpers ---------------------------------------------------------------------------------------
    def train_sampler(self, dataset: Any, args: TrainingArguments) -> ResumableSampler:
        """The training sampler that resumes mid-epoch by index arithmetic: return it from the Trainer's
        ``_get_train_sampler`` and set ``ignore_data_skip=True``; without that flag the Trainer's own skip runs.

        A seeded shuffle (``args.data_seed``, else ``args.seed``); single process only. The callback positions
        it when a resumed run begins: the skipped batches are never drawn, no sample of them is read.

        >>> from transformers import TrainingArguments
        >>> cb = SyncCheckpointCallback("memory://doc-sampler/run")
        >>> s = cb.train_sampler(range(10), TrainingArguments("out", per_device_train_batch_size=2, report_to=[]))
        >>> s.batch_size, len(s)
        (2, 10)
        """
        self._sampler = sampler_for(dataset, args)
        return self._sampler

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every saved checkpoint is hashed and mirrored. True when everything is done in time."""
        if self._uploader is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            futures = list(self._futures)
        _, pending = wait_futures(futures, timeout=timeout)
        if pending:
            return False
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return bool(self._uploader.wait(remaining))

    def status(self) -> dict[str, Any]:
        """What is mirrored, pending or failed (the uploader's status plus hashing errors)."""
        if self._uploader is None:
            return {"remote": self.remote, "started": False}
        with self._lock:
            hashing = sum(not f.done() for f in self._futures)
        return {"started": True, **self._uploader.status(), "hashing": hashing, "hash_error": self._error}

    def close(self, timeout: float = 0.0, remove_staging: bool = False) -> None:
        """Stop the background threads after waiting up to ``timeout`` seconds for uploads; safe to call twice.

        A later ``trainer.train()`` with the same callback starts them again."""
        if self._uploader is None or os.getpid() != self._pid:
            return
        uploader, self._uploader = self._uploader, None
        try:
            if self._hasher is not None:
                self._hasher.shutdown(wait=True)
            uploader.close(timeout)
        finally:
            self._hasher = None
            if self._life is not None:
                self._life.close()
            if remove_staging and self._stage_root is not None:
                shutil.rmtree(self._stage_root, ignore_errors=True)

    # ---- internals --------------------------------------------------------------------------------------------
    def _start(self, args: TrainingArguments) -> None:
        if self._uploader is not None:
            return
        from ..uploader import Uploader

        limit = self.keep_last if self.keep_last is not None else args.save_total_limit
        self._rotation_limit = limit if limit and limit > 0 else None
        self._stage_root = Path(args.output_dir) / STAGE_DIR
        shutil.rmtree(self._stage_root, ignore_errors=True)  # leftovers of a session that died mid-upload
        self._stage_root.mkdir(parents=True, exist_ok=True)
        self._error = None
        self._uploader = Uploader(
            self.remote,
            storage_options=self.storage_options,
            on_error=self.on_upload_error,
            takeover=self.takeover,
            retention=self._retention if self._rotation_limit else None,
            remote_options=self.remote_options,
            on_mirrored=self._mirrored,
        )
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncckpt-hash")
        self._pid = os.getpid()
        self._life = self._lifecycle(
            flush=self.wait, mirrored=True, on_exit=self.close, exit_timeout=self.flush_timeout, status=self.status
        )
        log.info(
            "Mirroring Trainer checkpoints from %s to %s (remote keeps %s)",
            args.output_dir,
            self._uploader.url,
            self._rotation_limit or "all",
        )

    def _lifecycle(self, **kwargs: Any) -> Lifecycle:
        platform = detect_platform()
        return Lifecycle(
            deadline=resolve_deadline(self.deadline, platform, session_start(platform)),
            grace_period=self.grace_period,
            handle_sigterm=self.handle_sigterm,
            handle_interrupt=self.handle_interrupt,
            **kwargs,
        )

    def _mirrored(self, manifest: Any, on_remote: list[str]) -> None:
        """The uploader's thread: ``manifest`` is in the store; how long it took from the save is the deadline's."""
        with self._lock:
            started = self._saved_at.pop(manifest.name, None)
        if started is not None:
            self._last_durable = time.monotonic() - started

    def _hash_and_submit(
        self,
        seq: int,
        folder: Path,
        stage: Path,
        global_step: int,
        epoch: int,
        metrics: dict[str, Any],
        extra: dict[str, Any],
    ) -> None:
        """Hashing thread: manifest for the staged copy, hand-off to the uploader, manifest next to the original."""
        try:
            with self._lock:
                superseded = seq != self._seq
            if superseded:  # hashing fell behind the save interval: only the newest checkpoint is worth uploading
                log.info("Upload of %s skipped: a newer checkpoint was saved before it was hashed", stage.name)
                return
            manifest = local.manifest_for_folder(
                stage, kind="step", global_step=global_step, epoch=epoch, metrics=metrics, extra=extra
            )
            self._uploader.submit(self._stage_root, manifest)
            place_manifest(folder, (stage / MANIFEST_NAME).read_bytes())
        except Exception as e:  # noqa: BLE001 - a failed hash or hand-off must never take training down
            self._error = f"{stage.name}: {e}"
            log.warning("Checkpoint %s was NOT mirrored: %s (training continues)", stage.name, e)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _retention(self, refs: list[Ref]) -> list[str]:
        with self._lock:
            best = self._best_name
        return plan_rotation(refs, self._rotation_limit, best)

    def _raise_if_failed(self) -> None:
        if self.on_upload_error != "raise":
            return
        self._uploader.raise_if_failed()
        if self._error is not None:
            err, self._error = self._error, None
            raise SyncCkptError(f"mirroring to {self.remote} failed: {err}")
