"""DCP storage for sharded checkpoints: per-rank safetensors shard files plus a JSON index, and the reader that
serves DCP's resharding load from them. Imported only when a sharded save or load runs (it imports
``torch.distributed.checkpoint``); :mod:`syncckpt.sharded` is the API and explains the format and its guarantees.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from bisect import bisect_right, insort
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.distributed.checkpoint import StorageReader, StorageWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future as TorchFuture

from ._failpoints import failpoint
from .errors import CheckpointCorrupt, StateNotSerializable, UnsafeCheckpoint, UnsupportedFormat
from .format import DTYPE_CODES, plan_layout
from .local import fsync_dir

INDEX_NAME = "index.json"
FORMAT = "syncckpt-dcp-safetensors"
FORMAT_VERSION = 1
# safetensors header metadata, as torch's HuggingFaceStorageWriter writes it (torch/distributed/checkpoint/_hf_utils)
_SHARDING_KEY = "DCP_SHARDING_INFO"
_OFFSETS_KEY = "saved_offsets"

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,200}\.safetensors$")
_MAX_DIM = 1 << 62
_DTYPES: dict[str, torch.dtype] = {str(dt).removeprefix("torch."): dt for dt in DTYPE_CODES}  # what safetensors holds


# ---- save ---------------------------------------------------------------------------------------------------
class ShardWriter(StorageWriter):
    """Per-rank safetensors shard files + a JSON index written by the coordinator once all shards are on disk."""

    def __init__(self, root: Path) -> None:
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
            dataclasses.replace(p, storage_data=f"shard-{i:05d}-of-{n:05d}.safetensors") for i, p in enumerate(plans)
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
            write_safetensors(self.root / name, tensors, {_SHARDING_KEY: json.dumps(offsets)})
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
        with open(tmp, "w") as f:
            f.write(json.dumps(index, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / INDEX_NAME)
        fsync_dir(self.root)
        self.written.append(INDEX_NAME)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
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


# ---- the index ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str


@dataclasses.dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]


def _int_list(v: Any, where: str, ndim: int | None = None) -> tuple[int, ...]:
    if not isinstance(v, list) or (ndim is not None and len(v) != ndim) or len(v) > 64:
        raise UnsafeCheckpoint(f"{where}: expected a list of {ndim if ndim is not None else 'at most 64'} ints")
    for x in v:
        if type(x) is not int or not 0 <= x < _MAX_DIM:
            raise UnsafeCheckpoint(f"{where}: {x!r} is not an int in [0, 2**62)")
    return tuple(v)


def read_index(root: Path) -> dict[str, Entry]:
    """Parse and verify ``root/index.json`` (``root`` is ``folder/dcp``): every file it names has a shard's name,
    every tensor's chunks lie inside it, do not overlap and cover it exactly. Whether a shard is there is checked
    when it is read (:class:`ShardReader`): a node-local folder holds only its own ranks' shards."""
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
        files.add(name)
    out: dict[str, Entry] = {}
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
                Chunk(
                    _int_list(c.get("offsets"), f"{where}: offsets", len(size)),
                    _int_list(c.get("sizes"), f"{where}: sizes", len(size)),
                    c["file"],
                )
            )
        _check_cover(where, size, chunks)
        out[fqn] = Entry(_DTYPES[e["dtype"]], size, tuple(chunks))
    return out


def _check_cover(where: str, size: tuple[int, ...], chunks: list[Chunk]) -> None:
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


# ---- load ---------------------------------------------------------------------------------------------------
class ShardReader(StorageReader):
    """DCP metadata from our JSON index; tensor slices from the shard files through ``safe_open``."""

    def __init__(self, root: Path, index: dict[str, Entry]) -> None:
        super().__init__()
        self.root = root
        self.index = index
        self.files: dict[MetadataIndex, Chunk] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self) -> Metadata:
        sd_md, storage = {}, {}
        for fqn, e in self.index.items():
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
        per_file: dict[str, list[Any]] = {}
        for req in plan.items:
            per_file.setdefault(self.files[req.storage_index].file, []).append(req)
        for name, reqs in per_file.items():
            path = self.root / name
            if not path.is_file():
                raise CheckpointCorrupt(
                    f"{self.root / INDEX_NAME}: shard {name} is missing (on a node without a shared disk: another "
                    "node's shard, which this rank's layout needs; resume with the layout the checkpoint was saved in)"
                )
            with safe_open(str(path), framework="pt", device="cpu") as f:
                try:
                    saved = json.loads((f.metadata() or {})[_SHARDING_KEY])
                except (KeyError, ValueError):
                    raise CheckpointCorrupt(f"{path}: no {_SHARDING_KEY} header") from None
                keys = set(f.keys())
                for req in reqs:
                    dst = planner.resolve_tensor(req).detach()
                    dst.copy_(self._read_chunk(f, path, saved, keys, req, dst.shape))
                    planner.commit_tensor(req, dst)
        fut: TorchFuture = TorchFuture()
        fut.set_result(None)
        return fut

    def _read_chunk(self, f: Any, path: Path, saved: Any, keys: set[str], req: Any, shape: torch.Size) -> torch.Tensor:
        """The slice ``req`` asks for, after checking the shard file holds the chunk the index promises."""
        fqn, chunk = req.storage_index.fqn, self.files[req.storage_index]
        entry = self.index[fqn]
        if (
            fqn not in keys
            or not isinstance(saved.get(fqn), dict)
            or list(saved[fqn].get(_OFFSETS_KEY, ())) != list(chunk.offsets)
        ):
            raise CheckpointCorrupt(f"{path}: no chunk of {fqn} at {list(chunk.offsets)}")
        if tuple(f.get_slice(fqn).get_shape()) != chunk.sizes:
            raise CheckpointCorrupt(
                f"{path}: {fqn} has shape {f.get_slice(fqn).get_shape()}, the index says {list(chunk.sizes)}"
            )
        if all(o == 0 for o in req.storage_offsets) and tuple(req.lengths) == chunk.sizes:
            src = f.get_tensor(fqn)  # the whole chunk (also scalars and empty chunks)
        else:
            window = tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths, strict=True))
            src = f.get_slice(fqn)[window]
        if src.dtype != entry.dtype:
            raise CheckpointCorrupt(f"{path}: {fqn} is {src.dtype}, the index says {entry.dtype}")
        if shape != src.shape:
            raise CheckpointCorrupt(f"{path}: {fqn}: read {list(src.shape)} for {list(shape)}")
        return src

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False
