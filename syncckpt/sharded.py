"""Sharded state (FSDP2 / DTensor) through ``torch.distributed.checkpoint`` (DCP), without pickle.

Every rank writes its own shard file, ``dcp/shard-RRRRR-of-NNNNN.safetensors``, holding the chunks of the tensors
DCP's planner assigned to it (its local DTensor shards; replicated plain tensors are deduplicated onto one rank).
Rank 0 (DCP's coordinator) then writes ``dcp/index.json``: every tensor's dtype, global size and chunks, and which
file holds each chunk. The index is written only after every rank has reported its shard written and fsynced, so
a rank dying mid-save leaves no index, and :func:`save_shards` does not return on rank 0.

Loading goes through ``dcp.load`` with DCP's default planner, so DTensors laid out for another world size (or plain
tensors, world size 1) are filled by resharding: each rank reads just the overlapping slices of the chunks it
needs. Nothing is unpickled: the index is JSON, shards are read with ``safetensors.safe_open``, and ``dcp.load``
runs with ``no_dist=True`` on every rank (loading needs no coordination: the index is the complete, global plan),
which also keeps DCP's pickling object collectives (``all_gather_object`` & co.) out of the load path. A final
``all_reduce`` of an error flag makes every rank fail if any rank failed.

Why not ``HuggingFaceStorageWriter``/``Reader`` (torch 2.13)? They are pickle-free, and the reader reshards, but in
``save_distributed`` mode nothing marks a save complete: the reader globs ``*.safetensors`` in the folder and
builds the metadata from whatever files it finds, so a save cut short by a dead rank, or stray files of an older
attempt, load silently (DCP does not check that the chunks cover a tensor; uncovered parts keep their old values).
Our shard files use the same header convention (``DCP_SHARDING_INFO`` with ``saved_offsets``), so the HF reader
can still read them, but we load only what the index lists and check it covers every tensor.

Saving uses ``dcp.save`` with the given process group; DCP exchanges its save *plans* between ranks with
``gather_object``/``scatter_object_list`` (pickle, in memory, between the job's own ranks; nothing pickled reaches
a file). Only tensors go through DCP: non-tensor state belongs in the caller's JSON.

What blocks whom:

* :func:`snapshot_shards` (training thread, not collective): one synchronous copy of each local shard (and each
  plain tensor) into fresh CPU memory. This is all the training loop waits for; extra host memory is one copy of
  this rank's part of the state.
* :func:`save_shards` on a background thread, given that snapshot: two object collectives (plans), writing and
  fsyncing this rank's shard straight from the snapshot memory (no serialised copy), one gather of the write
  results, rank 0 writing the index, one broadcast. The training thread is never involved, but ``process_group``
  is busy throughout, so give it a group of its own (gloo). Every rank returns only after the index is on disk.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import (
    CheckpointCorrupt,
    StateMismatch,
    StateNotSerializable,
    SyncCkptError,
)
from .format import DCP_DIR, DTYPE_CODES


class ShardedSaveFailed(SyncCkptError):
    """A collective sharded save failed on some rank (DCP's ``CheckpointException``, which is a BaseException,
    turned into an ordinary exception); no index was written."""


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_shard_file(rel: str) -> bool:
    """Whether ``rel`` (a checkpoint file's path) is one rank's DCP shard; the index beside them is not.

    >>> is_shard_file("dcp/shard-00001-of-00002.safetensors"), is_shard_file("dcp/index.json")
    (True, False)
    """
    return rel.startswith(f"{DCP_DIR}/") and rel.endswith(".safetensors")


def has_dtensors(tensors: Mapping[str, Any]) -> bool:
    """True if any value is a DTensor (FSDP2 / tensor-parallel state that must be saved sharded)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors.values())


# ---------------------------------------------------------------------------------------------------- snapshot


class ShardSnapshot(dict):
    """``{name: tensor}`` of host copies made by :func:`snapshot_shards`: DTensors keep their mesh and placements
    but their local shard now lives in fresh, contiguous CPU memory owned by the snapshot."""


def snapshot_shards(tensors: Mapping[str, torch.Tensor]) -> ShardSnapshot:
    """Copy this rank's part of ``tensors`` to CPU (DTensors: the local shard only). Not collective.

    This is the part of a save the training loop has to wait for; afterwards the training thread may modify the
    originals while :func:`save_shards` writes the snapshot from another thread. Device-to-host copies are
    synchronous. Peak extra host memory: one copy of this rank's shards.
    """
    if isinstance(tensors, ShardSnapshot):
        return tensors
    dtensor = _dtensor_type()
    snap = ShardSnapshot()
    with torch.no_grad():
        for name, t in tensors.items():
            _check_name(name)
            if dtensor is not None and isinstance(t, dtensor):
                if any(p.is_partial() for p in t.placements):
                    raise StateNotSerializable(
                        f"{name}: DTensor with Partial placement {t.placements}; reduce it (redistribute to "
                        "Replicate/Shard) before saving"
                    )
                local = t.to_local().detach()
                _check_tensor(name, local)
                copy = torch.empty(local.shape, dtype=local.dtype, device="cpu")
                copy.copy_(local)
                # The private constructor keeps the spec (mesh, placements, global shape) with a CPU local tensor;
                # DTensor.from_local would move it back to the mesh's device. DCP's own CPU staging does the same.
                snap[name] = dtensor(copy, t._spec, requires_grad=False)
            elif isinstance(t, torch.Tensor):
                _check_tensor(name, t)
                copy = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                copy.copy_(t.detach())
                snap[name] = copy
            else:
                raise StateNotSerializable(
                    f"{name}: {type(t).__name__} is not a tensor; only tensors go through save_shards (put "
                    "other state in the checkpoint's JSON)"
                )
    return snap


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or len(name) > 1000:
        raise StateNotSerializable(f"tensor names must be non-empty strings (at most 1000 chars), got {name!r}")


def _check_tensor(name: str, t: torch.Tensor) -> None:
    if t.dtype not in DTYPE_CODES:
        raise StateNotSerializable(f"{name}: tensor dtype {t.dtype} cannot be stored in safetensors")
    if t.layout != torch.strided:
        raise StateNotSerializable(f"{name}: {t.layout} tensors are not supported; densify first")


# -------------------------------------------------------------------------------------------------------- save


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save/load in a single process" (it is). ``catch_warnings`` swaps
    process-wide state, so only on the main thread; elsewhere Python's default filter shows it once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to (save|load) in a single process")
        yield


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def save_shards(tensors: Mapping[str, torch.Tensor], folder: Path, *, process_group: Any = None) -> list[str]:
    """Collective: write ``tensors`` (same names on every rank) into ``folder/dcp`` through DCP.

    Returns the paths (relative to ``folder``, posix) of the files this rank wrote: its shard (none if DCP gave it
    nothing to write) and, on rank 0 of ``process_group``, ``dcp/index.json``, written last, after every rank's
    shard is fsynced. Pass a :class:`ShardSnapshot` (from :func:`snapshot_shards`, taken on the training thread)
    to write from a background thread while training continues; anything else is snapshotted here first.
    ``process_group`` (default: the default group) carries DCP's coordination; use a dedicated gloo group when
    calling from a background thread. ``folder/dcp`` must not hold a finished index.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    snap = snapshot_shards(tensors)
    root = Path(folder) / DCP_DIR
    from ._dcp_storage import ShardWriter

    writer = ShardWriter(root)
    planner = DefaultSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    try:
        if _distributed():
            dcp.save(dict(snap), storage_writer=writer, planner=planner, process_group=process_group)
        else:
            with _quiet():
                dcp.save(dict(snap), storage_writer=writer, planner=planner, no_dist=True)
    except CheckpointException as e:
        rank, (first, _) = min(e.failures.items())
        raise ShardedSaveFailed(
            f"sharded save to {root} failed on rank(s) {sorted(e.failures)}; rank {rank}: "
            f"{type(first).__name__}: {first}"
        ) from (first if isinstance(first, Exception) else None)
    return [f"{DCP_DIR}/{name}" for name in writer.written]


def read_index(root: Path) -> dict[str, Any]:
    """Parse and verify ``root/index.json`` (``root`` is ``folder/dcp``): every file it names has a shard's name,
    every tensor's chunks lie inside it, do not overlap and cover it exactly. Tensor name -> entry (dtype, size,
    chunks). A shard file is looked for when a load reads it: a node without a shared disk holds only its own
    ranks' shards."""
    from ._dcp_storage import read_index as parse

    return parse(root)


def _check_targets(targets: Mapping[str, torch.Tensor], index: dict[str, Any], strict: bool) -> None:
    problems = []
    for name, t in targets.items():
        _check_name(name)
        if not isinstance(t, torch.Tensor):
            raise StateNotSerializable(f"{name}: load target {type(t).__name__} is not a tensor")
        e = index.get(name)
        if e is None:
            problems.append(f"{name}: not in the checkpoint")
        elif tuple(t.shape) != e.size or t.dtype != e.dtype:
            problems.append(f"{name}: checkpoint has {e.dtype} {list(e.size)}, target is {t.dtype} {list(t.shape)}")
    if strict:
        problems += [f"{name}: in the checkpoint but not among the targets" for name in index if name not in targets]
    if problems:
        raise StateMismatch("sharded state does not fit: " + "; ".join(problems[:20]))


def load_shards(
    targets: Mapping[str, torch.Tensor], folder: Path, *, process_group: Any = None, strict: bool = True
) -> None:
    """Collective: fill ``targets`` in place from ``folder/dcp``, resharding to the targets' current layout.

    Targets are DTensors laid out for the current mesh (any world size DCP can reshard to) or plain tensors; names,
    global shapes and dtypes must match the checkpoint (``strict``: and no checkpoint tensor may be left out).
    Reads only JSON and safetensors; never unpickles. If any rank fails, every rank raises (after the failure the
    targets may be partly overwritten: do not train on). ``process_group`` only carries that final error flag
    (an ``all_reduce``; the backend's device: CPU for gloo).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from ._dcp_storage import ShardReader

    root = Path(folder) / DCP_DIR
    error: BaseException | None = None
    try:
        index = read_index(root)
        _check_targets(targets, index, strict)
        planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
        with _quiet(), torch.no_grad():  # no_dist on purpose: see the module docstring
            dcp.load(dict(targets), storage_reader=ShardReader(root, index), planner=planner, no_dist=True)
    except CheckpointException as e:  # no_dist: the original exception object of this rank, unpickled by no one
        error = min(e.failures.items())[1][0]
    except Exception as e:
        error = e
    if _distributed():
        backend = str(dist.get_backend(process_group))
        device = "cpu" if "gloo" in backend or not torch.cuda.is_available() else "cuda"
        flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
        if error is None and int(flag.item()):
            raise CheckpointCorrupt(f"another rank failed to load the sharded state from {root}")
    if error is not None:
        raise error


# ---- the manager's side: DTensor leaves out of a state, and back in -------------------------------------------
DTENSOR_MARKER = "__dtensor__"


def split_dtensors(states: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Replace every DTensor leaf of ``states`` (name -> state_dict) by ``{"__dtensor__": KEY}`` and return the
    DTensors by KEY (``object/key.path``), ready for :func:`snapshot_shards`; plain tensors stay where they are.

    >>> split_dtensors({"model": {"w": torch.ones(1)}})
    ({'model': {'w': tensor([1.])}}, {})
    """
    dtensor = _dtensor_type()
    found: dict[str, torch.Tensor] = {}
    if dtensor is None:
        return states, found

    def walk(v: Any, path: list[str]) -> Any:
        if isinstance(v, dtensor):
            key = path[0] + "/" + ".".join(path[1:])
            found[key] = v
            return {DTENSOR_MARKER: key}
        if isinstance(v, dict):
            return type(v)((k, walk(x, path + [str(k)])) for k, x in v.items())
        if isinstance(v, list):
            return [walk(x, path + [str(i)]) for i, x in enumerate(v)]
        if isinstance(v, tuple) and not hasattr(v, "_fields"):
            return tuple(walk(x, path + [str(i)]) for i, x in enumerate(v))
        return v

    out = {name: walk(state, [name]) for name, state in states.items()}
    return (out, found) if found else (states, found)


def join_dtensors(state: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Put tensors back where :func:`split_dtensors` left markers."""
    if isinstance(state, dict):
        if len(state) == 1 and DTENSOR_MARKER in state:
            key = state[DTENSOR_MARKER]
            if key not in tensors:
                raise StateMismatch(f"sharded tensor {key!r} has no counterpart in the registered objects")
            return tensors[key]
        return type(state)((k, join_dtensors(v, tensors)) for k, v in state.items())
    if isinstance(state, list):
        return [join_dtensors(v, tensors) for v in state]
    if isinstance(state, tuple):
        return tuple(join_dtensors(v, tensors) for v in state)
    return state


def ensure_optimizer_state(objects: Mapping[str, Any]) -> None:
    """A fresh optimizer has no state tensors to load shards into: create them as DCP does (a zero-lr step)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    for obj in objects.values():
        if isinstance(obj, torch.optim.Optimizer) and not obj.state:
            _init_optim_state(obj)
