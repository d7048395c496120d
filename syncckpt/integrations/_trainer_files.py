"""The transformers Trainer's own checkpoint files without pickle: :class:`PicklefreeCheckpoints`.

The Trainer writes its optimizer, scheduler, gradient scaler and RNG states with ``torch.save`` (``optimizer.pt``,
``scheduler.pt``, ``scaler.pt``, ``rng_state.pth``) and its arguments as a pickled ``training_args.bin``, and loads
them inside ``train()`` with ``torch.load``. A callback cannot change that: only a Trainer subclass can. The mixin
overrides the private methods that save and load them, so each state goes to one safetensors file holding its
tensors and its JSON structure (:func:`syncckpt.format.encode_object_file`) and comes back the same way;
``training_args.json`` replaces ``training_args.bin``. The model is already ``model.safetensors``.

A checkpoint folder still holding the Trainer's pickles (written by a plain ``Trainer``) is refused with an error
naming the file, never loaded; so is training into an ``output_dir`` that holds such folders. DeepSpeed, FSDP, XLA
and SageMaker keep their own files; the mixin refuses them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import Trainer

from .. import rng
from ..errors import ConfigError, UnsafeCheckpoint
from ..format import decode_object_file, encode_object_file

__all__ = ["PicklefreeCheckpoints", "PicklefreeTrainer"]

OPTIMIZER, SCHEDULER, SCALER = "optimizer.safetensors", "scheduler.safetensors", "scaler.safetensors"
ARGS = "training_args.json"
#: What the plain Trainer writes instead, and loads with torch.load: refused when found without ours.
_PICKLED = {OPTIMIZER: "optimizer.pt", SCHEDULER: "scheduler.pt", SCALER: "scaler.pt"}
_PLAIN_FILES = {*_PICKLED.values(), "training_args.bin"}  # (and rng_state*.pth)


def _write(path: Path, state: Any, name: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_object_file(state, name))
    os.replace(tmp, path)


def _read(folder: str, name: str) -> Any | None:
    """The state in ``folder/name``; None when the folder has neither it nor the Trainer's pickled version."""
    path = Path(folder) / name
    if path.is_file():
        return decode_object_file(path.read_bytes(), where=str(path))
    pickled = Path(folder) / _PICKLED.get(name, name.replace(".safetensors", ".pth"))
    if pickled.is_file():
        raise UnsafeCheckpoint(
            f"{pickled}: a pickle written by the plain transformers Trainer; PicklefreeTrainer never unpickles. "
            "Resume this checkpoint with transformers.Trainer, or train from the start"
        )
    return None


def _refuse_plain_folders(output_dir: Path) -> None:
    """UnsafeCheckpoint when ``output_dir`` holds checkpoint folders of the plain Trainer: their pickles would stay
    beside the new checkpoint files the Trainer writes into the same ``checkpoint-N`` folders, and be mirrored
    with them. Nothing is deleted: the user decides."""
    pickled = sorted(
        p
        for folder in (output_dir.glob("checkpoint-*") if output_dir.is_dir() else ())
        if folder.is_dir()
        for p in folder.iterdir()
        if p.name in _PLAIN_FILES or (p.name.startswith("rng_state") and p.name.endswith(".pth"))
    )
    if pickled:
        raise UnsafeCheckpoint(
            f"{pickled[0]}: {output_dir} holds checkpoints of the plain transformers Trainer (pickles); "
            "PicklefreeTrainer would write its checkpoints into the same folders, beside them. Use another "
            "output_dir, or move those folders away"
        )


class PicklefreeCheckpoints:
    """Mix into a ``transformers.Trainer`` subclass, before it, so its checkpoints hold no pickle.

    ``class MyTrainer(PicklefreeCheckpoints, Trainer): ...`` (or :class:`PicklefreeTrainer` when there is no
    subclass of your own). Everything else about saving, rotating and resuming is the Trainer's own.
    """

    def _refuse_engines(self: Any) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or getattr(self, "is_fsdp_xla_enabled", False):
            raise ConfigError(
                "PicklefreeTrainer covers single-process and DDP training; DeepSpeed and FSDP write their own "
                "checkpoint files: use transformers.Trainer with them"
            )

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        _refuse_plain_folders(Path(self.args.output_dir))
        return super().train(*args, **kwargs)  # type: ignore[misc]

    def _rng_name(self: Any) -> str:
        return (
            "rng_state.safetensors" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.safetensors"
        )

    def _load_from_checkpoint(self: Any, resume_from_checkpoint: str, model: Any = None) -> None:
        folder = Path(resume_from_checkpoint)
        safe = any(folder.glob("model*.safetensors*")) or any(folder.glob("adapter_model*.safetensors"))
        if not safe and any(folder.glob("pytorch_model*.bin*")):
            raise UnsafeCheckpoint(
                f"{folder}: its weights are pytorch_model.bin (a pickle); PicklefreeTrainer never unpickles. "
                "Resume it with transformers.Trainer, or train from the start"
            )
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _save_optimizer_and_scheduler(self: Any, output_dir: str) -> None:
        self._refuse_engines()
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            _write(Path(output_dir) / OPTIMIZER, self.optimizer.state_dict(), "optimizer")
            _write(Path(output_dir) / SCHEDULER, self.lr_scheduler.state_dict(), "scheduler")

    def _save_scaler(self: Any, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            _write(Path(output_dir) / SCALER, scaler.state_dict(), "scaler")

    def _save_rng_state(self: Any, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)  # a rank may get here before rank 0 made the folder
        _write(Path(output_dir) / self._rng_name(), rng.capture(), "rng")

    def _save(self: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save:  # the Trainer pickles its arguments last; they are never read back on resume
            (folder / ARGS).write_text(self.args.to_json_string())
            (folder / "training_args.bin").unlink(missing_ok=True)

    def _load_optimizer_and_scheduler(self: Any, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        self._refuse_engines()
        optimizer, scheduler = _read(checkpoint, OPTIMIZER), _read(checkpoint, SCHEDULER)
        if optimizer is not None and scheduler is not None:
            self.optimizer.load_state_dict(optimizer)
            self.lr_scheduler.load_state_dict(scheduler)

    def _load_scaler(self: Any, checkpoint: str | None) -> None:
        state = None if checkpoint is None else _read(checkpoint, SCALER)
        if state is not None:
            self.accelerator.scaler.load_state_dict(state)

    def _load_rng_state(self: Any, checkpoint: str | None) -> None:
        state = None if checkpoint is None else _read(checkpoint, self._rng_name())
        if state is not None:
            rng.restore(state)


class PicklefreeTrainer(PicklefreeCheckpoints, Trainer):
    """``transformers.Trainer`` whose checkpoints hold no pickle (see :class:`PicklefreeCheckpoints`)."""
