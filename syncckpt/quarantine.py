"""Checkpoints that failed verification: kept aside for a human, out of every listing, never chosen, never counted.

A damaged checkpoint must not steer anything after resume skipped it: retention would keep it as the newest and
delete every new checkpoint as it lands, ``--resume-from`` an older one would be refused because of it, and prune
would keep it over a valid one. So a checkpoint that fails verification is *quarantined*, never deleted silently:

- **Local folder**: renamed to ``.quarantine-NAME-<time>`` (one atomic rename, so it leaves every listing at
  once and its name is free for the new run's checkpoint of the same step), with the reason written into
  ``QUARANTINE.json`` inside it. Leftover cleanup never touches these folders; ``syncckpt rm`` deletes them.
- **Remote run**: object stores cannot rename a folder atomically, so an index object ``QUARANTINE.json`` at the
  run's root maps each quarantined name to its manifest's SHA-256 and the reason. Every remote listing honours it
  (``pull.remote_listing``). Keyed by the manifest digest, an entry is also the verification cache: the same
  bytes are never hashed again, while a newer commit under the same name (new manifest) is a new checkpoint.

Health is a separate rule: an unhealthy checkpoint (non-finite weights) is intact and verifies; it is never
quarantined, only ranked after healthy ones.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> (d / "checkpoint-step-15").mkdir()
>>> q = quarantine_local(d, "checkpoint-step-15", "model.safetensors: SHA-256 mismatch")
>>> [p.name.startswith(".quarantine-checkpoint-step-15-") for p in d.iterdir()]
[True]
>>> [(x.name, x.reason) for x in list_local(d)]
[('checkpoint-step-15', 'model.safetensors: SHA-256 mismatch')]
>>> index = add_entry({}, "checkpoint-step-15", "ab" * 32, "flipped byte", at=0.0)
>>> is_quarantined(index, "checkpoint-step-15", "ab" * 32), is_quarantined(index, "checkpoint-step-15", "cd" * 32)
(True, False)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._failpoints import failpoint
from .errors import UnsafeCheckpoint
from .manifest import parse_checkpoint_name

if TYPE_CHECKING:
    from .remote import Remote

log = logging.getLogger("syncckpt")

LOCAL_PREFIX = ".quarantine-"
REASON_FILE = "QUARANTINE.json"
INDEX_NAME = "QUARANTINE.json"
_MAX_INDEX_BYTES = 4 * 1024 * 1024
_MAX_REASON = 2000


@dataclass(frozen=True)
class Quarantined:
    """One quarantined checkpoint: its original name, where it is kept, why, and since when (Unix time)."""

    name: str
    location: str  # "local" or "remote"
    where: str  # the renamed local folder, or the remote checkpoint's URL
    reason: str
    at: float | None


# ---- local ------------------------------------------------------------------------------------------------------
def quarantine_local(directory: Path, name: str, reason: str) -> Quarantined | None:
    """Move ``directory/name`` out of view; None when it is not there any more (or cannot be moved: then it stays
    and the caller's warning is all that happens; a read-only folder is never written to)."""
    if parse_checkpoint_name(name) is None:
        raise UnsafeCheckpoint(f"refusing to quarantine {name!r}: not a checkpoint folder name")
    directory = Path(directory)
    src = directory / name
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    dst = directory / f"{LOCAL_PREFIX}{name}-{stamp}"
    n = 1
    while dst.exists():
        n += 1
        dst = directory / f"{LOCAL_PREFIX}{name}-{stamp}.{n}"
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("Could not quarantine %s (%s); it stays where it is", src, e.strerror or e)
        return None
    failpoint("quarantine-rename")
    record = {"name": name, "reason": reason[:_MAX_REASON], "at": time.time()}
    try:  # the rename already took it out of view; the reason is for the human who looks later
        (dst / REASON_FILE).write_text(json.dumps(record, indent=1) + "\n")
    except OSError:
        pass
    return Quarantined(name, "local", str(dst), record["reason"], record["at"])


def list_local(directory: Path) -> list[Quarantined]:
    """Quarantined checkpoints of a local folder, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for p in sorted(directory.iterdir()):
        if not p.is_dir() or not p.name.startswith(LOCAL_PREFIX):
            continue
        name, reason, at = p.name[len(LOCAL_PREFIX) :].rsplit("-", 1)[0], "reason unknown (interrupted)", None
        try:
            raw = json.loads((p / REASON_FILE).read_text())
            name, reason, at = str(raw["name"]), str(raw["reason"]), float(raw["at"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        out.append(Quarantined(name, "local", str(p), reason, at))
    return sorted(out, key=lambda q: (q.at or 0.0, q.where))


def delete_local(directory: Path, name: str) -> list[str]:
    """Delete the quarantined copies of checkpoint ``name``; returns the folders removed."""
    gone = []
    for q in list_local(directory):
        if q.name == name:
            shutil.rmtree(q.where, ignore_errors=True)
            gone.append(q.where)
    return gone


# ---- remote: the index is plain data, read and written whole -------------------------------------------------
def is_quarantined(index: dict[str, dict[str, Any]], name: str, manifest_sha256: str | None) -> bool:
    """Whether ``name`` with this manifest is quarantined; ``None`` digest: the manifest could not be read."""
    entry = index.get(name)
    return entry is not None and entry.get("manifest_sha256") == manifest_sha256


def add_entry(
    index: dict[str, dict[str, Any]], name: str, manifest_sha256: str | None, reason: str, *, at: float
) -> dict[str, dict[str, Any]]:
    """A new index with ``name`` quarantined (pure)."""
    return {**index, name: {"manifest_sha256": manifest_sha256, "reason": reason[:_MAX_REASON], "at": at}}


def read_index(remote: Remote) -> dict[str, dict[str, Any]]:
    """The run's quarantine index; empty when there is none. A damaged index is ignored with a warning: it only
    ever hides checkpoints, so ignoring it can cost a re-verification, never a valid checkpoint."""
    try:
        data = remote.read_bytes(INDEX_NAME, max_size=_MAX_INDEX_BYTES)
    except FileNotFoundError:
        return {}
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise TypeError
        return {
            str(k): {"manifest_sha256": v.get("manifest_sha256"), "reason": str(v.get("reason", "")), "at": v.get("at")}
            for k, v in raw.items()
            if isinstance(v, dict) and parse_checkpoint_name(str(k)) is not None
        }
    except (ValueError, TypeError, AttributeError, RecursionError):
        log.warning("%s/%s is damaged; ignoring it", remote.url, INDEX_NAME)
        return {}


def write_index(remote: Remote, index: dict[str, dict[str, Any]]) -> None:
    if index:
        remote.write_bytes(INDEX_NAME, json.dumps(index, indent=1, sort_keys=True).encode() + b"\n")
    else:
        remote.delete(INDEX_NAME)


def quarantine_remote(remote: Remote, name: str, manifest_sha256: str | None, reason: str) -> Quarantined:
    """Mark ``name`` (with this manifest) quarantined in the run's index (read, add, write)."""
    index = add_entry(read_index(remote), name, manifest_sha256, reason, at=time.time())
    write_index(remote, index)
    return Quarantined(name, "remote", f"{remote.url}/{name}", index[name]["reason"], index[name]["at"])


def unmark_remote(remote: Remote, name: str) -> None:
    """Drop ``name`` from the index (it was deleted, or a verified copy replaced it)."""
    index = read_index(remote)
    if name in index:
        del index[name]
        write_index(remote, index)


def list_remote(index: dict[str, dict[str, Any]], url: str, manifests: dict[str, str | None]) -> list[Quarantined]:
    """Index entries that still describe what the store holds (``manifests``: name -> manifest digest, None when
    unreadable); an entry for a name since committed anew, or deleted, is stale and not listed."""
    return [
        Quarantined(n, "remote", f"{url}/{n}", e["reason"], e.get("at"))
        for n, e in sorted(index.items())
        if n in manifests and e.get("manifest_sha256") == manifests[n]
    ]
