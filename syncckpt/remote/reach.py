"""Is the store reachable at all? One TCP connection to its endpoint before the first request.

A store that cannot be reached (a refused endpoint, a name that does not resolve, no network) would otherwise
cost every retry of every layer: botocore and s3fs retry connection errors, gcsfs six times with tracebacks in
the log, and syncckpt's own policy wraps theirs (about a minute for a refused local S3 endpoint, minutes for
``gs://`` without network). This probe fails with one line within :data:`PROBE_TIMEOUT` seconds in all: name
resolution runs in a daemon thread against that deadline (``getaddrinfo`` itself has no timeout; a resolver that
does not answer would block for as long as the system's resolver settings allow), then every address it returned
(IPv4 and IPv6) is tried at once, each within what is left, and the first to connect wins. It only opens and
closes a connection: no request is sent, no credentials are read.

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
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .._secrets import safe_url
from ..errors import RemoteError

#: Seconds the whole probe may take: name resolution and every address together.
PROBE_TIMEOUT = 5.0
#: One entry of ``socket.getaddrinfo``: (family, type, proto, canonname, sockaddr).
AddrInfo = tuple[Any, ...]
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
    resolve: Callable[[str, int], Sequence[AddrInfo]] | None = None,
    connect: Callable[[AddrInfo, float], None] | None = None,
) -> None:
    """Raise RemoteError, in one line, when the store behind ``url`` cannot be reached within ``timeout`` seconds
    in all; return quietly otherwise (and for stores not reached over a network, or behind a proxy).

    ``resolve(host, port)`` (default ``getaddrinfo`` for TCP) and ``connect(addrinfo, timeout)`` (default: open
    and close a socket) are replaceable so that a resolver or a connection that never answers can be simulated.
    """
    env = os.environ if environ is None else environ
    target = endpoint_of(url, storage_options, env)
    if target is None or any(env.get(p) for p in _PROXIES):
        return
    host, port = target
    url = safe_url(url)  # never a credential in a message
    deadline = time.monotonic() + timeout
    done, answer = _in_thread(lambda: (resolve or _resolve)(host, port), deadline, "syncckpt-resolve")
    if not done:
        raise RemoteError(f"{url}: cannot resolve the store's host {host} (no answer within {timeout:g} s); check "
                          "the endpoint and the network")  # fmt: skip
    if isinstance(answer, (OSError, UnicodeError)):  # UnicodeError: a label longer than DNS allows
        why = answer.strerror if isinstance(answer, socket.gaierror) and answer.strerror else str(answer)
        raise RemoteError(f"{url}: cannot resolve the store's host {host} ({why}); check the endpoint and the "
                          "network")  # fmt: skip
    if isinstance(answer, BaseException):
        raise answer
    addresses = list(dict.fromkeys(answer))
    if not addresses:
        raise RemoteError(f"{url}: cannot resolve the store's host {host} (no address); check the endpoint")
    error = _first_connection(addresses, deadline, connect or _connect)
    if error is not None:
        why = "timed out" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        raise RemoteError(
            f"{url}: cannot reach the store at {host}:{port} ({why}, checked within {timeout:g} s); check the "
            "endpoint and the network"
        )


def _resolve(host: str, port: int) -> list[AddrInfo]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _connect(address: AddrInfo, timeout: float) -> None:
    family, kind, proto, _, sockaddr = address
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout)
        sock.connect(sockaddr)


def _in_thread(fn: Callable[[], Any], deadline: float, name: str) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (True, its result or exception) if it ends before ``deadline``, else
    (False, None), the thread left to finish on its own (a daemon: it never holds the interpreter's exit)."""
    box: list[Any] = []
    ended = threading.Event()

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as e:  # handed to the caller
            box.append(e)
        finally:
            ended.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    if not ended.wait(max(deadline - time.monotonic(), 0.0)):
        return False, None
    return True, box[0]


def _first_connection(
    addresses: list[AddrInfo], deadline: float, connect: Callable[[AddrInfo, float], None]
) -> OSError | None:
    """Try every address at once, each within what is left before ``deadline``: None as soon as one connects,
    else why the first address (in resolver order) failed, a TimeoutError if any ran out of time."""
    results: queue.SimpleQueue[tuple[int, BaseException | None]] = queue.SimpleQueue()

    def attempt(i: int, address: AddrInfo) -> None:
        try:
            connect(address, max(deadline - time.monotonic(), 0.001))
            results.put((i, None))
        except BaseException as e:
            results.put((i, e))

    for i, address in enumerate(addresses):
        threading.Thread(target=attempt, args=(i, address), name="syncckpt-probe", daemon=True).start()
    errors: dict[int, OSError] = {}
    while len(errors) < len(addresses):
        try:
            i, error = results.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            return TimeoutError()
        if error is None:
            return None
        if not isinstance(error, OSError):
            raise error
        errors[i] = error
    if any(isinstance(e, TimeoutError) for e in errors.values()):
        return TimeoutError()
    return errors[min(errors)]
