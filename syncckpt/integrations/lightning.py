"""Lightning checkpoints in syncckpt's format: pickle-free, verified, mirrored, resumable from a bucket, exact.

``SyncCkptIO`` is a ``CheckpointIO`` plugin. Lightning keeps deciding *when* to save and *what to keep* (its
``ModelCheckpoint``); the plugin turns each ``trainer.save_checkpoint(path)`` into a syncckpt checkpoint
``checkpoint-step-N`` next to ``path`` (safetensors for tensors, JSON for the rest, SHA-256 manifest, atomic commit,
written in the background by the core's :class:`~syncckpt.writer.Writer`) and mirrors it with the core's
:class:`~syncckpt.uploader.Uploader`. ``path`` itself becomes a small JSON *pointer* naming that checkpoint, so
Lightning's own bookkeeping (file names, version counters, ``save_top_k`` rotation, ``ckpt_path="best"``) works
unchanged; ``remove_checkpoint`` (the rotation) deletes the checkpoint locally and, after the next commit, remotely.

Its companion callback, ``plugin.callback``, gives the plugin what a ``CheckpointIO`` never sees: the trainer (the
data loaders' :class:`~syncckpt.ResumableSampler`, the loop position), SIGTERM at an optimizer-step boundary
(the shared :class:`~syncckpt.lifecycle.Lifecycle`), and ``ckpt_path="last"`` in a fresh session: Lightning asks
each on-exception checkpoint callback for its ``ckpt_path`` when it resolves ``"last"``, and this one answers
when the remote (or the local folder) holds checkpoints. Because Lightning then treats the callback as an
on-exception checkpoint, ``fit()`` *without* ``ckpt_path`` also resumes the newest valid checkpoint, as
``"last"`` does (and Lightning prints its "ckpt_path=None ... the last model ... will be used" warning).

``trainer.fit(ckpt_path=...)`` accepts ``"last"`` or the remote run URL (the newest *valid* checkpoint, local or
remote, chosen by :func:`syncckpt.resume.find_resumable`: a damaged one is skipped with a warning naming the file
and quarantined), a remote checkpoint URL (``s3://b/run/checkpoint-step-40``), a pointer file, or a checkpoint
folder. A ``.ckpt`` pickle written by Lightning's default ``TorchCheckpointIO`` is refused: nothing is unpickled.

Mid-epoch resume is exact when the training data comes through :class:`~syncckpt.ResumableSampler` (the epoch
being resumed starts after the last trained batch by slicing its index list: no skipped sample is loaded, O(1))
and the DataLoader has ``num_workers=0`` (with workers, Lightning starts iterating the sampler before any callback
can restore it: the resumed epoch is not exact). A stateful loader (``state_dict``/``load_state_dict``, e.g.
torchdata's ``StatefulDataLoader``) is saved and restored by Lightning's own loop state, stored here as JSON.
The RNG streams (python, numpy, torch) are saved with each checkpoint and re-applied when the resumed pass begins.

Example (runs as a doctest; a notebook cell would use ``remote="s3://bucket/run"`` and a real model)::

>>> import tempfile, torch, lightning as L
>>> from lightning.pytorch.callbacks import ModelCheckpoint
>>> from torch.utils.data import DataLoader, TensorDataset
>>> from syncckpt import ResumableSampler
>>> class Tiny(L.LightningModule):
...     def __init__(self):
...         super().__init__(); self.net = torch.nn.Linear(4, 1)
...     def training_step(self, batch, batch_idx): return self.net(batch[0]).sum()
...     def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.1)
>>> data = TensorDataset(torch.randn(16, 4))
>>> loader = DataLoader(data, batch_size=4, sampler=ResumableSampler(data, batch_size=4, seed=0))
>>> root = tempfile.mkdtemp()
>>> sync = SyncCkptIO(remote=f"file://{root}/bucket/run", handle_sigterm=False)
>>> kw = dict(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
>>> trainer = L.Trainer(default_root_dir=root, plugins=[sync], **kw,
...                     callbacks=[ModelCheckpoint(every_n_train_steps=2), sync.callback])
>>> trainer.fit(Tiny(), loader)
>>> sorted(p.name for p in (Path(root) / "checkpoints").iterdir())
['checkpoint-step-4', 'epoch=0-step=4.ckpt', 'last.syncckpt.ckpt']
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from .. import local
from ..deadline import resolve_deadline, session_start
from ..distributed import Solo
from ..env import detect_platform
from ..errors import ConfigError, StateMismatch
from ..format import DecodedCheckpoint
from ..lifecycle import Lifecycle, check_grace_period
from ..manifest import Manifest, checkpoint_name
from ..restore import restore
from ..schedule import BestMetric, SaveSchedule
from ..status import combined_status, wait_all
from ..writer import Writer, check_settings, clean_directory, open_directory
from . import _lightning_state as state
from ._lightning_resume import NEWEST, Loaded, has_checkpoints, locate, newest_marker, newest_valid
from ._lightning_state import LAST_MARKER, SIGTERM_PREFIX, Part, local_path, write_pointer

log = logging.getLogger("syncckpt")

__all__ = ["SyncCkptCallback", "SyncCkptIO"]


_ONE_PROCESS = (
    "SyncCkptIO runs in one process for now (this job has {n}): every rank would resume, pull and hold the remote "
    "run at once"
)


def _refuse_pickling(obj: Any) -> Any:
    """``__reduce__`` of the plugin and its callback: a strategy that starts processes by pickling the Trainer
    (``ddp_spawn``, ``ddp_notebook`` with spawn) gets the one-process refusal, not "cannot pickle '_thread.lock'"."""
    raise ConfigError(
        _ONE_PROCESS.format(n="several processes: the Trainer is being pickled to start them, as ddp_spawn does")
    )


class SyncCkptIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` writing syncckpt checkpoints and mirroring them to ``remote``.

    Add ``plugins=[io]`` and ``callbacks=[..., io.callback]`` to the ``Trainer`` (the callback is what makes
    mid-epoch resume exact, SIGTERM handled and ``ckpt_path="last"`` work in a fresh session).

    Args:
        remote: run URL mirrored in the background (``s3://``, ``gs://``, ``hf://``, ``file://``, a path), or None.
        storage_options: passed to the remote backend (credentials, ``endpoint_url``, ...); never logged.
        directory: local checkpoint folder; default: the folder Lightning saves into (``ModelCheckpoint.dirpath``).
        on_upload_error: ``"warn"`` (training never stops because of the network) or ``"raise"``.
        takeover: take over a remote run another live session still holds (see :class:`syncckpt.errors.LeaseHeld`).
        handle_sigterm: on SIGTERM, save a last checkpoint at the next optimizer step, mirror it within
            ``grace_period`` seconds and exit with status 143.
        grace_period: seconds a SIGTERM or the interpreter's exit may spend flushing.
        remote_options, background_nice, deadline: as for :class:`syncckpt.CheckpointManager` (``deadline``:
            Kaggle's and Colab's session limits by default; shortly before it a last checkpoint is saved at an
            optimizer step, mirrored, and the run exits with status 143, as on SIGTERM).
    """

    __reduce__ = _refuse_pickling

    def __init__(
        self,
        remote: str | None = None,
        storage_options: dict[str, Any] | None = None,
        *,
        directory: str | os.PathLike[str] | None = None,
        on_upload_error: str = "warn",
        takeover: bool = False,
        handle_sigterm: bool = True,
        grace_period: float = 60.0,
        remote_options: dict[str, Any] | None = None,
        background_nice: int = 19,
        deadline: Any = "auto",
    ) -> None:
        check_settings(1, 0, on_upload_error, background_nice, "all", remote is not None)
        self.remote = remote
        self.storage_options = storage_options
        self.directory = Path(directory) if directory is not None else None
        self.on_upload_error = on_upload_error
        self.takeover = takeover
        self.handle_sigterm = handle_sigterm
        self.grace_period = check_grace_period(grace_period)
        self.remote_options = dict(remote_options or {})
        self.background_nice = background_nice
        self.deadline = deadline
        self.callback = SyncCkptCallback(self)
        self.trainer: Any = None  # set by the callback's setup()
        self._writer: Writer | None = None
        self._uploader: Any = None
        self._life: Lifecycle | None = None
        self._pointers = state.Pointers()
        self._pending: tuple[Manifest, DecodedCheckpoint, Path] | None = None  # restored when training starts
        self._warned_no_callback = False

    # ---- CheckpointIO ---------------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Snapshot ``checkpoint`` (Lightning's dict), write it as ``checkpoint-step-N`` in the background, and
        write the pointer ``path``. Raises StateNotSerializable naming the key path of a value that is neither a
        tensor nor JSON-able (syncckpt never pickles)."""
        target = local_path(path)
        writer = self._open(self.directory or target.parent)
        if target.parent.resolve() != writer.directory.resolve():
            raise ConfigError(f"{path}: SyncCkptIO keeps its checkpoints in {writer.directory}; save there")
        step = int(checkpoint.get("global_step", 0))
        name = checkpoint_name("step", step)
        epoch, batch_idx = state.position(checkpoint)
        if writer.last_saved_step == step and state.mid_accumulation(self.trainer, checkpoint, batch_idx):
            # After a resume ModelCheckpoint saves the resumed step again at the next micro-batch (it does not
            # restore which step it saved last): that state holds half an accumulation window, which a
            # checkpoint cannot hold. The checkpoint of this step, taken at its optimizer step, stands for it.
            orphans = [self._pointers.repoint(target.name, name)]
            write_pointer(target, name, step)
            self._delete_local(orphans)
            return
        change = self._pointers.saving(target.name, name)
        objects: dict[str, Any] = {**state.split(checkpoint, change.aliases), **self._data_objects()}
        try:
            writer.start(objects, ["step"], step, epoch=epoch, batch_idx=batch_idx, metrics=state.metrics(self.trainer))
        except BaseException:
            self._pointers.undo(change)
            raise
        write_pointer(target, name, step)
        for alias in change.stale:
            (writer.directory / alias).unlink(missing_ok=True)
        self._delete_local(change.orphans)
        if not (writer.directory / LAST_MARKER).exists():
            write_pointer(writer.directory / LAST_MARKER, "newest")

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        """Verify (and pull, when remote) the checkpoint ``path`` names and return Lightning's dict, unpickled
        from nothing: tensors from safetensors, the rest from JSON."""
        manifest, decoded, ckpt, source = self._find(str(path))
        states = decoded.states
        if not state.is_lightning(states):
            raise StateMismatch(
                f"{ckpt}: not a Lightning checkpoint (no 'lightning'/'model' state); resume it with "
                "CheckpointManager.resume()"
            )
        if self.trainer is None or self.trainer.state.fn == "fit":  # not for validate/test(ckpt_path="best")
            self._pointers.load(state.saved_aliases(states))
        if self._uploader is not None and ckpt.parent.resolve() == self._writer.directory.resolve():
            self._uploader.resumed(self._writer.directory, manifest, source)
        if self._writer is not None:
            self._writer.resumed(manifest, None)
        if self.trainer is not None:
            self._pending = (manifest, decoded, ckpt)  # samplers exist once training starts: restored then
        else:
            self._restore(manifest, decoded, ckpt)
        return state.join(states)

    def remove_checkpoint(self, path: Any) -> None:
        """Lightning's rotation: drop the pointer; a checkpoint no pointer names any more is deleted locally now
        and remotely once a newer checkpoint is committed there."""
        target = local_path(path)
        gone = self._pointers.repoint(target.name, None)
        target.unlink(missing_ok=True)
        self._delete_local([gone])

    def teardown(self) -> None:
        """End of fit/validate/test: wait for the writes and uploads, stop background work, release the lease."""
        if self._writer is None:
            return
        writer, uploader, life = self._writer, self._uploader, self._life
        self._writer = self._uploader = self._life = None
        timeout = life.remaining() if life is not None and life.requested else None  # SIGTERM: within the grace
        try:
            writer.close(timeout)
            if uploader is not None:
                uploader.close(timeout)
        finally:
            if life is not None:
                life.close()
        if uploader is not None:
            uploader.raise_if_failed()

    # ---- public helpers ---------------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until every started save is committed (and mirrored). True when all done in time."""
        return self._writer is None or wait_all(self._writer, self._uploader, timeout)

    def status(self) -> dict[str, Any]:
        """What is committed, mirrored and pending (the writer's and the uploader's status)."""
        if self._writer is None:
            return {"remote": self.remote, "started": False}
        return {"started": True, **combined_status(self._writer, self._uploader)}

    # ---- internals: the run ---------------------------------------------------------------------------------
    def _open(self, directory: Path) -> Writer:
        if self._writer is not None:
            return self._writer
        dist = Solo()  # Lightning calls a CheckpointIO on global rank 0 only: no collectives here
        token = open_directory(directory, dist)
        if self.remote is not None:
            from ..uploader import Uploader

            self._uploader = Uploader(
                self.remote,
                storage_options=self.storage_options,
                on_error=self.on_upload_error,
                takeover=self.takeover,
                retention=self._pointers.remote_retention,
                remote_options=self.remote_options,
                background_nice=self.background_nice,
            )
        clean_directory(directory, dist)
        self._writer = Writer(
            directory,
            dist,
            self._uploader,
            keep_last=state.keep_bound(self.trainer),
            keep_epochs=0,
            best=BestMetric(SaveSchedule(None)),
            token=token,
            background_nice=self.background_nice,
        )
        return self._writer

    def _delete_local(self, names: list[str | None]) -> None:
        """Delete rotated-out checkpoints locally (the remote copies go after the next remote commit)."""
        writer = self._writer
        for name in filter(None, names):
            if writer is None:
                return
            if not (writer.directory / name).exists() and writer.in_progress():
                writer.wait()  # still queued for writing: never race its commit
            with contextlib.suppress(FileNotFoundError):  # the writer's own retention may have been first
                local.delete(writer.directory, name)
            log.info("Removed checkpoint %s (rotated out by Lightning)", name)

    def _directory(self) -> Path:
        if self._writer is not None:
            return self._writer.directory
        if self.directory is not None:
            return self.directory
        dirpath = getattr(getattr(self.trainer, "checkpoint_callback", None), "dirpath", None)
        if dirpath is None:
            raise ConfigError(
                "SyncCkptIO does not know where to keep checkpoints: add io.callback to Trainer(callbacks=...) "
                "or pass SyncCkptIO(directory=...)"
            )
        return local_path(dirpath)

    # ---- internals: resume ----------------------------------------------------------------------------------
    def _find(self, path: str) -> Loaded:
        """The checkpoint ``path`` names: verified, decoded, pulled into the local folder when remote."""
        own = self.remote is not None and path.rstrip("/") == self.remote.rstrip("/")
        if path == NEWEST or own:
            return self._newest(self._directory())
        return locate(path, self._directory, self._newest, self.storage_options)

    def _newest(self, directory: Path, only: str | None = None) -> Loaded:
        remote = None
        if self.directory is None or directory.resolve() == self.directory.resolve():  # our folder (and run)
            self._open(directory)
            remote = None if self._uploader is None else self._uploader.remote
        return newest_valid(directory, remote, only)

    def _restore(self, manifest: Manifest, decoded: DecodedCheckpoint, path: Path) -> None:
        """The core's restore: samplers (arming their O(1) skip) and the RNG streams, re-applied when the resumed
        pass begins. Lightning restores the rest from the dict load_checkpoint returned."""
        names = [n for n in decoded.states if n != "rng" and not n.startswith("rng-rank")]
        objects: dict[str, Any] = {n: Part() for n in names}
        objects.update({n: o for n, o in self._data_objects().items() if n in decoded.states})
        restore(objects, manifest, decoded, path, Solo())

    def _newest_marker(self) -> str | None:
        """For the callback's ckpt_path: NEWEST when a checkpoint to resume from may exist, else None (Lightning
        then looks for last*.ckpt in its folder itself, which finds LAST_MARKER where this folder was used)."""
        known = self._writer.directory if self._writer is not None else self.directory
        remote = None if self._uploader is None else self._uploader.remote
        return newest_marker() if has_checkpoints(known, remote, self.remote, self.storage_options) else None

    # ---- internals: the trainer (through the callback) --------------------------------------------------------
    def _data_objects(self) -> dict[str, Any]:
        """The train loaders' samplers that take part in resume (ResumableSampler and the like), by stable name."""
        if self.trainer is None:
            if not self._warned_no_callback:
                self._warned_no_callback = True
                log.warning(
                    "SyncCkptIO without its callback: add io.callback to Trainer(callbacks=...) for an exact "
                    "mid-epoch resume, SIGTERM handling and ckpt_path='last' in a fresh session"
                )
            return {}
        return state.samplers(self.trainer)

    def _training_started(self, trainer: Any) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._restore(*pending)
        if self._life is None:
            # After Lightning installed its own SIGTERM handler (it would stop at the next batch, mid-accumulation)
            platform = detect_platform()
            self._life = Lifecycle(
                deadline=resolve_deadline(self.deadline, platform, session_start(platform)),
                flush=self.wait,
                grace_period=self.grace_period,
                mirrored=self.remote is not None,
                handle_sigterm=self.handle_sigterm,
                on_exit=lambda: None,
                status=self.status,
            )

    def _at_step_boundary(self, trainer: Any) -> None:
        """After an optimizer step: on SIGTERM (or the session deadline), take a last checkpoint here, mirror it, exit
        with status 143."""
        if self._life is None:
            return
        durable = self._writer.last_durable if self._writer is not None else None
        if not (self._life.requested or self._life.deadline_due(trainer.global_step, durable)):
            return

        def save() -> None:
            if self._writer is None or self._writer.last_saved_step != trainer.global_step:
                trainer.save_checkpoint(self._directory() / f"{SIGTERM_PREFIX}step={trainer.global_step}.ckpt")

        self._life.at_boundary(save, lambda: self._writer.last_committed if self._writer else None)


class SyncCkptCallback(OnExceptionCheckpoint):
    """The plugin's companion callback (``io.callback``): attaches the trainer, restores samplers and RNG when
    training starts, handles SIGTERM at optimizer-step boundaries, and answers ``ckpt_path="last"``.

    >>> SyncCkptIO(remote=None).callback.ckpt_path is None   # no remote: Lightning searches its folder itself
    True
    """

    __reduce__ = _refuse_pickling

    def __init__(self, io: SyncCkptIO) -> None:
        super().__init__(dirpath=".", filename="syncckpt")
        self.io = io
        self._step_at_start = -1

    @property
    def ckpt_path(self) -> str | None:  # type: ignore[override]
        return self.io._newest_marker()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.world_size > 1:
            raise ConfigError(_ONE_PROCESS.format(n=trainer.world_size))
        self.io.trainer = trainer

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.io._training_started(trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._step_at_start:  # an optimizer step happened: a consistent point
            self.io._at_step_boundary(trainer)

    def on_exception(self, trainer: Any, *_: Any, **__: Any) -> None:
        pass  # never save on an exception: the state may be mid-step; what is committed is flushed at teardown

    def teardown(self, trainer: Any, *_: Any, **__: Any) -> None:
        pass  # OnExceptionCheckpoint would delete its ckpt_path here
