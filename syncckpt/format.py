"""State dicts <-> files: safetensors for tensors, JSON for everything else. Never pickle.

A registered object's ``state_dict()`` is split into a JSON *structure* in which every tensor is replaced by a
reference ``{"__tensor__": NAME}``, and the tensors themselves, stored under NAME in ``OBJECT.safetensors``.
Optimizer state (int keys, tuples, nested dicts) survives exactly; tied tensors (the same storage under two keys)
are stored once and both keys get the same tensor back.

The safetensors writer is ours (the format is an 8-byte header length, a JSON header, then raw bytes) because the
bytes come straight out of reusable staging buffers and are hashed as they are written. So is the reader: it checks
the header against the buffer as the ``safetensors`` library does (known dtypes, offsets back to back from 0 to
the buffer's end, each tensor's bytes = its elements x its dtype's size) and then makes every tensor a view of
the verified, writable buffer instead of a copy: the library's ``load(bytes)`` copied each tensor and was over
half of a resume's time.

>>> import torch
>>> struct, tensors = flatten_state({"w": torch.ones(2), "step": 3, "betas": (0.9, 0.99)}, "opt")
>>> struct
{'w': {'__tensor__': 'w'}, 'step': 3, 'betas': {'__tuple__': [0.9, 0.99]}}
>>> unflatten_state(struct, {"w": torch.zeros(2)})["betas"]
(0.9, 0.99)
"""

from __future__ import annotations

import base64
import json
import math
import mmap
import struct as _struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import CheckpointCorrupt, StateMismatch, StateNotSerializable, UnsafeCheckpoint

STATE_FILE = "state.json"  # every object's structure and the trainer position (rank 0); state-rankN.json per rank
DCP_DIR = "dcp"  # sharded (DTensor) leaves, written through torch.distributed.checkpoint by every rank

# torch dtype -> safetensors dtype code. Every dtype a training state can hold keeps its dtype on disk.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code

_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__", "__bytes__")


def flatten_state(state: Any, prefix: str) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """Split ``state`` into a JSON-able structure and a list of (name, tensor).

    Tensor names are the key path joined with dots (``state.0.exp_avg``), so a model's file reads like an ordinary
    safetensors state dict. Raises StateNotSerializable naming the key path of anything that is neither a tensor
    nor JSON-able.
    """
    flat = _Flattener(prefix)
    return flat.enc(state, []), flat.tensors


class _Flattener:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self._used: set[str] = set()
        self._seen: dict[tuple, str] = {}

    def _name_for(self, path: list[str]) -> str:
        base = ".".join(path) or "tensor"
        name, n = base, 1
        while name in self._used:
            name, n = f"{base}#{n}", n + 1
        self._used.add(name)
        return name

    def _add_tensor(self, t: torch.Tensor, path: list[str]) -> str:
        if t.dtype not in DTYPE_CODES:
            raise StateNotSerializable(
                f"{_where(self.prefix, path)}: tensor dtype {t.dtype} cannot be stored in safetensors"
            )
        if t.is_sparse or t.layout != torch.strided:
            raise StateNotSerializable(
                f"{_where(self.prefix, path)}: {t.layout} tensors are not supported; densify first"
            )
        key = None
        if t.numel() > 0:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in self._seen:  # tied weights: store once, hand back the same tensor to both keys
                return self._seen[key]
        name = self._name_for(path)
        self.tensors.append((name, t))
        if key is not None:
            self._seen[key] = name
        return name

    def enc(self, v: Any, path: list[str]) -> Any:
        if isinstance(v, torch.Tensor):
            return {"__tensor__": self._add_tensor(v.detach(), path)}
        if isinstance(v, np.ndarray):
            try:
                t = torch.from_numpy(np.ascontiguousarray(v).reshape(v.shape))  # keeps 0-d arrays 0-d
            except TypeError:
                where = _where(self.prefix, path)
                raise StateNotSerializable(f"{where}: numpy dtype {v.dtype} is not supported") from None
            return {"__ndarray__": self._add_tensor(t, path)}
        if isinstance(v, np.generic):
            v = v.item()
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"__float__": repr(v)}
        if isinstance(v, bytes):
            return {"__bytes__": base64.b64encode(v).decode()}
        if isinstance(v, (list, tuple)) and all(type(x) is int for x in v):  # RNG states: ~1,250 ints, one pass
            return list(v) if isinstance(v, list) else {"__tuple__": list(v)}
        if isinstance(v, tuple):  # also torch.Size
            return {"__tuple__": [self.enc(x, path + [str(i)]) for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [self.enc(x, path + [str(i)]) for i, x in enumerate(v)]
        if isinstance(v, dict):
            return self._enc_dict(v, path)
        raise StateNotSerializable(
            f"{_where(self.prefix, path)}: value of type {type(v).__module__}.{type(v).__qualname__} is neither a "
            "tensor nor JSON-able; convert it in state_dict() (syncckpt never pickles)"
        )

    def _enc_dict(self, v: dict[Any, Any], path: list[str]) -> Any:
        if all(isinstance(k, str) and k not in _MARKERS for k in v):
            return {k: self.enc(x, path + [k]) for k, x in v.items()}
        items = []
        for k, x in v.items():
            if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                raise StateNotSerializable(
                    f"{_where(self.prefix, path)}: dict key {k!r} ({type(k).__name__}) is not JSON-able"
                )
            items.append([self.enc(k, path), self.enc(x, path + [str(k)])])
        return {"__dict__": items}


def _where(prefix: str, path: list[str]) -> str:
    return "state of " + repr(".".join([prefix, *path]))


def unflatten_state(structure: Any, tensors: dict[str, torch.Tensor], *, where: str = "state") -> Any:
    """Inverse of :func:`flatten_state`. Raises StateMismatch when a referenced tensor is missing."""

    def dec(v: Any) -> Any:
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            ((k, x),) = v.items()
            if k in ("__tensor__", "__ndarray__"):
                if not isinstance(x, str) or x not in tensors:
                    raise StateMismatch(f"{where}: tensor {x!r} is referenced but missing from the checkpoint files")
                return tensors[x] if k == "__tensor__" else tensors[x].numpy()
            if k == "__tuple__" and isinstance(x, list):
                return tuple(dec(i) for i in x)
            if k == "__float__" and x in ("nan", "inf", "-inf"):
                return float(x)
            if k == "__bytes__" and isinstance(x, str):
                return base64.b64decode(x)
            if k == "__dict__" and isinstance(x, list):
                return {_hashable(dec(kk)): dec(vv) for kk, vv in x}
        return {k: dec(x) for k, x in v.items()}

    return dec(structure)


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, (list, tuple)) else k


# ---- safetensors layout -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in a file's data section (and in its staging buffer)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class FileLayout:
    """A safetensors file planned before any byte is copied: header bytes plus the slots of its data section."""

    filename: str
    header: bytes
    slots: tuple[Slot, ...]
    data_size: int

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_size


def plan_layout(
    filename: str, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> FileLayout:
    """Lay tensors out back to back, widest elements first, so every slot is naturally aligned in the buffer."""
    order = sorted(tensors, key=lambda nt: -nt[1].element_size())
    slots, header_map, off = [], {}, 0
    for name, t in order:
        nbytes = t.numel() * t.element_size()
        slots.append(Slot(name, t.dtype, tuple(t.shape), off, nbytes))
        header_map[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    header_map["__metadata__"] = {"format": "pt", **(metadata or {})}
    hjson = json.dumps(header_map, separators=(",", ":")).encode()
    hjson += b" " * (-(len(hjson) + 8) % 8)  # data section starts 8-byte aligned
    return FileLayout(filename, _struct.pack("<Q", len(hjson)) + hjson, tuple(slots), off)


def slot_view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    """A typed view of ``slot`` inside a flat uint8 staging buffer."""
    raw = buffer[slot.offset : slot.offset + slot.nbytes]
    if slot.nbytes == 0:
        return torch.empty(slot.shape, dtype=slot.dtype)
    return raw.view(slot.dtype).view(slot.shape)


def iter_file_chunks(layout: FileLayout, buffer: torch.Tensor, chunk: int = 8 << 20) -> Iterator[memoryview]:
    """The bytes of the file: its header, then the staged data section in chunks (zero-copy views)."""
    yield memoryview(layout.header)
    if layout.data_size:
        mv = memoryview(buffer[: layout.data_size].numpy())
        for start in range(0, layout.data_size, chunk):
            yield mv[start : start + chunk]


_CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def load_safetensors_bytes(data: bytes | bytearray | mmap.mmap, *, where: str) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes, after checking the header against the buffer; raises UnsafeCheckpoint.

    With a writable buffer (a ``bytearray`` or the copy-on-write mapping :func:`syncckpt.local.read_file` returns)
    every naturally aligned tensor is a view of it: no copy, and the buffer lives as long as a tensor does.
    ``bytes`` are copied into a ``bytearray`` first (a tensor must never write into an immutable object).

    >>> from safetensors.torch import save
    >>> load_safetensors_bytes(bytearray(save({"w": torch.arange(3.0)})), where="x")
    {'w': tensor([0., 1., 2.])}
    """
    header = _safetensors_header(data, where=where)
    base = 8 + _struct.unpack("<Q", data[:8])[0]
    slots = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (
            isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
        ):
            raise UnsafeCheckpoint(f"{where}: tensor {name!r} has a malformed shape or data_offsets")
        slots.append((offsets[0], offsets[1], name, shape, _CODE_DTYPES[info["dtype"]]))
    end = 0
    for begin, stop, name, shape, dtype in sorted(slots):
        if begin != end or stop - begin != math.prod(shape) * dtype.itemsize:
            raise UnsafeCheckpoint(
                f"{where}: safetensors header does not match its data (tensor {name!r} at bytes {begin}-{stop})"
            )
        end = stop
    if base + end != len(data):
        raise UnsafeCheckpoint(
            f"{where}: safetensors header does not match its data (it covers {base + end} bytes, the file has "
            f"{len(data)})"
        )
    buf = data if isinstance(data, (bytearray, mmap.mmap)) else bytearray(data)
    out = {}
    for begin, stop, name, shape, dtype in slots:
        if begin == stop:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (base + begin) % dtype.itemsize:  # not aligned for a view (another writer's layout): a copy
            out[name] = torch.frombuffer(bytearray(buf[base + begin : base + stop]), dtype=dtype).reshape(shape)
        else:
            count = (stop - begin) // dtype.itemsize
            out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + begin).reshape(shape)
    return out


def _safetensors_header(data: bytes, *, where: str) -> dict[str, Any]:
    """The JSON header of safetensors bytes, checked: bounded, an object, only dtypes this format writes."""
    if len(data) < 8:
        raise UnsafeCheckpoint(f"{where}: too short to be a safetensors file")
    (hlen,) = _struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8 or hlen > 100 << 20:
        raise UnsafeCheckpoint(
            f"{where}: not a safetensors file (its header length field says {hlen} bytes, the file has {len(data)});"
            " refusing to load it"
        )
    try:
        header = json.loads(data[8 : 8 + hlen])
    except (ValueError, RecursionError):
        raise UnsafeCheckpoint(f"{where}: safetensors header is not JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise UnsafeCheckpoint(f"{where}: safetensors header is not a JSON object")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        code = info.get("dtype") if isinstance(info, dict) else None
        if code not in DTYPE_CODES.values():
            raise UnsafeCheckpoint(f"{where}: tensor {name!r} has unsupported dtype {code!r}")
    return header


# ---- one object in one file: for folders whose layout belongs to someone else (the transformers Trainer's) ---------
_STRUCTURE_KEY = "syncckpt.structure"


def encode_object_file(state: Any, name: str) -> bytes:
    """One object's state as the bytes of a single safetensors file: its tensors, and its JSON structure (tensors
    as references, see :func:`flatten_state`) in the header's metadata. No pickle.

    >>> data = encode_object_file({"state": {0: {"step": torch.tensor(3.0)}}, "lr": [0.1]}, "optimizer")
    >>> decode_object_file(data, where="optimizer.safetensors")
    {'state': {0: {'step': tensor(3.)}}, 'lr': [0.1]}
    """
    from safetensors.torch import save

    structure, tensors = flatten_state(state, name)
    metadata = {_STRUCTURE_KEY: json.dumps(structure, allow_nan=False)}
    return save({n: t.detach().cpu().contiguous() for n, t in tensors}, metadata=metadata)


def decode_object_file(data: bytes, *, where: str) -> Any:
    """Inverse of :func:`encode_object_file`; raises UnsafeCheckpoint for anything else (a pickle, a lying header)."""
    metadata = _safetensors_header(data, where=where).get("__metadata__")
    text = metadata.get(_STRUCTURE_KEY) if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise UnsafeCheckpoint(f"{where}: not a syncckpt object file (no {_STRUCTURE_KEY!r} in its metadata)")
    try:
        structure = json.loads(text)
    except (ValueError, RecursionError):
        raise UnsafeCheckpoint(f"{where}: its structure is not JSON") from None
    return unflatten_state(structure, load_safetensors_bytes(data, where=where), where=where)


# ---- state.json: the objects' structures and the trainer position ------------------------------------------------
def encode_state(structure: dict[str, Any], trainer: dict[str, Any]) -> bytes:
    """``state.json``'s bytes: every object's structure (tensors as references) and the trainer position."""
    return json.dumps({"objects": structure, "trainer": trainer}, allow_nan=False).encode()


@dataclass
class DecodedCheckpoint:
    """A verified checkpoint's files parsed back: states by object name, the trainer position, and whether
    DTensor leaves wait in ``dcp/`` to be loaded through DCP."""

    states: dict[str, Any]
    trainer: dict[str, Any]
    sharded: bool


def decode_checkpoint(files: dict[str, bytes], where: str) -> DecodedCheckpoint:
    """Parse a verified checkpoint's files into states, touching no registered object.

    Raises CheckpointCorrupt (or UnsafeCheckpoint) for content that passed its digests but is not what it claims
    (a hostile writer controls both), so resume can fall back to an older checkpoint.

    >>> struct, _ = flatten_state({"lr": 0.1}, "opt")
    >>> decode_checkpoint({STATE_FILE: encode_state({"opt": struct}, {"global_step": 3})}, "ck").states
    {'opt': {'lr': 0.1}}
    """
    if STATE_FILE not in files:
        raise CheckpointCorrupt(f"{where}: {STATE_FILE} is missing from the manifest")
    try:
        state = json.loads(files[STATE_FILE])
        structures, trainer = state["objects"], state["trainer"]
        if not isinstance(structures, dict) or not isinstance(trainer, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointCorrupt(f"{where}/{STATE_FILE}: not a syncckpt state file") from None
    for rel, data in files.items():  # other ranks' RNG structures (distributed checkpoints)
        if rel.startswith("state-rank") and rel.endswith(".json"):
            try:
                structures.update(json.loads(data)["objects"])
            except (ValueError, KeyError, TypeError):
                raise CheckpointCorrupt(f"{where}/{rel}: not a syncckpt state file") from None
    tensors = {
        rel.removesuffix(".safetensors"): load_safetensors_bytes(data, where=f"{where}/{rel}")
        for rel, data in files.items()
        if rel.endswith(".safetensors") and not rel.startswith(DCP_DIR + "/")
    }
    try:
        states = {
            name: unflatten_state(s, tensors.get(name, {}), where=f"{where}: {name}") for name, s in structures.items()
        }
    except StateMismatch as e:  # the structure names a tensor no file holds
        raise CheckpointCorrupt(str(e)) from None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise CheckpointCorrupt(f"{where}/{STATE_FILE}: malformed state structure ({e})") from None
    return DecodedCheckpoint(states, trainer, any(rel.startswith(DCP_DIR + "/") for rel in files))


_VERSIONS: dict[str, str] = {}


def versions() -> dict[str, str]:
    """The library versions recorded in every manifest."""
    if not _VERSIONS:
        import platform

        import safetensors

        from . import __version__

        _VERSIONS.update(
            syncckpt=__version__,
            torch=torch.__version__,
            safetensors=safetensors.__version__,
            python=platform.python_version(),
        )
    return dict(_VERSIONS)
