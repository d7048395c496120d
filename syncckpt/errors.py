"""Exceptions users can catch.

Every message names the file, key or URL involved and says what to do next.

>>> from syncckpt.errors import CheckpointCorrupt, SyncCkptError
>>> issubclass(CheckpointCorrupt, SyncCkptError)
True
"""

from __future__ import annotations


class SyncCkptError(Exception):
    """Base class of every error syncckpt raises on purpose."""


class CheckpointNotFound(SyncCkptError, FileNotFoundError):
    """No (valid) checkpoint exists where one was asked for."""


class CheckpointCorrupt(SyncCkptError):
    """A checkpoint failed verification: missing/extra file, wrong size, wrong digest, bad manifest."""


class UnsafeCheckpoint(CheckpointCorrupt):
    """A checkpoint tries something hostile: path escape, pickle payload, absurd sizes, lying headers."""


class UnsupportedFormat(CheckpointCorrupt):
    """A manifest with a format version this release cannot read."""


class NoValidCheckpoint(CheckpointNotFound, CheckpointCorrupt):
    """Checkpoints exist, but every one failed verification (they are quarantined, not deleted). Resume from a
    good copy, or allow a fresh start explicitly (``resume(start_fresh_if_damaged=True)``,
    ``--start-fresh-if-damaged``). ``where`` names the folder (and remote) searched, ``report`` each damaged
    checkpoint and its reason."""

    def __init__(self, message: str, *, where: str = "", report: str = "") -> None:
        super().__init__(message)
        self.where, self.report = where, report


class StateNotSerializable(SyncCkptError, TypeError):
    """A state_dict value is neither a tensor nor JSON-able; the message names the key path."""


class StateMismatch(SyncCkptError):
    """A checkpoint does not fit the registered objects (missing/unexpected keys, wrong shapes)."""


class RemoteError(SyncCkptError):
    """A remote store failed in a way retries did not fix."""


class RemoteConflict(RemoteError):
    """Another writer changed the remote run concurrently (e.g. a Hub parent_commit mismatch)."""


class LeaseHeld(RemoteConflict):
    """Another live session holds the run's lease; pass ``takeover=True`` to take it over."""


class ConfigError(SyncCkptError, ValueError):
    """An invalid setting (a CheckpointManager argument, a config file value); the message names it (and the file)."""
