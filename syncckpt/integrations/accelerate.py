"""Verified, mirrored, pickle-free, exactly resumable checkpoints for Hugging Face Accelerate scripts.

:class:`SyncCheckpointer` is a thin adapter over :class:`syncckpt.CheckpointManager`: it registers what
``accelerator.prepare`` returned (the unwrapped model, the optimizer, the scheduler, the GradScaler when
Accelerate made one, the accumulation counter) and the prepared dataloader's position, then the core does the
rest (safetensors + JSON, SHA-256 manifest, atomic commit, background mirroring, newest-valid resume with
fallback, SIGTERM, one RNG stream per rank under ``accelerate launch``).

The dataloader must draw its order from a :class:`syncckpt.ResumableSampler` built with ``num_replicas=1``:
``prepare`` hands every process a share of its *batches* (``BatchSamplerShard``; ``DataLoaderDispatcher`` in
dispatch mode), so on N processes one optimizer step of each rank consumes N batches of the sampler. The adapter
saves the position in the sampler's batches, and the resumed pass starts right after the last trained batch: the
skipped indices are sliced off, no skipped sample is read (Accelerate's ``skip_first_batches`` walks the skipped
batches instead).

In dispatch mode (``DataLoaderDispatcher``) only the main process iterates the sampler; the other ranks re-apply
their RNG streams once their own loader iterator has drawn its seed, as the sampler does on the main process.

>>> import tempfile, torch
>>> from accelerate import Accelerator
>>> from torch.utils.data import DataLoader, TensorDataset
>>> from syncckpt import ResumableSampler
>>> from syncckpt.integrations.accelerate import SyncCheckpointer
>>> accelerator = Accelerator()
>>> ds = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
>>> loader = DataLoader(ds, batch_size=4, sampler=ResumableSampler(ds, batch_size=4, seed=0, num_replicas=1, rank=0))
>>> model = torch.nn.Linear(4, 1)
>>> model, opt, loader = accelerator.prepare(model, torch.optim.AdamW(model.parameters()), loader)
>>> ckpt = SyncCheckpointer(accelerator, tempfile.mkdtemp(), every_n_steps=2, handle_sigterm=False)
>>> ckpt.register(model=model, optimizer=opt, dataloader=loader)
>>> print(ckpt.resume())
None
>>> for i, (x, y) in enumerate(loader):
...     accelerator.backward(torch.nn.functional.mse_loss(model(x), y)); opt.step(); opt.zero_grad()
...     _ = ckpt.step(epoch=0, batch_idx=i)
>>> ckpt.close(); ckpt.manager.list_local()
['checkpoint-step-4']
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher

from .. import local
from ..manager import CheckpointManager
from ..manifest import Manifest
from ..restore import ResumeInfo
from ..sampler import ResumableSampler

log = logging.getLogger("syncckpt")

__all__ = ["SyncCheckpointer", "adopt_save_state"]


class SyncCheckpointer:
    """Checkpoint an Accelerate training loop with :class:`syncckpt.CheckpointManager`.

    Create it on every process after the ``Accelerator`` (under ``accelerate launch`` its construction is
    collective, like the manager's), :meth:`register` what ``prepare`` returned, call :meth:`resume` once and
    :meth:`step` after every batch. Only the main process talks to ``remote``.

    Args:
        accelerator: the script's ``Accelerator``.
        directory: local checkpoint folder (the manager's default when None).
        remote: URL mirrored in the background (``s3://``, ``gs://``, ``hf://``, ``file://``, any fsspec URL).
        storage_options: passed to the remote backend (credentials, endpoint_url, ...); never logged.
        every_n_steps: save every N optimizer steps (``None`` disables).
        every_n_minutes: also save when this much time passed since the last save.
        keep_last: step checkpoints kept locally and remotely.
        **options: any other :class:`~syncckpt.CheckpointManager` keyword (``takeover``, ``grace_period``, ...).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        directory: str | os.PathLike[str] | None = None,
        *,
        remote: str | None = None,
        storage_options: dict[str, Any] | None = None,
        every_n_steps: int | None = 500,
        every_n_minutes: float | None = None,
        keep_last: int = 1,
        **options: Any,
    ) -> None:
        self.accelerator = accelerator
        self.manager = CheckpointManager(
            directory,
            save_every_n_steps=every_n_steps,
            save_every_n_minutes=every_n_minutes,
            keep_last=keep_last,
            remote=remote,
            storage_options=storage_options,
            **options,
        )
        #: optimizer steps taken so far (restored by :meth:`resume`)
        self.global_step = 0

    def register(
        self,
        *,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        dataloader: Any = None,
        **objects: Any,
    ) -> None:
        """Register the prepared objects (any left out is not checkpointed) and any other ``state_dict`` owner.

        Models are saved unwrapped (no DDP ``module.`` prefix), so a checkpoint fits any process count; the
        GradScaler Accelerate made for fp16 and the accumulation counter are registered too.
        """
        named = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **objects}
        found = {name: obj for name, obj in named.items() if obj is not None}
        for name, obj in found.items():
            if isinstance(obj, torch.nn.Module):
                found[name] = self.accelerator.unwrap_model(obj)
        if dataloader is not None:
            found["dataloader"] = _LoaderPosition(dataloader)
        if self.accelerator.scaler is not None:
            found.setdefault("scaler", self.accelerator.scaler)
        found["accelerator"] = _AccumulationCounter(self.accelerator)
        self.manager.register(**found)

    def resume(
        self, path: str | os.PathLike[str] | None = None, *, start_fresh_if_damaged: bool = False
    ) -> ResumeInfo | None:
        """Restore from the newest valid local or remote checkpoint (or ``path``); None: start from scratch.

        In the epoch ``info.epoch`` the loader then starts at batch ``info.batch_idx + 1``. See
        :meth:`syncckpt.CheckpointManager.resume` for fallback, quarantine and errors."""
        info = self.manager.resume(path, start_fresh_if_damaged=start_fresh_if_damaged)
        self.global_step = info.global_step if info is not None else 0
        return info

    def step(self, *, epoch: int, batch_idx: int, metrics: dict[str, Any] | None = None) -> bool:
        """Call after every batch, ``batch_idx`` counting the loader's batches in ``epoch`` from 0.

        A batch that ends an optimizer step (``accelerator.sync_gradients``) counts one step, and a checkpoint is
        saved when one is due; returns whether a save started."""
        if not self.accelerator.sync_gradients:
            return False
        self.global_step += 1
        return self.manager.step(self.global_step, epoch=epoch, batch_idx=batch_idx, metrics=metrics)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every started save is committed and mirrored. True when all done."""
        return self.manager.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Wait for pending saves and uploads, then stop background work."""
        self.manager.close(timeout)

    def __enter__(self) -> SyncCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _AccumulationCounter:
    """``accelerator.step``: which micro-batch of a gradient-accumulation cycle comes next."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        return {"step": int(self.accelerator.step), "num_processes": int(self.accelerator.num_processes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_processes", self.accelerator.num_processes) != self.accelerator.num_processes:
            log.warning(
                "checkpoint saved with %s processes, resumed with %s: the data order after it differs",
                state["num_processes"],
                self.accelerator.num_processes,
            )
        self.accelerator.step = int(state["step"])


class _LoaderPosition:
    """A (prepared) dataloader's place in its :class:`ResumableSampler`: the loader's batch index becomes the
    sampler's, and Accelerate's pass counter (``iteration``, which ``__iter__`` passes to ``set_epoch``) is kept.
    Takes part in resume through the hooks of :mod:`syncckpt.restore`."""

    def __init__(self, loader: Any) -> None:
        batches, self.per_step = _sampler_batches(loader)
        sampler = getattr(batches, "sampler", None)
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(
                f"dataloader: its sampler is {type(sampler).__name__}; build the DataLoader with "
                "sampler=ResumableSampler(dataset, batch_size=..., num_replicas=1, rank=0) so resume skips in O(1)"
            )
        if self.per_step > 1 or isinstance(batches, BatchSamplerShard):
            if sampler.num_replicas != 1:
                raise ValueError(
                    f"dataloader: ResumableSampler(num_replicas={sampler.num_replicas}) under a prepared DataLoader: "
                    "Accelerate already splits its batches across processes; build it with num_replicas=1, rank=0"
                )
        size = getattr(batches, "batch_size", None)
        if size != sampler.batch_size:
            raise ValueError(
                f"dataloader: ResumableSampler(batch_size={sampler.batch_size}) but the loader's batches hold {size} "
                "samples; pass the DataLoader's batch_size to the sampler"
            )
        self.loader = loader
        self.sampler = sampler

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.sampler.state_dict(),
            "iteration": int(getattr(self.loader, "iteration", self.sampler.epoch)),
            "sampler_batches_per_step": self.per_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        iteration = state.pop("iteration", None)
        if iteration is not None and hasattr(self.loader, "iteration"):
            self.loader.iteration = int(iteration)
        saved = state.pop("sampler_batches_per_step", self.per_step)
        if saved != self.per_step:
            log.warning(
                "dataloader: saved with %s sampler batches per loader batch, resumed with %s (another process "
                "count or split_batches); resume's batch_idx counts the saved run's batches",
                saved,
                self.per_step,
            )
        self.sampler.load_state_dict(state)

    def checkpoint_position(self, epoch: int, batch_idx: int) -> dict[str, Any]:
        return self.sampler.checkpoint_position(epoch, (batch_idx + 1) * self.per_step - 1)

    def on_resumed_pass(self, callback: Any) -> None:
        self.sampler.on_resumed_pass(callback)
        if isinstance(self.loader, DataLoaderDispatcher) and self.loader.state.process_index != 0:
            _after_next_iterator(self.loader.base_dataloader, callback)


def _after_next_iterator(loader: Any, callback: Any) -> None:
    """Run ``callback`` once, right after ``loader``'s next iterator is created (it draws its base seed from the
    global RNG then): a dispatching loader's other ranks never iterate the sampler, whose hook does this."""
    create = loader._get_iterator

    def create_then_call() -> Any:
        del loader._get_iterator  # back to the class's method
        iterator = create()
        callback()
        return iterator

    loader._get_iterator = create_then_call


def _sampler_batches(loader: Any) -> tuple[Any, int]:
    """The batch sampler that batches the ResumableSampler's indices, and how many of its batches one batch of
    ``loader`` on one process consumes (prepare's sharding: N processes, unless batches are split)."""
    if isinstance(loader, DataLoaderDispatcher):
        n = 1 if loader.split_batches else loader.state.num_processes
        return loader.batch_sampler, n
    batches = loader.batch_sampler
    if isinstance(batches, BatchSamplerShard):
        n = 1 if batches.split_batches else batches.num_processes
        inner = batches.batch_sampler
        ragged = len(inner) % n or len(getattr(inner, "sampler", ())) % (getattr(inner, "batch_size", None) or 1)
        if n > 1 and ragged and not batches.drop_last and batches.even_batches:
            log.warning(
                "dataloader: on %d processes Accelerate pads an epoch's last step with its first samples; a "
                "resumed pass pads with its own first samples (drop_last=True keeps every epoch exact)",
                n,
            )
        return batches.batch_sampler, n
    return batches, 1


def adopt_save_state(folder: str | os.PathLike[str], *, global_step: int | None = None, epoch: int = 0) -> Manifest:
    """Write ``manifest.json`` (SHA-256 of every file, written last) into a folder ``accelerator.save_state``
    wrote, so ``syncckpt watch DIR URL`` or ``syncckpt push`` mirrors it and ``syncckpt pull`` brings it back
    verified. The folder must be named ``checkpoint-N`` (N: the global step, unless ``global_step`` is given).
    Call it on the main process after ``save_state`` returned. Loading the folder stays Accelerate's business
    (``accelerator.load_state``: its files are pickles).

    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "checkpoint-40"
    >>> folder.mkdir(); _ = (folder / "model.safetensors").write_bytes(b"weights")
    >>> m = adopt_save_state(folder, epoch=1)
    >>> m.name, m.global_step, m.epoch, [f.path for f in m.files], (folder / "manifest.json").exists()
    ('checkpoint-40', 40, 1, ['model.safetensors'], True)
    """
    return local.manifest_for_folder(
        Path(folder), global_step=global_step, epoch=epoch, extra={"source": "accelerate.save_state"}
    )
