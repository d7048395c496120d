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
import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import fsspec
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from .. import local
from ..distributed import Solo
from ..errors import CheckpointNotFound, ConfigError, NoValidCheckpoint, StateMismatch, UnsafeCheckpoint
from ..format import DecodedCheckpoint, decode_checkpoint
from ..lifecycle import Lifecycle
from ..manifest import Manifest, checkpoint_name, parse_checkpoint_name
from ..pull import remote_listing
from ..remote import open_remote
from ..restore import restore
from ..resume import find_resumable, pull_checkpoint_url
from ..schedule import BestMetric, SaveSchedule
from ..writer import Writer, open_directory

log = logging.getLogger("syncckpt")

__all__ = ["SyncCkptCallback", "SyncCkptIO"]

POINTER_FORMAT = "syncckpt-lightning-pointer/1"
LAST_MARKER = "last.syncckpt.ckpt"  # Lightning's "last" search matches last*.ckpt: this one means "newest valid"
NEWEST = "memory://syncckpt/newest-valid-checkpoint.ckpt"  # what the callback answers for ckpt_path="last"
_MAX_POINTER_BYTES = 64 * 1024
_SPLIT = {"state_dict": "model", "optimizer_states": "optimizer"}  # big tensor trees get their own files
_SCALAR = "__lightning_scalar__"
_SIGTERM_PREFIX = "syncckpt-sigterm-"  # our own last save on SIGTERM: superseded by the next save Lightning asks for
_ALL = 10**6  # "keep everything" for the writer's newest-K safety net (save_top_k=-1)


class _Part:
    """One part of Lightning's checkpoint dict, registered with the writer (state_dict/load_state_dict)."""

    def __init__(self, state: Any = None) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


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
        remote_options, background_nice: as for :class:`syncckpt.CheckpointManager`.
    """

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
    ) -> None:
        if on_upload_error not in ("warn", "raise"):
            raise ConfigError(f"on_upload_error must be 'warn' or 'raise', got {on_upload_error!r}")
        if not 0 <= background_nice <= 19:
            raise ConfigError(f"background_nice must be between 0 and 19, got {background_nice}")
        self.remote = remote
        self.storage_options = storage_options
        self.directory = Path(directory) if directory is not None else None
        self.on_upload_error = on_upload_error
        self.takeover = takeover
        self.handle_sigterm = handle_sigterm
        self.grace_period = grace_period
        self.remote_options = dict(remote_options or {})
        self.background_nice = background_nice
        self.callback = SyncCkptCallback(self)
        self.trainer: Any = None  # set by the callback's setup()
        self._writer: Writer | None = None
        self._uploader: Any = None
        self._life: Lifecycle | None = None
        self._lock = threading.Lock()
        self._aliases: dict[str, str] = {}  # Lightning file name -> checkpoint name, saved with every checkpoint
        self._removed: set[str] = set()  # checkpoints Lightning's rotation removed: deleted remotely after a commit
        self._pending: tuple[Manifest, DecodedCheckpoint, Path] | None = None  # restored when training starts
        self._warned_no_callback = False

    # ---- CheckpointIO ---------------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Snapshot ``checkpoint`` (Lightning's dict), write it as ``checkpoint-step-N`` in the background, and
        write the pointer ``path``. Raises StateNotSerializable naming the key path of a value that is neither a
        tensor nor JSON-able (syncckpt never pickles)."""
        target = _local_path(path)
        writer = self._open(self.directory or target.parent)
        if target.parent.resolve() != writer.directory.resolve():
            raise ConfigError(f"{path}: SyncCkptIO keeps its checkpoints in {writer.directory}; save there")
        step = int(checkpoint.get("global_step", 0))
        name = checkpoint_name("step", step)
        epoch, batch_idx = _position(checkpoint)
        if writer.last_saved_step == step and self._mid_accumulation(checkpoint, batch_idx):
            # After a resume ModelCheckpoint saves the resumed step again at the next micro-batch (it does not
            # restore which step it saved last): that state holds half an accumulation window, which a
            # checkpoint cannot hold. The checkpoint of this step, taken at its optimizer step, stands for it.
            with self._lock:
                orphans = [self._point(target.name, name)]
            _write_json(target, {"format": POINTER_FORMAT, "checkpoint": name, "global_step": step})
            self._delete_local(orphans)
            return
        with self._lock:
            before = dict(self._aliases), set(self._removed)
            orphans = [self._point(target.name, name)]
            stale = (
                []
                if target.name.startswith(_SIGTERM_PREFIX)
                else [a for a in self._aliases if a.startswith(_SIGTERM_PREFIX)]
            )
            orphans += [self._point(a, None) for a in stale]  # a save Lightning asked for supersedes our own
            aliases = dict(self._aliases)
        objects: dict[str, Any] = {"pointers": _Part({"aliases": aliases})}
        objects["lightning"] = _Part(_pack_scalars({k: v for k, v in checkpoint.items() if k not in _SPLIT}))
        objects.update({part: _Part(checkpoint[key]) for key, part in _SPLIT.items() if key in checkpoint})
        objects.update(self._data_objects())
        try:
            writer.start(objects, ["step"], step, epoch=epoch, batch_idx=batch_idx, metrics=self._metrics())
        except BaseException:
            with self._lock:
                self._aliases, self._removed = before
            raise
        _write_json(target, {"format": POINTER_FORMAT, "checkpoint": name, "global_step": step})
        for alias in stale:
            (writer.directory / alias).unlink(missing_ok=True)
        self._delete_local(orphans)
        if not (writer.directory / LAST_MARKER).exists():
            _write_json(writer.directory / LAST_MARKER, {"format": POINTER_FORMAT, "checkpoint": "newest"})

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        """Verify (and pull, when remote) the checkpoint ``path`` names and return Lightning's dict, unpickled
        from nothing: tensors from safetensors, the rest from JSON."""
        manifest, decoded, ckpt, source = self._find(str(path))
        states = decoded.states
        if "lightning" not in states or "model" not in states:
            raise StateMismatch(
                f"{ckpt}: not a Lightning checkpoint (no 'lightning'/'model' state); resume it with "
                "CheckpointManager.resume()"
            )
        if self.trainer is None or self.trainer.state.fn == "fit":  # not for validate/test(ckpt_path="best")
            with self._lock:
                self._aliases = dict((states.get("pointers") or {}).get("aliases", {}))
        if self._uploader is not None and ckpt.parent.resolve() == self._writer.directory.resolve():
            self._uploader.resumed(self._writer.directory, manifest, source)
        if self._writer is not None:
            self._writer.resumed(manifest, None)
        if self.trainer is not None:
            self._pending = (manifest, decoded, ckpt)  # samplers exist once training starts: restored then
        else:
            self._restore(manifest, decoded, ckpt)
        out = _unpack_scalars(states["lightning"])
        out.update({key: states[part] for key, part in _SPLIT.items() if part in states})
        return out

    def remove_checkpoint(self, path: Any) -> None:
        """Lightning's rotation: drop the pointer; a checkpoint no pointer names any more is deleted locally now
        and remotely once a newer checkpoint is committed there."""
        target = _local_path(path)
        with self._lock:
            gone = self._point(target.name, None)
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
        if self._writer is None:
            return True
        if not self._writer.wait(timeout):
            return False
        if self._uploader is None:
            return True
        done = self._uploader.wait(timeout)
        self._uploader.raise_if_failed()
        return bool(done)

    def status(self) -> dict[str, Any]:
        """What is committed, mirrored and pending (the writer's and the uploader's status)."""
        if self._writer is None:
            return {"remote": self.remote, "started": False}
        st = {"started": True, **self._writer.status()}
        if self._uploader is not None:
            st.update(self._uploader.status())
        return st

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
                retention=self._remote_retention,
                remote_options=self.remote_options,
                background_nice=self.background_nice,
            )
        self._writer = Writer(
            directory,
            dist,
            self._uploader,
            keep_last=self._keep_bound(),
            keep_epochs=0,
            best=BestMetric(SaveSchedule(None)),
            token=token,
            background_nice=self.background_nice,
        )
        return self._writer

    def _keep_bound(self) -> int:
        """The writer's own retention keeps the newest K step checkpoints. Lightning keeps at most save_top_k (+1
        while it rotates, +1 for save_last) per ModelCheckpoint, plus our SIGTERM save: never fewer."""
        callbacks = [c for c in getattr(self.trainer, "callbacks", []) if isinstance(c, ModelCheckpoint)]
        if not callbacks or any(c.save_top_k < 0 for c in callbacks):
            return _ALL
        return sum(c.save_top_k + 1 + bool(c.save_last) for c in callbacks) + 1

    def _point(self, alias: str, name: str | None) -> str | None:
        """Point the pointer ``alias`` at checkpoint ``name`` (None: drop it), lock held. Returns the checkpoint
        it named before when no pointer names that one any more (Lightning rotated it out)."""
        old = self._aliases.pop(alias, None)
        if name is not None:
            self._aliases[alias] = name
            self._removed.discard(name)
        if old is None or old in self._aliases.values():
            return None
        self._removed.add(old)
        return old

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

    def _remote_retention(self, refs: list[Any]) -> list[str]:
        with self._lock:
            kept = set(self._aliases.values())
            return sorted(r.name for r in refs if r.name in self._removed and r.name not in kept)

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
        return _local_path(dirpath)

    # ---- internals: resume ----------------------------------------------------------------------------------
    def _find(self, path: str) -> tuple[Manifest, DecodedCheckpoint, Path, str]:
        """The checkpoint ``path`` names: verified, decoded, pulled into the local folder when remote."""
        own = self.remote is not None and path.rstrip("/") == self.remote.rstrip("/")
        if path == NEWEST or own:
            return self._newest(self._directory())
        if "://" in path and not path.startswith("file://"):
            manifest, files, ckpt = pull_checkpoint_url(path, self._directory(), self.storage_options)
            return manifest, decode_checkpoint(files, str(ckpt)), ckpt, path
        p = Path(path.removeprefix("file://"))
        if p.is_file():
            name = _read_pointer(p)
            if name == "newest" or p.name.startswith("last"):  # "last": the newest valid, wherever it is
                return self._newest(p.parent)
            return self._newest(p.parent, only=name)
        if (p / "manifest.json").is_file():
            manifest, files = local.verify(p)
            return manifest, decode_checkpoint(files, str(p)), p, "local"
        if p.is_dir():
            return self._newest(p)
        raise CheckpointNotFound(f"{path}: no such checkpoint, pointer file or folder")

    def _newest(self, directory: Path, only: str | None = None) -> tuple[Manifest, DecodedCheckpoint, Path, str]:
        remote = None
        if self.directory is None or directory.resolve() == self.directory.resolve():  # our folder (and run)
            self._open(directory)
            remote = None if self._uploader is None else self._uploader.remote
        search = find_resumable(
            directory,
            remote,
            accept=None if only is None else (lambda n: n == only),
            decode=lambda m, files, p: decode_checkpoint(files, str(p)),
        )
        where = str(directory) + (f" or {remote.url}" if remote is not None else "")
        if search.found is not None:
            f = search.found
            log.info("Resuming from checkpoint: %s (global step %d, %s)", f.path, f.manifest.global_step, f.source)
            return f.manifest, f.decoded, f.path, f.source
        if search.nothing_valid:
            report = search.damage_report()
            log.warning("No valid checkpoint in %s: %s", where, report)
            raise NoValidCheckpoint(f"no valid checkpoint in {where} ({report})", where=where, report=report)
        raise CheckpointNotFound(f"{only or 'no checkpoint'} in {where}: nothing to resume from")

    def _restore(self, manifest: Manifest, decoded: DecodedCheckpoint, path: Path) -> None:
        """The core's restore: samplers (arming their O(1) skip) and the RNG streams, re-applied when the resumed
        pass begins. Lightning restores the rest from the dict load_checkpoint returned."""
        names = [n for n in decoded.states if n != "rng" and not n.startswith("rng-rank")]
        objects: dict[str, Any] = {n: _Part() for n in names}
        objects.update({n: o for n, o in self._data_objects().items() if n in decoded.states})
        restore(objects, manifest, decoded, path, Solo())

    def _newest_marker(self) -> str | None:
        """For the callback's ckpt_path: NEWEST when a checkpoint to resume from may exist, else None (Lightning
        then looks for last*.ckpt in its folder itself, which finds LAST_MARKER where this folder was used)."""
        known = self._writer.directory if self._writer is not None else self.directory
        if known is not None:
            found, damaged = local.scan(known)
            if found or damaged:
                return self._newest_path()
        if self.remote is None:
            return None
        if self._uploader is not None:
            listing = remote_listing(self._uploader.remote)
        else:
            store = open_remote(self.remote, self.storage_options)
            try:
                listing = remote_listing(store)
            finally:
                store.close()
        if not (listing.candidates or listing.unreadable or listing.quarantined):
            return None
        return self._newest_path()

    @staticmethod
    def _newest_path() -> str:
        fsspec.filesystem("memory").pipe_file(NEWEST, b"{}")  # Lightning checks that it exists and how new it is
        return NEWEST

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
        found: list[Any] = []
        for loader in _loaders(self.trainer.train_dataloader):
            for obj in (
                getattr(loader, "sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None),
            ):
                if callable(getattr(obj, "checkpoint_position", None)) and all(o is not obj for o in found):
                    found.append(obj)
        return {("sampler" if i == 0 else f"sampler_{i}"): s for i, s in enumerate(found)}

    def _mid_accumulation(self, checkpoint: dict[str, Any], batch_idx: int) -> bool:
        accumulate = getattr(self.trainer, "accumulate_grad_batches", 1)
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        return (batch_idx + 1) % accumulate != 0 and not progress.get("is_last_batch", False)

    def _metrics(self) -> dict[str, float]:
        metrics = getattr(self.trainer, "callback_metrics", None) or {}
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor)) and _scalar(v)}

    def _training_started(self, trainer: Any) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._restore(*pending)
        if self._life is None:
            # After Lightning installed its own SIGTERM handler (it would stop at the next batch, mid-accumulation)
            self._life = Lifecycle(
                flush=self.wait,
                grace_period=self.grace_period,
                mirrored=self.remote is not None,
                handle_sigterm=self.handle_sigterm,
                on_exit=self._flush_at_exit,
            )

    def _at_step_boundary(self, trainer: Any) -> None:
        """After an optimizer step: on SIGTERM, take a last checkpoint here, mirror it, exit with status 143."""
        if self._life is None or not self._life.requested:
            return

        def save() -> None:
            if self._writer is None or self._writer.last_saved_step != trainer.global_step:
                trainer.save_checkpoint(self._directory() / f"{_SIGTERM_PREFIX}step={trainer.global_step}.ckpt")

        self._life.at_boundary(save, lambda: self._writer.last_committed if self._writer else None)

    def _flush_at_exit(self) -> None:
        if self._writer is not None and not self.wait(self.grace_period):
            log.warning("Exiting with checkpoint work still pending after %.0fs: %s", self.grace_period, self.status())


class SyncCkptCallback(OnExceptionCheckpoint):
    """The plugin's companion callback (``io.callback``): attaches the trainer, restores samplers and RNG when
    training starts, handles SIGTERM at optimizer-step boundaries, and answers ``ckpt_path="last"``.

    >>> SyncCkptIO(remote=None).callback.ckpt_path is None   # no remote: Lightning searches its folder itself
    True
    """

    def __init__(self, io: SyncCkptIO) -> None:
        super().__init__(dirpath=".", filename="syncckpt")
        self.io = io
        self._step_at_start = -1

    @property
    def ckpt_path(self) -> str | None:  # type: ignore[override]
        return self.io._newest_marker()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.world_size > 1:
            raise ConfigError(
                f"SyncCkptIO runs in one process for now (this job has {trainer.world_size}): every rank would "
                "resume, pull and hold the remote run at once"
            )
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


# ---- helpers ------------------------------------------------------------------------------------------------------
def _local_path(path: Any) -> Path:
    s = str(path)
    if "://" in s and not s.startswith("file://"):
        raise ConfigError(
            f"{s}: SyncCkptIO writes checkpoints locally and mirrors them; give ModelCheckpoint a local dirpath and "
            "pass the bucket as SyncCkptIO(remote=...)"
        )
    return Path(s.removeprefix("file://"))


def _position(checkpoint: dict[str, Any]) -> tuple[int, int]:
    """(epoch, index of the last trained batch of it) from Lightning's loop state (-1: none yet)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    processed = progress.get("current", {}).get("processed", 0)
    return int(checkpoint.get("epoch", 0)), int(processed) - 1


def _loaders(iterables: Any) -> list[Any]:
    if isinstance(iterables, dict):
        return [x for v in iterables.values() for x in _loaders(v)]
    if isinstance(iterables, (list, tuple)):
        return [x for v in iterables for x in _loaders(v)]
    return [] if iterables is None else [iterables]


def _pack_scalars(v: Any) -> Any:
    """0-d tensors of Lightning's bookkeeping (``ModelCheckpoint.kth_value`` starts as ``tensor(inf)``) as JSON
    values: in a tensor file the core's health check would mark every checkpoint as holding non-finite weights."""
    if isinstance(v, torch.Tensor) and v.dim() == 0:
        return {_SCALAR: {"dtype": str(v.dtype).removeprefix("torch."), "value": v.item()}}
    if isinstance(v, dict):
        return {k: _pack_scalars(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_pack_scalars(x) for x in v)
    return v


def _unpack_scalars(v: Any) -> Any:
    if isinstance(v, dict):
        if len(v) == 1 and isinstance(v.get(_SCALAR), dict):
            spec = v[_SCALAR]
            dtype = getattr(torch, str(spec.get("dtype")), None)
            if not isinstance(dtype, torch.dtype):
                raise StateMismatch(f"Lightning state: unknown scalar dtype {spec.get('dtype')!r}")
            return torch.tensor(spec.get("value"), dtype=dtype)
        return {k: _unpack_scalars(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_unpack_scalars(x) for x in v)
    return v


def _scalar(v: Any) -> bool:
    return not isinstance(v, torch.Tensor) or v.numel() == 1


def _write_json(target: Path, data: dict[str, Any]) -> None:
    """Atomically (write, fsync, rename) write a small JSON file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    local.fsync_dir(target.parent)


def _read_pointer(path: Path) -> str:
    """The checkpoint name a pointer file names ("newest" for LAST_MARKER). Anything else is refused unread."""
    size = path.stat().st_size
    head = path.read_bytes()[:_MAX_POINTER_BYTES] if size <= _MAX_POINTER_BYTES else b""
    try:
        data = json.loads(head)
        if data.get("format") != POINTER_FORMAT:
            raise ValueError
        name = data["checkpoint"]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise UnsafeCheckpoint(
            f"{path}: not a syncckpt pointer (a .ckpt written by Lightning's TorchCheckpointIO is a pickle, which "
            "syncckpt never loads); pass a checkpoint written through SyncCkptIO, its folder or its remote URL"
        ) from None
    if name != "newest" and (not isinstance(name, str) or parse_checkpoint_name(name) is None):
        raise UnsafeCheckpoint(f"{path}: names {name!r}, which is not a checkpoint folder name")
    return name
