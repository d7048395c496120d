"""Remote stores behind one small interface, chosen by URL protocol.

>>> from syncckpt.remote import open_remote
>>> r = open_remote("memory://doc-example/run")
>>> r.list_checkpoints()
[]
"""

from __future__ import annotations

from typing import Any

from .base import Remote, RemoteStat


def open_remote(url: str, storage_options: dict[str, Any] | None = None, **options: Any) -> Remote:
    """Return the backend for ``url``: ``hf://`` goes to the Hub backend, everything else through fsspec.

    ``options`` are backend keyword arguments (``max_workers``; ``min_commit_interval`` for the Hub).
    """
    if url.startswith("hf://"):
        from .hub import HubRemote

        return HubRemote(url, storage_options=storage_options, **options)
    from .fsspec import FsspecRemote

    return FsspecRemote(url, storage_options=storage_options, **options)


__all__ = ["Remote", "RemoteStat", "open_remote"]
