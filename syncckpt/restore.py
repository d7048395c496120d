"""The resume flow of a run: choose a checkpoint (rank 0), agree on it (every rank), check it fits, restore it.

:func:`resume_run` is what :meth:`CheckpointManager.resume` does: rank 0 asks :func:`syncckpt.resume.find_resumable`
(or loads the explicit ``path``), broadcasts its choice, and every rank verifies and restores that one. Nothing
touches a registered object until the checkpoint has been verified, decoded and checked against it.

**Resume hooks.** A registered object takes part in resume beyond ``state_dict``/``load_state_dict`` by defining
either of two optional methods (:class:`syncckpt.ResumableSampler` does both; a stateful data loader can too):

- ``checkpoint_position(epoch, batch_idx) -> dict``: entries merged into the object's saved state, so it learns
  the loop position the checkpoint was taken at (the sampler stores ``position`` to skip that far on resume).
- ``on_resumed_pass(callback)``: run ``callback`` when the resumed pass begins. The RNG streams are re-applied
  then (after the DataLoader drew its worker seed, as the uninterrupted run had no such draw at that point); the
  first registered object that offers the hook gets it.

**Per-rank state.** Under torch.distributed, replicated state (the model, the optimizer, a
:class:`~syncckpt.ResumableSampler`, whose position counts global samples) is saved once, by rank 0. An object whose
state is its own rank's, such as a data loader's position in that rank's part of the data, is saved by every rank
and each rank gets its own copy back. :class:`~syncckpt.ResumableLoader`, :class:`~syncckpt.ShuffleBuffer`,
torchdata's ``StatefulDataLoader`` and a Hugging Face ``IterableDataset`` (after ``split_dataset_by_node`` each
rank streams other shards) are per rank; any other class says so with a class attribute
``syncckpt_per_rank = True`` (or opts out with False). A mid-epoch checkpoint holding per-rank state resumes only with
the world size that saved it (StateMismatch otherwise): another number of ranks would continue from positions
counted for the old split, training some samples twice and others never. An epoch checkpoint resumes on any.

>>> class Position:
...     def state_dict(self): return {}
...     def load_state_dict(self, state): self.saved = state
...     def checkpoint_position(self, epoch, batch_idx): return {"at": [epoch, batch_idx]}
>>> import tempfile, torch
>>> from syncckpt import CheckpointManager
>>> with CheckpointManager(tempfile.mkdtemp(), handle_sigterm=False) as mgr:
...     mgr.register(model=torch.nn.Linear(2, 2), position=Position())
...     mgr.save(7, epoch=1, batch_idx=3)
...     mgr.wait()
...     p = Position(); mgr.register(position=p); _ = mgr.resume(); p.saved
True
{'at': [1, 3]}
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from . import local, rng, sharded
from .distributed import Dist
from .errors import CheckpointCorrupt, CheckpointNotFound, NoValidCheckpoint, StateMismatch, SyncCkptError
from .format import DecodedCheckpoint, decode_checkpoint
from .manifest import Kind, Manifest
from .remote import Remote
from .resume import find_resumable, newer_valid, pull_checkpoint_url
from .snapshot import collect_state

log = logging.getLogger("syncckpt")


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
    kind: Kind = "step"
    source: str = "local"


@runtime_checkable
class SavesPosition(Protocol):
    def checkpoint_position(self, epoch: int, batch_idx: int) -> dict[str, Any]: ...


@runtime_checkable
class HooksResumedPass(Protocol):
    def on_resumed_pass(self, callback: Any) -> None: ...


def positions(objects: dict[str, Any], epoch: int, batch_idx: int) -> dict[str, dict[str, Any]]:
    """What each object that saves its position adds to its saved state at (epoch, batch_idx)."""
    return {n: o.checkpoint_position(epoch, batch_idx) for n, o in objects.items() if isinstance(o, SavesPosition)}


_PER_RANK_TYPES = (("torchdata.stateful_dataloader", "StatefulDataLoader"), ("datasets", "IterableDataset"))


def per_rank(obj: Any) -> bool:
    """Whether ``obj``'s state is its own rank's (see *Per-rank state* above): its class says so
    (``syncckpt_per_rank``), or it is a ``StatefulDataLoader`` or a Hugging Face ``IterableDataset``.

    >>> from syncckpt import ResumableLoader, ResumableSampler
    >>> per_rank(ResumableSampler(range(4), batch_size=2)), per_rank(ResumableLoader([]))
    (False, True)
    """
    declared = getattr(type(obj), "syncckpt_per_rank", None)  # the class's: a wrapper's __getattr__ is not asked
    if declared is not None:
        return bool(declared)
    types = [getattr(sys.modules[m], c, None) for m, c in _PER_RANK_TYPES if m in sys.modules]  # imported: in use
    return any(isinstance(obj, t) for t in types if isinstance(t, type))


def rank_key(name: str, rank: int) -> str:
    """Where rank ``rank`` (> 0) keeps its own copy of the per-rank object ``name`` in a checkpoint."""
    return f"{name}-rank{rank}"


def own_states(
    objects: dict[str, Any], states: dict[str, Any], rank: int, epoch: int, batch_idx: int
) -> dict[str, Any]:
    """The states a rank other than 0 saves beside its RNG: its own per-rank objects', positions included."""
    mine = {n: o for n, o in objects.items() if per_rank(o)}
    at = positions(mine, epoch, batch_idx)
    return {rank_key(n, rank): {**states[n], **at[n]} if n in at else states[n] for n in mine}


@dataclass
class Resumed:
    """What :func:`resume_run` did: the info for the loop (None: start from scratch), the manifest and the best
    metric it restored."""

    info: ResumeInfo | None
    manifest: Manifest | None = None
    best_metric: float | None = None


_Loaded = tuple[Manifest, DecodedCheckpoint, Path, str]  # manifest, decoded states, local folder, where from


def resume_run(
    objects: dict[str, Any],
    directory: Path,
    dist: Dist,
    remote: Remote | None,
    storage_options: dict[str, Any] | None,
    path: str | None,
    start_fresh_if_damaged: bool,
    inputs: list[Path] | None = None,
) -> Resumed:
    """Restore ``objects`` from ``path`` or from the newest valid checkpoint (``inputs``: read-only folders that
    are one more source); collective under torch.distributed."""
    inputs = inputs or []
    where = ", ".join([str(directory), *map(str, inputs)]) + (f" or {remote.url}" if remote is not None else "")
    fresh_noted = False
    if dist.is_main:
        try:
            if path is not None:
                loaded = _load_explicit(path, directory, storage_options)
                _refuse_older_than_saved(loaded[0], loaded[2], directory, remote)
            else:
                loaded, fresh_noted = _load_newest(directory, remote, where, start_fresh_if_damaged, inputs)
        except SyncCkptError as e:
            if dist.active:  # the other ranks wait for the choice: tell them it failed
                dist.broadcast_json({"error": f"{type(e).__name__}: {e}"})
            raise
        choice = None if loaded is None else {"path": str(loaded[2]), "source": loaded[3]}
        dist.broadcast_json({"error": None, "choice": choice})
    else:  # rank 0 chose (and pulled, when remote); every rank loads that same checkpoint
        msg = dist.broadcast_json(None)
        if msg["error"]:
            raise SyncCkptError(f"rank 0 could not resume: {msg['error']}")
        loaded = None
        if msg["choice"] is not None:
            ckpt = Path(msg["choice"]["path"])
            manifest, files = local.verify(ckpt)
            loaded = manifest, decode_checkpoint(files, str(ckpt)), ckpt, msg["choice"]["source"]
    if loaded is None:
        if not fresh_noted:
            log.info("No checkpoint found in %s; starting from scratch", where)
            _say_without_logging(f"no checkpoint found in {where}; starting from scratch")
        return Resumed(None)
    manifest, decoded, ckpt_path, source = loaded
    best = restore(objects, manifest, decoded, ckpt_path, dist)
    return Resumed(_resume_info(manifest, ckpt_path, source), manifest, best)


def _resume_info(manifest: Manifest, ckpt_path: Path, source: str) -> ResumeInfo:
    if manifest.kind == "step":  # batch_idx -1: saved without a batch index, the epoch restarts
        epoch, batch_idx = manifest.epoch, manifest.batch_idx
    else:
        epoch, batch_idx = manifest.epoch + 1, -1
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
    where = resume_point(manifest.kind, epoch, batch_idx)
    _say_without_logging(f"resuming from {ckpt_path} (global step {manifest.global_step}): {where}")
    return ResumeInfo(
        manifest.global_step,
        epoch,
        batch_idx,
        str(ckpt_path),
        dict(manifest.metrics),
        manifest.name,
        manifest.kind,
        source,
    )


def resume_point(kind: str, epoch: int, batch_idx: int) -> str:
    """Where training goes on, in words, 1-based: ``epoch``/``batch_idx`` as :class:`ResumeInfo` holds them.

    >>> resume_point("step", 0, 2), resume_point("step", 1, -1)
    ('epoch 1 after 3 batches', 'the start of epoch 2')
    >>> resume_point("epoch", 2, -1)  # a 2-epoch run has nothing left: say what was done, not only what is next
    'epoch 2 complete, next the start of epoch 3'
    """
    if batch_idx >= 0:
        return f"epoch {epoch + 1} after {batch_idx + 1} batches"
    if kind == "step":  # saved without a batch index: that epoch restarts
        return f"the start of epoch {epoch + 1}"
    return f"epoch {epoch} complete, next the start of epoch {epoch + 1}"


def _say_without_logging(message: str) -> None:
    """A notebook cell or script that set up no logging at all would see nothing of what resume decided (INFO
    lines go nowhere): print the one line that matters there. With any logging configured, the log says it."""
    if not log.hasHandlers():
        print(f"syncckpt: {message}", flush=True)


def _load_explicit(path: str, directory: Path, storage_options: dict[str, Any] | None) -> _Loaded:
    if "://" in path and not path.startswith("file://"):
        manifest, files, ckpt = pull_checkpoint_url(path, directory, storage_options)
        return manifest, decode_checkpoint(files, str(ckpt)), ckpt, "remote"
    p = Path(path.removeprefix("file://"))
    if (p / "manifest.json").exists():
        try:
            manifest, files = local.verify(p)
        except CheckpointCorrupt as e:
            raise CheckpointNotFound(f"--resume-from {p}: {e}") from None
        return manifest, decode_checkpoint(files, str(p)), p, "local"
    if p.is_dir():  # someone else's folder (a read-only input, an older run): verified, never quarantined
        search = find_resumable(p, decode=_decode, quarantine_damaged=p.resolve() == directory.resolve())
        if search.found is not None:
            f = search.found
            return f.manifest, f.decoded, f.path, f.source
    raise CheckpointNotFound(
        f"{p}: no valid checkpoint there (expected a checkpoint folder with manifest.json "
        "or a folder of checkpoint-* folders)"
    )


def _refuse_older_than_saved(manifest: Manifest, source: Path, directory: Path, remote: Remote | None) -> None:
    """Resuming an explicit checkpoint while this run's folder (or remote) holds newer valid ones would lose the
    new run: retention keeps the highest global steps, so it would delete each new checkpoint as it is committed,
    and a later automatic resume would pick the old run's newest. Refuse before anything is restored. Newer ones
    that fail verification are quarantined instead: they never block going back."""
    where = newer_valid(directory, remote, manifest)
    if where:
        raise SyncCkptError(
            f"cannot resume from {source} (global step {manifest.global_step}): newer checkpoints of an earlier "
            f"run are kept in {'; '.join(where)}. New checkpoints would be deleted by retention (it keeps the "
            "highest global steps) and a later automatic resume would pick the newer ones. Move or delete "
            "them first, or save this run elsewhere (another checkpoint directory and remote prefix)"
        )


def _load_newest(
    directory: Path, remote: Remote | None, where: str, start_fresh_if_damaged: bool, inputs: list[Path]
) -> tuple[_Loaded | None, bool]:
    """The newest valid checkpoint, or (None, whether a fresh start beside damaged ones was logged)."""
    search = find_resumable(directory, remote, decode=_decode, inputs=inputs)
    if search.found is not None:
        f = search.found
        return (f.manifest, f.decoded, f.path, f.source), False
    if not search.nothing_valid:
        return None, False
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
    log.warning("Starting from scratch as asked (start_fresh_if_damaged); the damaged checkpoints stay quarantined")
    return None, True


def _decode(manifest: Manifest, files: dict[str, bytes], path: Path) -> DecodedCheckpoint:
    return decode_checkpoint(files, str(path))


# ---- restore --------------------------------------------------------------------------------------------------
def restore(objects: dict[str, Any], manifest: Manifest, decoded: DecodedCheckpoint, path: Path, dist: Dist) -> Any:
    """Load decoded states into the registered objects (after checking they fit), then the RNG streams; returns
    the best metric the checkpoint recorded (None when it has none)."""
    states = _load_sharded(objects, decoded.states, path, dist) if decoded.sharded else decoded.states
    states = _this_ranks(objects, states, manifest, path, dist)
    missing = [n for n in objects if n not in states]
    if missing:
        raise StateMismatch(
            f"{path}: holds no state for {missing} (it has {sorted(set(states) - {'rng'})}); "
            "register the same objects as the run that saved it"
        )
    extra = sorted(n for n in set(states) - set(objects) - {"rng"} if _RANK_KEY.sub("", n) not in {"rng", *objects})
    if extra:
        log.warning("%s: state for %s is not restored (not registered)", path, extra)
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            _check_module_fits(name, obj, states[name], path)
    for name, obj in objects.items():
        try:
            obj.load_state_dict(states[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise StateMismatch(f"{path}: cannot load {name!r}: {e}") from None
    _restore_rng(objects, states, manifest, path, dist.rank)
    best = decoded.trainer.get("best_metric")
    return float(best) if isinstance(best, (int, float)) else None


_RANK_KEY = re.compile(r"-rank[0-9]+$")


def _this_ranks(
    objects: dict[str, Any], states: dict[str, Any], manifest: Manifest, path: Path, dist: Dist
) -> dict[str, Any]:
    """``states`` with each per-rank object's state replaced by this rank's own copy (rank 0's is under the plain
    name). A mid-epoch checkpoint saved by another number of ranks raises StateMismatch; at an epoch boundary
    (the next pass starts afresh on any world size) every rank loads rank 0's copy."""
    mine = sorted(n for n, o in objects.items() if per_rank(o))
    if not mine or dist.rank == 0 and manifest.world_size == dist.world_size:
        return states
    if manifest.world_size != dist.world_size:
        if manifest.kind == "step" and manifest.batch_idx >= 0:
            raise StateMismatch(
                f"{path}: {mine} hold each rank's own data position mid-epoch, saved by {manifest.world_size} "
                f"rank(s); resume with {manifest.world_size} (now {dist.world_size}), from an epoch checkpoint, or "
                "with a ResumableSampler over a map-style dataset, which resumes on any number of ranks"
            )
        return states
    out = dict(states)
    for name in mine:
        own = states.get(rank_key(name, dist.rank))
        if own is None:
            log.warning(
                "%s holds no state of %r for rank %d (saved before syncckpt kept one per rank): rank 0's is loaded",
                path,
                name,
                dist.rank,
            )
        else:
            out[name] = own
    return out


def _restore_rng(objects: dict[str, Any], states: dict[str, Any], manifest: Manifest, path: Path, rank: int) -> None:
    rng_state = states.get("rng" if rank == 0 else f"rng-rank{rank}")
    if rng_state is None:
        if rank:
            log.warning(
                "%s holds no RNG state for rank %d (saved with world size %d); this rank's random streams "
                "are not restored",
                path,
                rank,
                manifest.world_size,
            )
        return
    rng.restore(rng_state)
    if manifest.kind == "step" and manifest.batch_idx >= 0:
        # DataLoader draws its worker seed from the global RNG when the resumed pass starts; the uninterrupted
        # run had no such draw at this point, so re-apply the state after it.
        hooked = next((o for o in objects.values() if isinstance(o, HooksResumedPass)), None)
        if hooked is not None:
            hooked.on_resumed_pass(lambda s=rng_state: rng.restore(s))


def _load_sharded(objects: dict[str, Any], states: dict[str, Any], path: Path, dist: Dist) -> dict[str, Any]:
    """Fill the registered objects' own DTensors (laid out for the current world size) from the checkpoint's DCP
    shards, resharding as DCP does; collective on every rank."""
    if not dist.active:
        raise StateMismatch(f"{path} holds sharded (DTensor) state: resume it under torch.distributed")
    wanted = _dtensor_keys(states)
    sharded.ensure_optimizer_state(objects)
    _, targets = sharded.split_dtensors(collect_state(objects))
    missing = sorted(wanted - set(targets))
    if missing:
        raise StateMismatch(
            f"{path}: sharded tensors {missing[:5]} have no DTensor counterpart in the registered "
            "objects (shard the model the same way, e.g. fully_shard, before resume())"
        )
    targets = {k: v for k, v in targets.items() if k in wanted}
    sharded.load_shards(targets, path, process_group=dist.step_group)
    return {name: sharded.join_dtensors(state, targets) for name, state in states.items()}


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
