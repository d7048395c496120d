"""A run's side folder (TensorBoard logs, a metrics CSV) mirrored beside its checkpoints, so it outlives the session.

:func:`push_folder` uploads the files of a local folder that changed since the last push to ``PREFIX/...`` in the
run's store, then ``PREFIX/INDEX.json`` (each file's size and SHA-256) last: the index only ever names files
the store holds whole. :func:`pull_folder` brings them back in a new session, each checked against the index
before it is written (a store's objects are untrusted until they verify), and never outside the folder. Side
folders are not checkpoints: retention, resume and the quarantine never look at them.

>>> import tempfile
>>> from pathlib import Path
>>> from syncckpt.remote import open_remote
>>> remote = open_remote("memory://doc-sidefolder/run")
>>> here = Path(tempfile.mkdtemp()); _ = (here / "events.out").write_bytes(b"curve")
>>> push_folder(remote, here, "tensorboard"), push_folder(remote, here, "tensorboard")  # the 2nd: nothing new
(1, 0)
>>> there = Path(tempfile.mkdtemp()); pull_folder(remote, "tensorboard", there), (there / "events.out").read_bytes()
(1, b'curve')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .errors import CheckpointCorrupt, RemoteError
from .manifest import check_relative_path
from .remote import Remote

log = logging.getLogger("syncckpt")

INDEX = "INDEX.json"
MAX_INDEX_BYTES = 4 << 20


def _index(remote: Remote, prefix: str) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(remote.read_bytes(f"{prefix}/{INDEX}", max_size=MAX_INDEX_BYTES))
    except FileNotFoundError:
        return {}
    except (ValueError, CheckpointCorrupt) as e:
        raise RemoteError(f"{remote.url}/{prefix}/{INDEX}: unreadable index ({e})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise RemoteError(f"{remote.url}/{prefix}/{INDEX}: not an index of files")
    return files


def push_folder(remote: Remote, folder: Path, prefix: str) -> int:
    """Upload what changed in ``folder`` (by size and SHA-256) under ``prefix``; the number of files sent."""
    check_relative_path(prefix, where="side folder prefix")
    index = _index(remote, prefix)
    sent = 0
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if index.get(rel) != entry:
            remote.write_bytes(f"{prefix}/{rel}", data)
            index[rel] = entry
            sent += 1
    if sent:
        remote.write_bytes(f"{prefix}/{INDEX}", json.dumps({"files": index}, sort_keys=True).encode())
    return sent


def pull_folder(remote: Remote, prefix: str, folder: Path) -> int:
    """Bring ``prefix``'s files into ``folder`` (files already there and identical are kept); the number written.
    Raises RemoteError when a file does not match the index."""
    folder = Path(folder)
    written = 0
    for rel, entry in sorted(_index(remote, prefix).items()):
        target = folder / check_relative_path(rel, where=f"{remote.url}/{prefix}/{INDEX}")
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == entry.get("sha256"):
            continue
        data = remote.read_bytes(f"{prefix}/{rel}", max_size=int(entry.get("size", 0)) + 1)  # type: ignore[call-overload]
        if len(data) != entry.get("size") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise RemoteError(f"{remote.url}/{prefix}/{rel}: does not match its index entry; not written")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        written += 1
    return written
