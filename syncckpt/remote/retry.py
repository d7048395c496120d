"""When to retry a remote call, and how long to keep at it.

One policy serves every backend (fsspec stores and the Hub): transient failures (HTTP 5xx, 408, 429 and throttling
codes, timeouts, refused or reset connections, truncated bodies) are retried with exponential backoff and full
jitter, or as long as the store asked (``retry_after``: the Hub's Retry-After); anything else (403, 404, a missing
bucket, a corrupt checkpoint, a bug) is raised at once.

Client libraries retry on their own too: botocore (``config_kwargs={"retries": ...}``), s3fs (5 quick tries on
connection errors and SlowDown) and gcsfs (6 tries with waits up to ~35 s in all, not configurable). This policy
wraps theirs, so its ``attempts`` multiply theirs; ``max_total`` bounds the time after which no new attempt starts.

>>> is_transient(ConnectionResetError()), is_transient(TimeoutError()), is_transient(FileNotFoundError("x"))
(True, True, False)
>>> calls = []
>>> def flaky():
...     calls.append(1)
...     if len(calls) < 3:
...         raise ConnectionResetError("peer reset")
...     return "ok"
>>> RetryPolicy(attempts=5, initial_wait=0.001, max_wait=0.001).call(flaky), len(calls)
('ok', 3)
"""

from __future__ import annotations

import errno
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    stop_when_event_set,
    wait_random_exponential,
)

from ..errors import SyncCkptError

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
# Error codes that name a transient condition whatever HTTP status carries them (S3 sends SlowDown as 503, but
# ConditionalRequestConflict as 409: AWS asks clients to retry it).
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "ConditionalRequestConflict",
    "OperationAborted",
}
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.ENETRESET,
    errno.EAGAIN,
    errno.EBUSY,  # s3fs turns 503/SlowDown into OSError(EBUSY)
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs turns 500 InternalError into OSError(EREMOTEIO)
}
# Network-failure classes of the HTTP stacks fsspec backends and huggingface_hub use, matched by name so this
# module imports none of them. Only classes defined in these modules count.
_NETWORK_MODULES = (
    "aiohttp",
    "botocore",
    "aiobotocore",
    "urllib3",
    "requests",
    "httpx",
    "httpcore",
    "httpx2",
    "httpcore2",
    "gcsfs",
    "http",
)
_TRANSIENT_CLASS_NAMES = {
    "ClientConnectionError",  # aiohttp: refused, reset, server disconnected
    "ClientPayloadError",  # aiohttp: body shorter than Content-Length
    "ServerTimeoutError",
    "HTTPClientError",  # botocore: ConnectionClosedError, ReadTimeoutError, ...
    "ConnectionError",  # botocore EndpointConnectionError, requests ConnectionError
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "IncompleteReadError",
    "ResponseStreamingError",
    "ResponseParserError",  # throttled S3 endpoints sometimes answer with broken XML (s3fs issue 484)
    "Timeout",  # requests
    "ChunkedEncodingError",
    "ProtocolError",  # urllib3
    "TransportError",  # httpx
    "ChecksumError",  # gcsfs: bytes damaged in flight
    "IncompleteRead",  # http.client
}


def is_transient(exc: BaseException) -> bool:
    """True when retrying ``exc`` may succeed: the store or network hiccuped, the request itself was fine.

    The exception and its causes are examined in order; the first one that gives a clear answer decides.

    >>> is_transient(OSError(errno.ECONNRESET, "reset")), is_transient(PermissionError("403 Forbidden"))
    (True, False)
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        verdict = _verdict(e)
        if verdict is not None:
            return verdict
        e = e.__cause__ or e.__context__
    return False


def _verdict(e: BaseException) -> bool | None:
    if isinstance(e, SyncCkptError):
        return False
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (TimeoutError, ConnectionError)):  # includes asyncio/socket timeouts and fsspec FSTimeoutError
        return True
    code = _error_code(e)
    if code in _TRANSIENT_CODES:
        return True
    status = _http_status(e)
    if status is not None:
        if status in _TRANSIENT_STATUS:
            return True
        if 400 <= status < 500:
            return False
    for cls in type(e).__mro__:
        if cls.__name__ in _TRANSIENT_CLASS_NAMES and cls.__module__.split(".")[0] in _NETWORK_MODULES:
            return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def _error_code(e: BaseException) -> str | None:
    response = getattr(e, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _http_status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    candidates: list[Any] = []
    if isinstance(response, dict):  # botocore ClientError
        candidates.append(response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        candidates.append(response.get("Error", {}).get("Code"))  # bare "503" when the body was not XML
    elif response is not None:  # requests / httpx (huggingface_hub)
        candidates.append(getattr(response, "status_code", None))
    candidates.append(getattr(e, "status", None))  # aiohttp ClientResponseError
    if not isinstance(e, OSError) and not hasattr(e, "status"):  # aiohttp's `code` is a deprecated `status`
        candidates.append(getattr(e, "code", None))  # gcsfs HttpError, urllib HTTPError
    for c in candidates:
        if isinstance(c, int) and not isinstance(c, bool) and 100 <= c < 600:
            return c
        if isinstance(c, str) and c.isdigit() and 100 <= int(c) < 600:
            return int(c)
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry transient failures.

    ``attempts`` counts the first try; waits are drawn uniformly from ``[0, min(max_wait, initial_wait * 2**n)]``
    ("full jitter"); no new attempt starts once ``max_total`` seconds have passed since the first.

    >>> RetryPolicy(attempts=3).call(lambda: 42)
    42
    >>> RetryPolicy(attempts=3).call(int, "x")
    Traceback (most recent call last):
    ...
    ValueError: invalid literal for int() with base 10: 'x'
    """

    attempts: int = 6
    initial_wait: float = 0.5
    max_wait: float = 20.0
    max_total: float = 300.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be at least 1, got {self.attempts}")

    def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        what: str = "",
        scrub: Callable[[str], str] = str,
        retry_after: Callable[[BaseException], float | None] | None = None,
        abort: threading.Event | None = None,
        **kwargs: Any,
    ) -> T:
        """Run ``fn(*args, **kwargs)``, retrying transient failures; the last exception is re-raised unchanged.

        ``what`` names the operation in log lines; ``scrub`` cleans exception text before it is logged (a backend
        passes one that removes its credentials); ``retry_after(exc)`` may return how long the store asked to wait
        (an HTTP ``Retry-After``) instead of the backoff's draw. Once ``abort`` is set no new attempt starts and a
        wait between attempts ends at once (the process is exiting): the last failure is raised.

        >>> failures = iter([ConnectionResetError("throttled")])
        >>> def once():
        ...     e = next(failures, None)
        ...     if e is not None:
        ...         raise e
        ...     return "ok"
        >>> RetryPolicy(attempts=2, initial_wait=60).call(once, retry_after=lambda e: 0.0)
        'ok'
        """
        backoff = wait_random_exponential(multiplier=self.initial_wait, max=self.max_wait)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome is not None else None
            hinted = retry_after(exc) if retry_after is not None and exc is not None else None
            return hinted if hinted is not None else backoff(state)

        stop = stop_after_attempt(self.attempts) | stop_before_delay(self.max_total)  # no attempt after max_total
        retrying = Retrying(
            stop=stop if abort is None else stop | stop_when_event_set(abort),
            wait=wait,
            retry=retry_if_exception(is_transient),
            before_sleep=functools.partial(self._log_retry, what or getattr(fn, "__qualname__", "call"), scrub),
            sleep=time.sleep if abort is None else abort.wait,
            reraise=True,
        )
        return retrying(_Attempts(fn, self.max_total, abort), *args, **kwargs)

    def _log_retry(self, what: str, scrub: Callable[[str], str], state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s: transient failure (%s); retry %d of %d in %.2f s",
            what,
            scrub(describe(exc)) if exc else "?",
            state.attempt_number,
            self.attempts - 1,
            wait,
        )


DEFAULT_POLICY = RetryPolicy()


class _Attempts:
    """``fn`` that refuses to start an attempt once ``max_total`` has passed since the first one started.

    ``stop_before_delay`` decides on the *planned* wait, but a sleep may overshoot its plan (a loaded machine, a
    suspended VM); the clock read here makes "no attempt starts after ``max_total``" hold anyway, by re-raising the
    failure that the late attempt would have retried.
    """

    def __init__(self, fn: Callable[..., Any], max_total: float, abort: threading.Event | None = None) -> None:
        self.fn, self.max_total, self.abort = fn, max_total, abort
        self.first: float | None = None
        self.last: BaseException | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        elif self.last is not None and (now - self.first > self.max_total or (self.abort and self.abort.is_set())):
            raise self.last
        try:
            return self.fn(*args, **kwargs)
        except BaseException as exc:
            self.last = exc
            raise


def describe(exc: BaseException, message: str | None = None) -> str:
    """``Type: message`` of an exception, on one line and at most 300 characters; for messages and logs.
    ``message``: said instead of the exception's own (a part of it that is safe to show).

    >>> describe(ConnectionResetError(104, "Connection reset by peer"))
    'ConnectionResetError: [Errno 104] Connection reset by peer'
    """
    text = " ".join(str(exc if message is None else message).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
