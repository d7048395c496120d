"""Lightning's side of a checkpoint, as :class:`~syncckpt.integrations.lightning.SyncCkptIO` stores it.

Three things, each a plain function of Lightning's data (the plugin does the I/O policy):

- the checkpoint dict <-> the parts the core's writer saves: ``state_dict`` and ``optimizer_states`` get their own
  tensor files, the rest (loop state, callbacks, hyper-parameters) goes to JSON with its 0-d tensors as JSON values;
- pointer files: ``path`` in ``trainer.save_checkpoint(path)`` becomes a small JSON file naming the syncckpt
  checkpoint, so Lightning's file names, version counters and ``save_top_k`` rotation work unchanged; and the
  :class:`Pointers` bookkeeping of which checkpoint each pointer names and which ones the rotation let go;
- what the trainer tells about the loop: position, accumulation, metrics, the samplers taking part in resume.

>>> import torch
>>> parts = split({"global_step": 3, "state_dict": {"w": torch.ones(2)}, "kth": torch.tensor(float("inf"))}, {})
>>> sorted(parts), parts["lightning"].state["kth"]
(['lightning', 'model', 'pointers'], {'__lightning_scalar__': {'dtype': 'float32', 'value': inf}})
>>> join({n: p.state for n, p in parts.items()})["kth"]
tensor(inf)
>>> p = Pointers()
>>> p.repoint("a.ckpt", "checkpoint-step-2"), p.repoint("a.ckpt", "checkpoint-step-4")
(None, 'checkpoint-step-2')
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from .. import local
from ..errors import ConfigError, StateMismatch, UnsafeCheckpoint
from ..manifest import parse_checkpoint_name

POINTER_FORMAT = "syncckpt-lightning-pointer/1"
LAST_MARKER = "last.syncckpt.ckpt"  # Lightning's "last" search matches last*.ckpt: this one means "newest valid"
SIGTERM_PREFIX = "syncckpt-sigterm-"  # our own last save on SIGTERM: superseded by the next save Lightning asks for
_MAX_POINTER_BYTES = 64 * 1024
_SPLIT = {"state_dict": "model", "optimizer_states": "optimizer"}  # big tensor trees get their own files
_SCALAR = "__lightning_scalar__"
_ALL = 10**6  # "keep everything" for the writer's newest-K safety net (save_top_k=-1)


class Part:
    """One part of Lightning's checkpoint dict, registered with the writer (state_dict/load_state_dict)."""

    def __init__(self, state: Any = None) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


# ---- the checkpoint dict <-> parts ---------------------------------------------------------------------------------
def split(checkpoint: dict[str, Any], aliases: dict[str, str]) -> dict[str, Part]:
    """The parts the writer saves for Lightning's ``checkpoint`` dict, the pointers' ``aliases`` among them."""
    objects: dict[str, Part] = {"pointers": Part({"aliases": aliases})}
    objects["lightning"] = Part(_pack_scalars({k: v for k, v in checkpoint.items() if k not in _SPLIT}))
    objects.update({part: Part(checkpoint[key]) for key, part in _SPLIT.items() if key in checkpoint})
    return objects


def is_lightning(states: dict[str, Any]) -> bool:
    return "lightning" in states and "model" in states


def join(states: dict[str, Any]) -> dict[str, Any]:
    """Lightning's checkpoint dict back from the decoded states of a checkpoint :func:`split` wrote."""
    out = _unpack_scalars(states["lightning"])
    out.update({key: states[part] for key, part in _SPLIT.items() if part in states})
    return out


def saved_aliases(states: dict[str, Any]) -> dict[str, str]:
    return dict((states.get("pointers") or {}).get("aliases", {}))


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


# ---- pointer files and their bookkeeping ----------------------------------------------------------------------
def local_path(path: Any) -> Path:
    s = str(path)
    if "://" in s and not s.startswith("file://"):
        raise ConfigError(
            f"{s}: SyncCkptIO writes checkpoints locally and mirrors them; give ModelCheckpoint a local dirpath and "
            "pass the bucket as SyncCkptIO(remote=...)"
        )
    return Path(s.removeprefix("file://"))


def write_pointer(target: Path, name: str, step: int | None = None) -> None:
    """Atomically (write, fsync, rename) write the pointer file ``target`` naming checkpoint ``name``."""
    data: dict[str, Any] = {"format": POINTER_FORMAT, "checkpoint": name}
    if step is not None:
        data["global_step"] = step
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    local.fsync_dir(target.parent)


def read_pointer(path: Path) -> str:
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


@dataclass
class Repointed:
    """What pointing a pointer at a new save changed: checkpoints no pointer names any more (``orphans``), our
    own SIGTERM pointers the save supersedes (``stale``), the aliases to save with it, and the state before."""

    orphans: list[str | None]
    stale: list[str]
    aliases: dict[str, str]
    before: tuple[dict[str, str], set[str]]


class Pointers:
    """Which checkpoint each pointer (Lightning's file name) names, and which ones Lightning's rotation let go:
    those are deleted remotely after the next commit. Thread-safe: the uploader's retention reads it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aliases: dict[str, str] = {}  # Lightning file name -> checkpoint name, saved with every checkpoint
        self._removed: set[str] = set()  # checkpoints Lightning's rotation removed: deleted remotely after a commit

    def repoint(self, alias: str, name: str | None) -> str | None:
        """Point ``alias`` at checkpoint ``name`` (None: drop it). Returns the checkpoint it named before when no
        pointer names that one any more (Lightning rotated it out)."""
        with self._lock:
            return self._point(alias, name)

    def saving(self, alias: str, name: str) -> Repointed:
        """Point ``alias`` at the checkpoint being saved; a save Lightning asked for supersedes our own."""
        with self._lock:
            before = dict(self._aliases), set(self._removed)
            orphans = [self._point(alias, name)]
            stale = (
                [] if alias.startswith(SIGTERM_PREFIX) else [a for a in self._aliases if a.startswith(SIGTERM_PREFIX)]
            )
            orphans += [self._point(a, None) for a in stale]
            return Repointed(orphans, stale, dict(self._aliases), before)

    def undo(self, change: Repointed) -> None:
        """The save did not start: back to the pointers before it."""
        with self._lock:
            self._aliases, self._removed = change.before

    def load(self, aliases: dict[str, str]) -> None:
        """The pointers a resumed checkpoint was saved with."""
        with self._lock:
            self._aliases = dict(aliases)

    def remote_retention(self, refs: list[Any]) -> list[str]:
        """The uploader's retention: rotated-out checkpoints no pointer names."""
        with self._lock:
            kept = set(self._aliases.values())
            return sorted(r.name for r in refs if r.name in self._removed and r.name not in kept)

    def _point(self, alias: str, name: str | None) -> str | None:
        old = self._aliases.pop(alias, None)
        if name is not None:
            self._aliases[alias] = name
            self._removed.discard(name)
        if old is None or old in self._aliases.values():
            return None
        self._removed.add(old)
        return old


# ---- what the trainer tells -----------------------------------------------------------------------------------
def position(checkpoint: dict[str, Any]) -> tuple[int, int]:
    """(epoch, index of the last trained batch of it) from Lightning's loop state (-1: none yet)."""
    processed = _batch_progress(checkpoint).get("current", {}).get("processed", 0)
    return int(checkpoint.get("epoch", 0)), int(processed) - 1


def mid_accumulation(trainer: Any, checkpoint: dict[str, Any], batch_idx: int) -> bool:
    """The checkpoint is taken inside an accumulation window (not at an optimizer step, nor at the epoch's end)."""
    accumulate = getattr(trainer, "accumulate_grad_batches", 1)
    return (batch_idx + 1) % accumulate != 0 and not _batch_progress(checkpoint).get("is_last_batch", False)


def _batch_progress(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})


def metrics(trainer: Any) -> dict[str, float]:
    """The trainer's scalar ``callback_metrics`` as floats (saved with the checkpoint's manifest)."""
    found = getattr(trainer, "callback_metrics", None) or {}
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float, torch.Tensor)) and _scalar(v)}


def _scalar(v: Any) -> bool:
    return not isinstance(v, torch.Tensor) or v.numel() == 1


def keep_bound(trainer: Any) -> int:
    """The writer's own retention keeps the newest K step checkpoints. Lightning keeps at most save_top_k (+1
    while it rotates, +1 for save_last) per ModelCheckpoint, plus our SIGTERM save: never fewer."""
    callbacks = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, ModelCheckpoint)]
    if not callbacks or any(c.save_top_k < 0 for c in callbacks):
        return _ALL
    return sum(c.save_top_k + 1 + bool(c.save_last) for c in callbacks) + 1


def samplers(trainer: Any) -> dict[str, Any]:
    """The train loaders' samplers that take part in resume (ResumableSampler and the like), by stable name."""
    found: list[Any] = []
    for loader in _loaders(trainer.train_dataloader):
        for obj in (
            getattr(loader, "sampler", None),
            getattr(getattr(loader, "batch_sampler", None), "sampler", None),
        ):
            if callable(getattr(obj, "checkpoint_position", None)) and all(o is not obj for o in found):
                found.append(obj)
    return {("sampler" if i == 0 else f"sampler_{i}"): s for i, s in enumerate(found)}


def _loaders(iterables: Any) -> list[Any]:
    if isinstance(iterables, dict):
        return [x for v in iterables.values() for x in _loaders(v)]
    if isinstance(iterables, (list, tuple)):
        return [x for v in iterables for x in _loaders(v)]
    return [] if iterables is None else [iterables]
