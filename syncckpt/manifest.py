"""The manifest: what a committed checkpoint contains, and how to tell whether bytes match it.

This module is data plus pure checks. It never opens files or talks to a store: callers feed it bytes,
sizes and digests they got however they got them, so the same rules serve local folders, buckets and the Hub.

A manifest is written last (after every data file is durable). A folder without a manifest that parses
and validates is not a checkpoint.

>>> m = Manifest(name="checkpoint-step-10", kind="step", global_step=10, epoch=0, batch_idx=79,
...              files=[FileEntry("model.safetensors", 3, sha256_hex(b"abc"))])
>>> m2 = Manifest.from_bytes(m.to_bytes())
>>> m2.global_step, m2.files[0].path
(10, 'model.safetensors')
>>> verify_digest(m2.files[0], 3, sha256_hex(b"abc"))
>>> verify_digest(m2.files[0], 3, sha256_hex(b"abd"))
Traceback (most recent call last):
...
syncckpt.errors.CheckpointCorrupt: model.safetensors: SHA-256 mismatch (expected ba7816bf8f01..., got a52d159f262b...)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

from .errors import CheckpointCorrupt, UnsafeCheckpoint, UnsupportedFormat

FORMAT = "syncckpt"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LATEST_NAME = "LATEST"
Kind = Literal["step", "epoch", "best"]
KINDS: tuple[Kind, ...] = ("step", "epoch", "best")

# Hostile-input ceilings: a manifest is a few KB; a real checkpoint has a handful of files.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_FILES = 10_000
MAX_FILE_SIZE = 1 << 40  # 1 TiB: no honest single checkpoint file is this large

# checkpoint-N is how transformers' Trainer names its folders; we mirror those as step checkpoints.
_NAME_RE = re.compile(r"^(checkpoint-step-(\d+)|checkpoint-epoch-(\d+)|best_model|checkpoint-(\d+))$")
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes | memoryview) -> str:
    """SHA-256 of a byte string, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def parse_checkpoint_name(name: str) -> tuple[str, int] | None:
    """Split a checkpoint folder name into (kind, number); None when it is not one of ours.

    The number is the global step for step checkpoints, the epoch for epoch checkpoints, -1 for best_model.

    >>> parse_checkpoint_name("checkpoint-step-2000"), parse_checkpoint_name("checkpoint-epoch-3")
    (('step', 2000), ('epoch', 3))
    >>> parse_checkpoint_name("best_model"), parse_checkpoint_name("checkpoint-step-1e3")
    (('best', -1), None)
    >>> parse_checkpoint_name("checkpoint-500")  # a transformers Trainer folder
    ('step', 500)
    """
    m = _NAME_RE.match(name)
    if not m:
        return None
    if m.group(2) is not None:
        return "step", int(m.group(2))
    if m.group(3) is not None:
        return "epoch", int(m.group(3))
    if m.group(4) is not None:
        return "step", int(m.group(4))
    return "best", -1


def checkpoint_name(kind: str, number: int) -> str:
    """The folder name for a checkpoint (the seed's naming).

    >>> checkpoint_name("step", 500), checkpoint_name("epoch", 2), checkpoint_name("best", 7)
    ('checkpoint-step-500', 'checkpoint-epoch-2', 'best_model')
    """
    if kind == "step":
        return f"checkpoint-step-{int(number)}"
    if kind == "epoch":
        return f"checkpoint-epoch-{int(number)}"
    if kind == "best":
        return "best_model"
    raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")


def check_relative_path(path: str, *, where: str = "manifest") -> str:
    """Refuse any path that could leave the checkpoint folder (``..``, absolute, backslashes, odd bytes)."""
    if not isinstance(path, str) or not path:
        raise UnsafeCheckpoint(f"{where}: file path {path!r} is not a non-empty string")
    if path.startswith(("/", "\\")) or ":" in path or "\\" in path or "\x00" in path:
        raise UnsafeCheckpoint(f"{where}: file path {path!r} is absolute or not portable; refusing it")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or not _FILE_RE.match(path):
        raise UnsafeCheckpoint(f"{where}: file path {path!r} escapes the checkpoint folder or has odd characters")
    return path


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: path relative to the checkpoint folder, size in bytes, SHA-256 hex.

    In a remote run mirrored incrementally, ``parts`` lists the content-addressed blobs ``(size, sha256)`` whose
    concatenation is the file (see :mod:`syncckpt.blobs`); locally it is always None.
    """

    path: str
    size: int
    sha256: str
    parts: tuple[tuple[int, str], ...] | None = None
    crc32c: str | None = None  # 8 hex digits, when computed while writing: lets GCS vouch for an upload

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.crc32c is not None:
            d["crc32c"] = self.crc32c
        if self.parts is not None:
            d["parts"] = [[size, digest] for size, digest in self.parts]
        return d


@dataclass
class Manifest:
    """Everything resume and mirroring need to know about one checkpoint, without reading its data."""

    name: str
    kind: Kind
    global_step: int
    epoch: int
    batch_idx: int
    files: list[FileEntry]
    healthy: bool = True
    unhealthy_tensors: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=dict)
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def best_metric(self) -> float | None:
        """The best-metric value recorded at save time (``extra["best_metric"]``), when it is a number."""
        value = self.extra.get("best_metric")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @property
    def source(self) -> str | None:
        """Which tool wrote an adopted checkpoint (``extra["source"]``: "transformers", "lightning", ...)."""
        value = self.extra.get("source")
        return value if isinstance(value, str) else None

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["files"] = [f.to_dict() for f in self.files]
        d["created_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        return d

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = MANIFEST_NAME) -> Manifest:
        """Parse and validate untrusted manifest bytes; raise CheckpointCorrupt/UnsafeCheckpoint on anything odd."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise UnsafeCheckpoint(f"{where}: {len(data)} bytes is far too large for a manifest; refusing it")
        try:
            raw = json.loads(data.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointCorrupt(f"{where}: not valid JSON ({e}); the checkpoint is damaged") from None
        if not isinstance(raw, dict):
            raise CheckpointCorrupt(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("format") != FORMAT:
            raise UnsupportedFormat(f"{where}: format {raw.get('format')!r} is not a syncckpt manifest")
        version = raw.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
            raise UnsupportedFormat(
                f"{where}: format_version {version!r} is not supported by this syncckpt (reads {FORMAT_VERSION}); "
                "upgrade syncckpt to read it"
            )
        name = _get(raw, "name", str, where)
        parsed = parse_checkpoint_name(name)
        kind = _get(raw, "kind", str, where)
        if parsed is None or kind not in KINDS or parsed[0] != kind:
            raise CheckpointCorrupt(f"{where}: name {name!r} / kind {kind!r} is not a valid checkpoint identity")
        files_raw = raw.get("files")
        if not isinstance(files_raw, list) or not files_raw:
            raise CheckpointCorrupt(f"{where}: 'files' must be a non-empty list")
        if len(files_raw) > MAX_FILES:
            raise UnsafeCheckpoint(f"{where}: lists {len(files_raw)} files; refusing more than {MAX_FILES}")
        seen: set[str] = set()
        files = [_parse_file(i, fr, seen, where) for i, fr in enumerate(files_raw)]
        step = _get(raw, "global_step", int, where)
        epoch = _get(raw, "epoch", int, where)
        batch_idx = _get(raw, "batch_idx", int, where)
        if step < 0 or epoch < 0 or batch_idx < -1:
            raise CheckpointCorrupt(f"{where}: negative global_step/epoch/batch_idx")
        if kind == "step" and parsed[1] != step:
            raise CheckpointCorrupt(f"{where}: folder {name!r} does not match global_step {step}")
        metrics = raw.get("metrics") or {}
        versions = raw.get("versions") or {}
        extra = raw.get("extra") or {}
        unhealthy = raw.get("unhealthy_tensors") or []
        if not all(isinstance(x, dict) for x in (metrics, versions, extra)) or not isinstance(unhealthy, list):
            raise CheckpointCorrupt(f"{where}: metrics/versions/extra/unhealthy_tensors have the wrong type")
        created = raw.get("created", 0.0)
        if not isinstance(created, (int, float)) or isinstance(created, bool) or not _finite(created):
            raise CheckpointCorrupt(f"{where}: created {created!r} is not a number")
        healthy = raw.get("healthy", True)
        world_size = raw.get("world_size", 1)
        if not isinstance(healthy, bool) or not isinstance(world_size, int) or world_size < 1:
            raise CheckpointCorrupt(f"{where}: healthy/world_size have the wrong type")
        return cls(
            name=name,
            kind=kind,
            global_step=step,
            epoch=epoch,
            batch_idx=batch_idx,
            files=files,
            healthy=healthy,
            unhealthy_tensors=[str(x) for x in unhealthy],
            metrics=metrics,
            created=float(created),
            versions={str(k): str(v) for k, v in versions.items()},
            world_size=world_size,
            extra=extra,
        )


def _parse_file(i: int, fr: Any, seen: set[str], where: str) -> FileEntry:
    """One untrusted ``files[i]`` entry; ``seen`` collects paths so one listed twice is refused."""
    if not isinstance(fr, dict):
        raise CheckpointCorrupt(f"{where}: files[{i}] is not an object")
    path = check_relative_path(fr.get("path"), where=where)  # type: ignore[arg-type]
    if path == MANIFEST_NAME or path in seen:
        raise CheckpointCorrupt(f"{where}: file {path!r} listed twice or shadows the manifest")
    seen.add(path)
    size = fr.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise CheckpointCorrupt(f"{where}: {path}: size {size!r} is not a non-negative integer")
    if size > MAX_FILE_SIZE:
        raise UnsafeCheckpoint(f"{where}: {path} claims {size} bytes (over 1 TiB); refusing it")
    digest = fr.get("sha256")
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise CheckpointCorrupt(f"{where}: {path}: sha256 {digest!r} is not 64 lowercase hex digits")
    crc = fr.get("crc32c")
    if crc is not None and not (isinstance(crc, str) and re.fullmatch(r"[0-9a-f]{8}", crc)):
        raise CheckpointCorrupt(f"{where}: {path}: crc32c {crc!r} is not 8 lowercase hex digits")
    parts = _parse_parts(fr.get("parts"), size, f"{where}: {path}")
    return FileEntry(path, size, digest, parts, crc)


MAX_PARTS = 1_000_000


def _parse_parts(raw: Any, size: int, where: str) -> tuple[tuple[int, str], ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_PARTS:
        raise CheckpointCorrupt(f"{where}: 'parts' must be a list of [size, sha256] pairs")
    parts = []
    for item in raw:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], int)
            and not isinstance(item[0], bool)
            and 0 <= item[0] <= MAX_FILE_SIZE
            and isinstance(item[1], str)
            and _HEX64.match(item[1])
        ):
            raise CheckpointCorrupt(f"{where}: part {item!r} is not a [size, sha256] pair")
        parts.append((item[0], item[1]))
    if sum(p[0] for p in parts) != size:
        raise CheckpointCorrupt(f"{where}: parts add up to {sum(p[0] for p in parts)} bytes, file has {size}")
    return tuple(parts)


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"number {token} overflows a float")
    return value


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def _get(raw: dict[str, Any], key: str, typ: type, where: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise CheckpointCorrupt(f"{where}: {key!r} is missing or not a {typ.__name__} (got {value!r})")
    return value


@dataclass(frozen=True)
class Latest:
    """The LATEST pointer at a run's root: a hint that saves a listing; manifests stay the truth.

    >>> Latest.from_bytes(Latest("checkpoint-step-5", 5, "0" * 64).to_bytes()).name
    'checkpoint-step-5'
    """

    name: str
    global_step: int
    manifest_sha256: str

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Latest | None:
        """Parse LATEST; None when it is damaged (callers fall back to listing)."""
        try:
            raw = json.loads(data.decode("utf-8"))
            latest = cls(str(raw["name"]), int(raw["global_step"]), str(raw["manifest_sha256"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError, RecursionError):
            return None
        if parse_checkpoint_name(latest.name) is None or not _HEX64.match(latest.manifest_sha256):
            return None
        return latest


PIPELINE_MIN = 1 << 20  # HashingWriter hashes chunks this large beside the write


class HashingWriter:
    """Wrap a binary file: every byte written is hashed on the way, so no second read is needed.

    With ``crc32c=True`` the CRC32C is computed too, for a store that keeps one per object (GCS) and can then
    vouch for an upload without a download. It costs a copy of every chunk that is not ``bytes`` (google-crc32c
    takes no other buffer), about a quarter of a second per GB, so it is only asked for where a store uses it.

    >>> import io
    >>> w = HashingWriter(io.BytesIO()); _ = w.write(b"ab"); _ = w.write(memoryview(b"c"))
    >>> w.size, w.hexdigest() == sha256_hex(b"abc"), w.crc32c()
    (3, True, None)
    """

    def __init__(self, f: BinaryIO, *, crc32c: bool = False):
        self._f = f
        self._h = hashlib.sha256()
        self._crc = _crc32c() if crc32c else None
        self.size = 0
        self._pool: ThreadPoolExecutor | None = None

    def write(self, data: bytes | memoryview) -> int:
        """Hash and write ``data``. A chunk of ``PIPELINE_MIN`` bytes or more is hashed on a helper thread while
        it is written (both release the GIL), so a large file takes the longer of the two, not their sum; the
        hash of a chunk is done when ``write`` returns, so the caller may reuse its buffer."""
        if len(data) < PIPELINE_MIN:
            self._hash(data)
            n = self._f.write(data)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="syncckpt-hash")
            hashing = self._pool.submit(self._hash, data)
            try:
                n = self._f.write(data)
            finally:
                hashing.result()
        self.size += len(data)
        return n if n is not None else len(data)

    def _hash(self, data: bytes | memoryview) -> None:
        self._h.update(data)
        if self._crc is not None:
            self._crc.update(data if isinstance(data, bytes) else bytes(data))

    def close(self) -> None:
        """Stop the helper thread (the file is done, or a write failed)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def hexdigest(self) -> str:
        self.close()
        return self._h.hexdigest()

    def crc32c(self) -> str | None:
        """CRC32C of the bytes written (the checksum GCS keeps for every object); None when not asked for or
        without google-crc32c."""
        self.close()
        return self._crc.digest().hex() if self._crc is not None else None


def _crc32c():  # type: ignore[no-untyped-def]
    try:
        import google_crc32c  # comes with gcsfs; hardware-accelerated, a few ms per 100 MB
    except ImportError:
        return None
    return google_crc32c.Checksum()


def same_content(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests describe the same checkpoint bytes (a local manifest and its remote copy differ
    only in how the remote stores the files)."""
    key = lambda m: (m.name, sorted((f.path, f.size, f.sha256) for f in m.files))  # noqa: E731
    return key(a) == key(b)


def verify_digest(entry: FileEntry, size: int, digest: str) -> None:
    """Check a (size, digest) pair measured elsewhere against a manifest entry."""
    if size != entry.size:
        raise CheckpointCorrupt(f"{entry.path}: size {size} bytes, manifest says {entry.size} (truncated or altered)")
    if digest != entry.sha256:
        raise CheckpointCorrupt(
            f"{entry.path}: SHA-256 mismatch (expected {entry.sha256[:12]}..., got {digest[:12]}...)"
        )


def json_safe_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Metrics as JSON scalars: tensors and numpy numbers become floats, non-finite values become None."""
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        if v is None or isinstance(v, (bool, int, float, str)):
            out[str(k)] = v
        else:
            out[str(k)] = str(v)
    return out
