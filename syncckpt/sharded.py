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
import dataclasses
import json
import math
import os
import re
import threading
import warnings
from bisect import bisect_right, insort
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.futures import Future as TorchFuture

from ._failpoints import failpoint
from .errors import (
    CheckpointCorrupt,
    StateMismatch,
    StateNotSerializable,
    SyncCkptError,
    UnsafeCheckpoint,
    UnsupportedFormat,
)
from .format import DCP_DIR, DTYPE_CODES, plan_layout

INDEX_NAME = "index.json"
FORMAT = "syncckpt-dcp-safetensors"
FORMAT_VERSION = 1
# safetensors header metadata, as torch's HuggingFaceStorageWriter writes it (torch/distributed/checkpoint/_hf_utils)
_SHARDING_KEY = "DCP_SHARDING_INFO"
_OFFSETS_KEY = "saved_offsets"

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,200}\.safetensors$")
_MAX_DIM = 1 << 62
_DTYPES: dict[str, torch.dtype] = {str(dt).removeprefix("torch."): dt for dt in DTYPE_CODES}  # what safetensors holds


class ShardedSaveFailed(SyncCkptError):
    """A collective sharded save failed on some rank (DCP's ``CheckpointException``, which is a BaseException,
    turned into an ordinary exception); no index was written."""


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


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


def _dcp_classes():
    from torch.distributed.checkpoint import StorageReader, StorageWriter

    return StorageWriter, StorageReader


def _make_writer(root: Path):
    StorageWriter, _ = _dcp_classes()
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult

    class _ShardWriter(StorageWriter):
        """Per-rank safetensors shard files + a JSON index written by the coordinator once all shards are on disk."""

        def __init__(self) -> None:
            super().__init__()
            self.root = root
            self.written: list[str] = []
            self.is_coordinator = False

        def reset(self, checkpoint_id: Any = None) -> None:
            self.written = []

        def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
            self.is_coordinator = is_coordinator

        def prepare_local_plan(self, plan):
            fqns = set()
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    raise StateNotSerializable(f"{item.index.fqn}: not a tensor; save_shards writes tensors only")
                if item.index.fqn in fqns:  # one safetensors key per tensor per file
                    raise StateNotSerializable(f"{item.index.fqn}: several local chunks on one rank")
                fqns.add(item.index.fqn)
            self.root.mkdir(parents=True, exist_ok=True)
            if (self.root / INDEX_NAME).exists():
                raise FileExistsError(f"{self.root / INDEX_NAME} exists: save_shards needs a fresh folder")
            return plan

        def prepare_global_plan(self, plans):
            n = len(plans)
            return [
                dataclasses.replace(p, storage_data=f"shard-{i:05d}-of-{n:05d}.safetensors")
                for i, p in enumerate(plans)
            ]

        def write_data(self, plan, planner) -> TorchFuture:
            fut: TorchFuture = TorchFuture()
            results = []
            if plan.items:
                name = plan.storage_data
                tensors: dict[str, torch.Tensor] = {}
                offsets: dict[str, dict[str, list[int]]] = {}
                for item in plan.items:
                    t = planner.resolve_data(item)
                    if not isinstance(t, torch.Tensor):
                        raise StateNotSerializable(f"{item.index.fqn}: not a tensor")
                    t = t.detach().to("cpu").contiguous()
                    tensors[item.index.fqn] = t
                    offsets[item.index.fqn] = {_OFFSETS_KEY: list(item.tensor_data.chunk.offsets)}
                    results.append(
                        WriteResult(index=item.index, size_in_bytes=t.numel() * t.element_size(), storage_data=name)
                    )
                _write_safetensors(self.root / name, tensors, {_SHARDING_KEY: json.dumps(offsets)})
                self.written.append(name)
                failpoint("sharded-after-write")
            fut.set_result(results)
            return fut

        def finish(self, metadata, results) -> None:
            where: dict[tuple[str, tuple[int, ...]], str] = {}
            files: dict[str, int] = {}
            for rank, rank_results in enumerate(results):
                for wr in rank_results:
                    where[(wr.index.fqn, tuple(wr.index.offset))] = wr.storage_data
                    files[wr.storage_data] = rank
            entries: dict[str, Any] = {}
            for fqn, md in sorted(metadata.state_dict_metadata.items()):
                if not isinstance(md, TensorStorageMetadata):
                    raise StateNotSerializable(f"{fqn}: not a tensor")
                entries[fqn] = {
                    "dtype": str(md.properties.dtype).removeprefix("torch."),
                    "size": list(md.size),
                    "chunks": [
                        {"offsets": list(c.offsets), "sizes": list(c.sizes), "file": where[(fqn, tuple(c.offsets))]}
                        for c in md.chunks
                    ],
                }
            index = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "world_size": len(results),
                "files": [{"path": f, "rank": r} for f, r in sorted(files.items())],
                "tensors": entries,
            }
            tmp = self.root / (INDEX_NAME + ".tmp")
            tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
            _fsync(tmp)
            os.replace(tmp, self.root / INDEX_NAME)
            _fsync_dir(self.root)
            self.written.append(INDEX_NAME)

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
            return False

    return _ShardWriter()


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Header, then each tensor's bytes straight from its (contiguous CPU) memory, then fsync: no serialised copy
    of the whole file in memory (``safetensors.torch.save_file`` builds one)."""
    layout = plan_layout(path.name, list(tensors.items()), metadata)
    with open(path, "wb") as f:
        f.write(layout.header)
        for slot in layout.slots:
            if slot.nbytes:
                f.write(memoryview(tensors[slot.name].reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # directories cannot be opened/fsynced on some platforms
        pass


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
    writer = _make_writer(root)
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


_async_lock = threading.Lock()
_async_executor: ThreadPoolExecutor | None = None


def save_shards_async(
    tensors: Mapping[str, torch.Tensor],
    folder: Path,
    *,
    process_group: Any = None,
    executor: ThreadPoolExecutor | None = None,
) -> Future[list[str]]:
    """:func:`snapshot_shards` now (the only blocking part), then :func:`save_shards` on a background thread.

    Every rank must call it in the same order; saves run one at a time on ``executor`` (default: one shared
    worker thread), so their collectives never interleave. Pass a dedicated gloo ``process_group``.
    """
    global _async_executor
    snap = snapshot_shards(tensors)
    if executor is None:
        with _async_lock:
            if _async_executor is None:
                _async_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncckpt-shards")
            executor = _async_executor
    return executor.submit(save_shards, snap, folder, process_group=process_group)


# -------------------------------------------------------------------------------------------------------- index


@dataclasses.dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str


@dataclasses.dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    size: tuple[int, ...]
    chunks: tuple[_Chunk, ...]


def _int_list(v: Any, where: str, ndim: int | None = None) -> tuple[int, ...]:
    if not isinstance(v, list) or (ndim is not None and len(v) != ndim) or len(v) > 64:
        raise UnsafeCheckpoint(f"{where}: expected a list of {ndim if ndim is not None else 'at most 64'} ints")
    for x in v:
        if type(x) is not int or not 0 <= x < _MAX_DIM:
            raise UnsafeCheckpoint(f"{where}: {x!r} is not an int in [0, 2**62)")
    return tuple(v)


def read_index(root: Path) -> dict[str, _Entry]:
    """Parse and verify ``root/index.json`` (``root`` is ``folder/dcp``): every file it names exists, every tensor's
    chunks lie inside it, do not overlap and cover it exactly."""
    path = Path(root) / INDEX_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path} is missing: the sharded save never completed (or this is not one)") from None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise CheckpointCorrupt(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointCorrupt(f"{path}: not a {FORMAT} index")
    if doc.get("version") != FORMAT_VERSION:
        raise UnsupportedFormat(f"{path}: index version {doc.get('version')!r}; this release reads {FORMAT_VERSION}")
    files_doc, tensors_doc = doc.get("files"), doc.get("tensors")
    if not isinstance(files_doc, list) or not isinstance(tensors_doc, dict):
        raise CheckpointCorrupt(f"{path}: 'files' must be a list and 'tensors' an object")
    files: set[str] = set()
    for f in files_doc:
        name = f.get("path") if isinstance(f, dict) else None
        if not isinstance(name, str) or not _FILE_NAME.match(name):
            raise UnsafeCheckpoint(f"{path}: bad shard file name {name!r}")
        if not (Path(root) / name).is_file():
            raise CheckpointCorrupt(f"{path}: shard {name} is missing")
        files.add(name)
    out: dict[str, _Entry] = {}
    for fqn, e in tensors_doc.items():
        where = f"{path}: {fqn}"
        if not isinstance(e, dict) or not isinstance(e.get("chunks"), list) or e.get("dtype") not in _DTYPES:
            raise CheckpointCorrupt(f"{where}: bad entry (dtype must be one of {sorted(_DTYPES)})")
        size = _int_list(e.get("size"), f"{where}: size")
        chunks = []
        for c in e["chunks"]:
            if not isinstance(c, dict) or c.get("file") not in files:
                raise CheckpointCorrupt(f"{where}: chunk {c!r} names no listed shard file")
            chunks.append(
                _Chunk(
                    _int_list(c.get("offsets"), f"{where}: offsets", len(size)),
                    _int_list(c.get("sizes"), f"{where}: sizes", len(size)),
                    c["file"],
                )
            )
        _check_cover(where, size, chunks)
        out[fqn] = _Entry(_DTYPES[e["dtype"]], size, tuple(chunks))
    return out


def _check_cover(where: str, size: tuple[int, ...], chunks: list[_Chunk]) -> None:
    """Chunks inside the tensor, pairwise disjoint, volumes summing to the tensor's: an exact cover."""
    if not chunks:
        raise CheckpointCorrupt(f"{where}: no chunks")
    volume = 0
    for c in chunks:
        if any(o + s > n for o, s, n in zip(c.offsets, c.sizes, size, strict=True)):
            raise UnsafeCheckpoint(f"{where}: chunk at {list(c.offsets)} of {list(c.sizes)} exceeds {list(size)}")
        volume += math.prod(c.sizes)
    if volume != math.prod(size):
        raise CheckpointCorrupt(f"{where}: chunks hold {volume} elements, the tensor has {math.prod(size)}")
    if len(size) == 0 or len(chunks) == 1:
        return
    # sweep along the longest dim (as DCP's own save-plan validation does): only chunks whose intervals on that
    # dim are still open can overlap the current one
    dim = max(range(len(size)), key=lambda d: size[d])
    active: list[tuple[int, int]] = []
    for i in sorted(range(len(chunks)), key=lambda i: (chunks[i].offsets[dim], chunks[i].offsets)):
        c = chunks[i]
        if math.prod(c.sizes) == 0:
            continue
        start = c.offsets[dim]
        del active[: bisect_right(active, (start, len(chunks)))]
        for _, j in active:
            o = chunks[j]
            if all(a < b + t and b < a + s for a, s, b, t in zip(c.offsets, c.sizes, o.offsets, o.sizes, strict=True)):
                raise CheckpointCorrupt(f"{where}: chunks at {list(c.offsets)} and {list(o.offsets)} overlap")
        insort(active, (start + c.sizes[dim], i))


# -------------------------------------------------------------------------------------------------------- load


def _make_reader(root: Path, index: dict[str, _Entry]):
    _, StorageReader = _dcp_classes()
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    class _ShardReader(StorageReader):
        """DCP metadata from our JSON index; tensor slices from the shard files through ``safe_open``."""

        def __init__(self) -> None:
            super().__init__()
            self.root = root
            self.files: dict[MetadataIndex, _Chunk] = {}

        def reset(self, checkpoint_id: Any = None) -> None:
            pass

        def read_metadata(self) -> Metadata:
            sd_md, storage = {}, {}
            for fqn, e in index.items():
                sd_md[fqn] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=e.dtype),
                    size=torch.Size(e.size),
                    chunks=[
                        ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in e.chunks
                    ],
                )
                for c in e.chunks:
                    storage[MetadataIndex(fqn, c.offsets)] = c
            return Metadata(state_dict_metadata=sd_md, storage_data=storage)

        def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kw: Any) -> None:
            self.files = metadata.storage_data

        def prepare_local_plan(self, plan):
            return plan

        def prepare_global_plan(self, plans):
            return plans

        def read_data(self, plan, planner) -> TorchFuture:
            from safetensors import safe_open

            per_file: dict[str, list[Any]] = {}
            for req in plan.items:
                per_file.setdefault(self.files[req.storage_index].file, []).append(req)
            for name, reqs in per_file.items():
                path = self.root / name
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    try:
                        saved = json.loads((f.metadata() or {})[_SHARDING_KEY])
                    except (KeyError, ValueError):
                        raise CheckpointCorrupt(f"{path}: no {_SHARDING_KEY} header") from None
                    keys = set(f.keys())
                    for req in reqs:
                        fqn, chunk = req.storage_index.fqn, self.files[req.storage_index]
                        entry = index[fqn]
                        if (
                            fqn not in keys
                            or not isinstance(saved.get(fqn), dict)
                            or list(saved[fqn].get(_OFFSETS_KEY, ())) != list(chunk.offsets)
                        ):
                            raise CheckpointCorrupt(f"{path}: no chunk of {fqn} at {list(chunk.offsets)}")
                        if tuple(f.get_slice(fqn).get_shape()) != chunk.sizes:
                            raise CheckpointCorrupt(
                                f"{path}: {fqn} has shape {f.get_slice(fqn).get_shape()}, the "
                                f"index says {list(chunk.sizes)}"
                            )
                        if all(o == 0 for o in req.storage_offsets) and tuple(req.lengths) == chunk.sizes:
                            src = f.get_tensor(fqn)  # the whole chunk (also scalars and empty chunks)
                        else:
                            src = f.get_slice(fqn)[
                                tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths, strict=True))
                            ]
                        if src.dtype != entry.dtype:
                            raise CheckpointCorrupt(f"{path}: {fqn} is {src.dtype}, the index says {entry.dtype}")
                        dst = planner.resolve_tensor(req).detach()
                        if dst.shape != src.shape:
                            raise CheckpointCorrupt(f"{path}: {fqn}: read {list(src.shape)} for {list(dst.shape)}")
                        dst.copy_(src)
                        planner.commit_tensor(req, dst)
            fut: TorchFuture = TorchFuture()
            fut.set_result(None)
            return fut

        @classmethod
        def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
            return False

    return _ShardReader()


def _check_targets(targets: Mapping[str, torch.Tensor], index: dict[str, _Entry], strict: bool) -> None:
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

    root = Path(folder) / DCP_DIR
    error: BaseException | None = None
    try:
        index = read_index(root)
        _check_targets(targets, index, strict)
        planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
        with _quiet(), torch.no_grad():  # no_dist on purpose: see the module docstring
            dcp.load(dict(targets), storage_reader=_make_reader(root, index), planner=planner, no_dist=True)
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
