"""Is the store reachable at all? One TCP connection to its endpoint before the first request.

A store that cannot be reached (a refused endpoint, a name that does not resolve, no network) would otherwise
cost every retry of every layer: botocore and s3fs retry connection errors, gcsfs six times with tracebacks in
the log, and syncckpt's own policy wraps theirs (about a minute for a refused local S3 endpoint, minutes for
``gs://`` without network). This probe fails in at most :data:`PROBE_TIMEOUT` seconds per address with one
line. It only opens and closes a connection: no request is sent, no credentials are read.

The endpoint is the one the backend would use: ``storage_options`` (``endpoint_url``,
``client_kwargs.endpoint_url``; ``endpoint`` for the Hub), then the backend's environment variable
(``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST``, ``HF_ENDPOINT``), then its public
default. With an HTTP(S) proxy configured the probe is skipped: the proxy, not the endpoint, is what is reached.

>>> endpoint_of("s3://bucket/run", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}, environ={})
('127.0.0.1', 9000)
>>> endpoint_of("gs://bucket/run", {}, environ={}), endpoint_of("file:///tmp/run", {}, environ={})
(('storage.googleapis.com', 443), None)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .._secrets import safe_url
from ..errors import RemoteError

PROBE_TIMEOUT = 5.0
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def endpoint_of(
    url: str, storage_options: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
) -> tuple[str, int] | None:
    """(host, port) the backend for ``url`` connects to, or None for stores that are not reached over a network
    (local paths, ``memory://``) or whose endpoint syncckpt does not know."""
    env = os.environ if environ is None else environ
    so = dict(storage_options or {})
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("s3", "s3a"):
        endpoint = (
            so.get("endpoint_url")
            or (so.get("client_kwargs") or {}).get("endpoint_url")
            or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or "https://s3.amazonaws.com"
        )
    elif scheme in ("gs", "gcs"):
        endpoint = so.get("endpoint_url") or env.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    elif scheme == "hf":
        endpoint = so.get("endpoint") or env.get("HF_ENDPOINT") or "https://huggingface.co"
    else:
        return None
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if not parts.hostname:
        return None
    return parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)


def check_reachable(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    timeout: float = PROBE_TIMEOUT,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Raise RemoteError, in one line, when the store behind ``url`` cannot be reached; return quietly otherwise
    (and for stores not reached over a network, or behind a proxy)."""
    env = os.environ if environ is None else environ
    target = endpoint_of(url, storage_options, env)
    if target is None or any(env.get(p) for p in _PROXIES):
        return
    host, port = target
    url = safe_url(url)  # never a credential in a message
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.gaierror as e:
        raise RemoteError(f"{url}: cannot resolve the store's host {host} ({e.strerror or e}); check the endpoint "
                          "and the network") from None  # fmt: skip
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise RemoteError(
            f"{url}: cannot reach the store at {host}:{port} ({why}, checked within {timeout:g} s); check the "
            "endpoint and the network"
        ) from None
