"""Remote stores behind one small interface, chosen by URL protocol.

>>> from syncckpt.remote import open_remote
>>> r = open_remote("memory://doc-example/run")
>>> r.list_checkpoints()
[]
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .base import Remote, RemoteStat
from .reach import check_reachable

_ALMOST_A_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)(:/?|//)(?!/)")


def open_remote(url: str, storage_options: dict[str, Any] | None = None, **options: Any) -> Remote:
    """Return the backend for ``url``: ``hf://`` goes to the Hub backend, everything else through fsspec.

    ``options`` are backend keyword arguments (``max_workers``; ``min_commit_interval`` for the Hub).
    """
    check_url(url)
    check_reachable(url, storage_options)  # one line in seconds, not minutes of retries, for a dead endpoint
    if url.startswith("hf://"):
        from .hub import HubRemote

        return HubRemote(url, storage_options=storage_options, **options)
    from .fsspec import FsspecRemote

    return FsspecRemote(url, storage_options=storage_options, **options)


def check_url(url: str) -> None:
    """Refuse a store URL with a mistyped ``://`` (``s3:/bucket/run``, ``gs//bucket/run``): fsspec would take it
    for a local path and the checkpoints would sit on the disk the user meant to back up.

    >>> check_url("s3:/bucket/run")
    Traceback (most recent call last):
    ...
    syncckpt.errors.ConfigError: 's3:/bucket/run' is not a valid store URL: did you mean 's3://bucket/run'?
    """
    import fsspec

    m = _ALMOST_A_URL.match(url)
    if "://" not in url and m and m.group(1).lower() in fsspec.available_protocols():
        fixed = f"{m.group(1)}://{url[m.end() :]}"
        raise ConfigError(f"{url!r} is not a valid store URL: did you mean {fixed!r}?")


__all__ = ["Remote", "RemoteStat", "check_url", "open_remote"]
