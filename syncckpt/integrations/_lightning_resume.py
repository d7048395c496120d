"""Which checkpoint a Lightning ``ckpt_path`` names, for :class:`~syncckpt.integrations.lightning.SyncCkptIO`.

``trainer.fit(ckpt_path=...)`` reaches the plugin's ``load_checkpoint`` with: :data:`NEWEST` (what the callback
answers for ``"last"``) or the run URL, both meaning the newest *valid* checkpoint local or remote; a remote
checkpoint URL; a pointer file (``last*.ckpt`` means the newest valid one too); a checkpoint folder; or a folder
of them. The search itself is the core's :func:`syncckpt.resume.find_resumable`; nothing here unpickles.

>>> import tempfile
>>> from pathlib import Path
>>> has_checkpoints(Path(tempfile.mkdtemp()), None, None, None)
False
>>> locate(tempfile.mkdtemp() + "/nothing", Path, newest_valid, None)
Traceback (most recent call last):
...
syncckpt.errors.CheckpointNotFound: ...nothing: no such checkpoint, pointer file or folder
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec

from .. import local
from ..errors import CheckpointNotFound, NoValidCheckpoint
from ..format import DecodedCheckpoint, decode_checkpoint
from ..manifest import Manifest
from ..pull import remote_listing
from ..remote import Remote, open_remote
from ..resume import find_resumable, pull_checkpoint_url
from ._lightning_state import read_pointer

log = logging.getLogger("syncckpt")

NEWEST = "memory://syncckpt/newest-valid-checkpoint.ckpt"  # what the callback answers for ckpt_path="last"

Loaded = tuple[Manifest, DecodedCheckpoint, Path, str]  # manifest, decoded states, local folder, where from


def locate(
    path: str, directory: Callable[[], Path], newest: Callable[..., Loaded], storage_options: dict[str, Any] | None
) -> Loaded:
    """The checkpoint ``path`` names (not :data:`NEWEST` nor the run URL): verified, decoded, pulled into
    ``directory()`` when remote. ``newest(folder, only=None)`` searches a folder (and its run)."""
    if "://" in path and not path.startswith("file://"):
        manifest, files, ckpt = pull_checkpoint_url(path, directory(), storage_options)
        return manifest, decode_checkpoint(files, str(ckpt)), ckpt, path
    p = Path(path.removeprefix("file://"))
    if p.is_file():
        name = read_pointer(p)
        if name == "newest" or p.name.startswith("last"):  # "last": the newest valid, wherever it is
            return newest(p.parent)
        return newest(p.parent, only=name)
    if (p / "manifest.json").is_file():
        manifest, files = local.verify(p)
        return manifest, decode_checkpoint(files, str(p)), p, "local"
    if p.is_dir():
        return newest(p)
    raise CheckpointNotFound(f"{path}: no such checkpoint, pointer file or folder")


def newest_valid(directory: Path, remote: Remote | None = None, only: str | None = None) -> Loaded:
    """The newest valid checkpoint in ``directory`` or ``remote`` (only the one named ``only``, when given)."""
    search = find_resumable(
        directory,
        remote,
        accept=None if only is None else (lambda n: n == only),
        decode=lambda m, files, p: decode_checkpoint(files, str(p)),
    )
    where = str(directory) + (f" or {remote.url}" if remote is not None else "")
    if search.found is not None:
        f = search.found
        log.info("Resuming from checkpoint: %s (global step %d, %s)", f.path, f.manifest.global_step, f.source)
        return f.manifest, f.decoded, f.path, f.source
    if search.nothing_valid:
        report = search.damage_report()
        log.warning("No valid checkpoint in %s: %s", where, report)
        raise NoValidCheckpoint(f"no valid checkpoint in {where} ({report})", where=where, report=report)
    raise CheckpointNotFound(f"{only or 'no checkpoint'} in {where}: nothing to resume from")


def has_checkpoints(
    directory: Path | None, remote: Remote | None, remote_url: str | None, storage_options: dict[str, Any] | None
) -> bool:
    """A checkpoint to resume from may exist: ``directory`` or the run (``remote`` when open, else opened from
    ``remote_url``) lists checkpoints, valid or not (which one is valid is :func:`newest_valid`'s to say)."""
    if directory is not None:
        found, damaged = local.scan(directory)
        if found or damaged:
            return True
    if remote_url is None:
        return False
    if remote is not None:
        listing = remote_listing(remote)
    else:
        store = open_remote(remote_url, storage_options)
        try:
            listing = remote_listing(store)
        finally:
            store.close()
    return bool(listing.candidates or listing.unreadable or listing.quarantined)


def newest_marker() -> str:
    """:data:`NEWEST`, made to exist: Lightning checks that a ``ckpt_path`` exists and how new it is."""
    fsspec.filesystem("memory").pipe_file(NEWEST, b"{}")
    return NEWEST
