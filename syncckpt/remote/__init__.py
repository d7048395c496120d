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
    check_storage_options(storage_options)
    check_reachable(url, storage_options)  # one line in seconds, not minutes of retries, for a dead endpoint
    if url.startswith("hf://"):
        from .hub import HubRemote

        return HubRemote(url, storage_options=storage_options, **options)
    from .fsspec import FsspecRemote

    return FsspecRemote(url, storage_options=storage_options, **options)


#: storage_options that backends read as mappings (s3fs, gcsfs, aiohttp): a string there fails deep inside them
_MAPPING_OPTIONS = ("client_kwargs", "config_kwargs", "s3_additional_kwargs", "headers", "requester_pays_kwargs")


def check_storage_options(storage_options: dict[str, Any] | None) -> None:
    """Refuse, in one line, storage_options that are not a mapping or hold a string where the backends read a
    mapping (a JSON object typed with a missing brace on a command line). Values are never echoed: they may be
    secrets.

    >>> check_storage_options({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "anon": True})
    >>> check_storage_options({"client_kwargs": '{"endpoint_url": "http://127.0.0.1:9000"'})
    Traceback (most recent call last):
    ...
    syncckpt.errors.ConfigError: storage_options['client_kwargs'] must be a mapping (a JSON object), got a str
    """
    if storage_options is None:
        return
    if not isinstance(storage_options, dict):
        raise ConfigError(f"storage_options must be a dict, got a {type(storage_options).__name__}")
    for key in _MAPPING_OPTIONS:
        value = storage_options.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(
                f"storage_options[{key!r}] must be a mapping (a JSON object), got a {type(value).__name__}"
            )


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
