"""The retry policy: which failures are transient, how long the waits between attempts are, when it gives up.

Real exception classes of the HTTP stacks the backends use (botocore, aiohttp, requests, urllib3, urllib) are
built here without any network; the waits are short enough that every test runs in well under a second.
"""

from __future__ import annotations

import errno
import io
import logging
import re
import threading
import time
import urllib.error

import aiohttp
import pytest
import requests
import urllib3
from botocore.exceptions import ClientError, EndpointConnectionError

from syncckpt.errors import CheckpointCorrupt, LeaseHeld, RemoteError
from syncckpt.remote.retry import RetryPolicy, describe, is_transient


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def http_response(status: int) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    return response


class Flaky:
    """Fails with ``errors`` in turn, then returns "ok"; records when each attempt started."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.starts: list[float] = []

    def __call__(self) -> str:
        self.starts.append(time.monotonic())
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class AlwaysFails:
    def __init__(self, make: type[BaseException] = TimeoutError) -> None:
        self.make = make
        self.raised: list[BaseException] = []
        self.starts: list[float] = []

    def __call__(self) -> None:
        self.starts.append(time.monotonic())
        exc = self.make(f"attempt {len(self.raised) + 1}")
        self.raised.append(exc)
        raise exc


def logged_waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    waits = []
    for record in caplog.records:
        m = re.search(r"retry \d+ of \d+ in ([0-9.]+) s", record.getMessage())
        if m:
            waits.append(float(m.group(1)))
    return waits


# ---- what counts as transient ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        TimeoutError("read timed out"),
        OSError(errno.ETIMEDOUT, "timed out"),
        OSError(errno.EBUSY, "s3fs: SlowDown"),
        OSError(errno.EPIPE, "broken pipe"),
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        client_error("ThrottlingException", 400),
        client_error("ConditionalRequestConflict", 409),
        client_error("RequestTimeout", 400),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("body shorter than Content-Length"),
        aiohttp.ClientResponseError(None, (), status=503),
        requests.HTTPError(response=http_response(429)),
        requests.HTTPError(response=http_response(502)),
        requests.ConnectionError("connection aborted"),
        urllib3.exceptions.ProtocolError("connection broken"),
        urllib.error.HTTPError("http://store/x", 503, "Service Unavailable", {}, io.BytesIO()),  # type: ignore[arg-type]
    ],
    ids=lambda e: type(e).__name__,
)
def test_store_and_network_hiccups_are_transient(exc: BaseException):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError("no such object"),
        PermissionError("403 Forbidden"),
        FileExistsError("already there"),
        IsADirectoryError("a folder"),
        OSError(errno.ENOSPC, "No space left on device"),
        client_error("AccessDenied", 403),
        client_error("NoSuchBucket", 404),
        client_error("InvalidArgument", 400),
        aiohttp.ClientResponseError(None, (), status=404),
        requests.HTTPError(response=http_response(403)),
        urllib.error.HTTPError("http://store/x", 404, "Not Found", {}, io.BytesIO()),  # type: ignore[arg-type]
        CheckpointCorrupt("model.safetensors: SHA-256 mismatch"),
        RemoteError("s3://b/run: gave up after retries"),
        LeaseHeld("s3://b/run is being written by another session"),
        ValueError("a bug"),
        KeyError("a bug"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_permanent_failures_and_bugs_are_not_transient(exc: BaseException):
    assert not is_transient(exc)


def test_a_class_named_like_a_network_error_counts_only_from_a_network_library():
    class ProtocolError(Exception):  # same name as urllib3's, defined outside any HTTP stack
        pass

    assert not is_transient(ProtocolError("connection broken"))
    assert is_transient(urllib3.exceptions.ProtocolError("connection broken"))


def test_the_cause_chain_is_examined_until_one_exception_gives_a_clear_answer():
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except ConnectionResetError as inner:
            raise RuntimeError("request failed") from inner
    except RuntimeError as e:
        wrapped = e
    assert is_transient(wrapped)  # RuntimeError says nothing, its cause does

    # A syncckpt error decides before its cause: a backend that already gave up must not be retried again.
    gave_up = RemoteError("s3://b/run/LATEST: read gave up after retries")
    gave_up.__cause__ = ConnectionResetError(errno.ECONNRESET, "reset")
    assert not is_transient(gave_up)

    missing = FileNotFoundError("no such key")
    missing.__context__ = TimeoutError("timed out earlier")
    assert not is_transient(missing)


def test_a_cycle_in_the_cause_chain_ends_the_search():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert is_transient(a) is False


# ---- RetryPolicy.call ------------------------------------------------------------------------------------------
def test_transient_failures_are_retried_until_success():
    fn = Flaky(ConnectionResetError("reset"), TimeoutError("slow"), client_error("SlowDown", 503))
    assert RetryPolicy(attempts=5, initial_wait=0.001, max_wait=0.001).call(fn) == "ok"
    assert len(fn.starts) == 4


def test_arguments_reach_the_function():
    assert RetryPolicy(attempts=2).call(lambda a, *, b: a + b, 40, b=2) == 42


def test_a_non_transient_error_is_raised_at_once():
    fn = AlwaysFails(FileNotFoundError)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="attempt 1"):
        RetryPolicy(attempts=10, initial_wait=5, max_wait=5).call(fn)
    assert len(fn.starts) == 1
    assert time.monotonic() - t0 < 1  # no wait before raising


def test_the_last_exception_is_reraised_unchanged_after_the_attempts_run_out():
    fn = AlwaysFails(TimeoutError)
    with pytest.raises(TimeoutError) as excinfo:
        RetryPolicy(attempts=3, initial_wait=0.001, max_wait=0.001).call(fn)
    assert len(fn.starts) == 3  # attempts counts the first try
    assert excinfo.value is fn.raised[-1]


def test_one_attempt_means_no_retry():
    fn = AlwaysFails(TimeoutError)
    with pytest.raises(TimeoutError):
        RetryPolicy(attempts=1).call(fn)
    assert len(fn.starts) == 1


def test_attempts_below_one_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(attempts=0)


def test_no_wait_exceeds_max_wait_however_large_the_initial_wait():
    fn = AlwaysFails(TimeoutError)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        RetryPolicy(attempts=6, initial_wait=100.0, max_wait=0.02).call(fn)
    assert len(fn.starts) == 6
    assert time.monotonic() - t0 < 2  # five waits of at most 0.02 s (100 s each if max_wait were ignored)


def test_waits_grow_from_initial_wait_exponentially():
    fn = AlwaysFails(TimeoutError)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        RetryPolicy(attempts=4, initial_wait=0.02, max_wait=100.0).call(fn)
    assert len(fn.starts) == 4
    assert time.monotonic() - t0 < 2  # waits of at most 0.02, 0.04, 0.08 s (100 s if they started at max_wait)


def test_waits_are_drawn_with_full_jitter_between_zero_and_the_bound(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="syncckpt.remote.retry")
    fn = AlwaysFails(TimeoutError)
    with pytest.raises(TimeoutError):
        RetryPolicy(attempts=21, initial_wait=0.04, max_wait=0.04).call(fn)
    waits = logged_waits(caplog)
    assert len(waits) == 20
    assert all(0 <= w <= 0.04 for w in waits), waits
    assert min(waits) < 0.02 and len(set(waits)) > 1, waits  # not a fixed wait: drawn from [0, bound]


def test_max_total_bounds_the_time_spent_retrying():
    fn = AlwaysFails(TimeoutError)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as excinfo:
        RetryPolicy(attempts=10_000, initial_wait=0.01, max_wait=0.01, max_total=0.3).call(fn)
    elapsed = time.monotonic() - t0
    assert 2 < len(fn.starts) < 10_000  # it kept retrying, then the time bound stopped it
    assert elapsed < 0.3 + 1.0  # it stops when the next wait would end past max_total
    assert excinfo.value is fn.raised[-1]


def test_a_sleep_that_overshoots_its_plan_does_not_start_an_attempt_past_max_total(monkeypatch: pytest.MonkeyPatch):
    # A virtual clock: every sleep lasts 0.08 s longer than asked, as on a loaded machine or a suspended VM. The
    # planned waits (0.1 s, from retry_after) fit in max_total, the overshot ones do not.
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds + 0.08))
    fn = AlwaysFails(TimeoutError)
    with pytest.raises(TimeoutError) as excinfo:
        RetryPolicy(attempts=100, max_total=0.3).call(fn, retry_after=lambda e: 0.1)
    assert fn.starts == pytest.approx(
        [1000.0, 1000.18]
    )  # planned 1000.1 + 0.1 + 0.08 = 1000.36 would be past 1000.3: refused
    assert excinfo.value is fn.raised[-1]


def test_each_retry_is_logged_with_the_operation_name_and_a_scrubbed_message(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="syncckpt.remote.retry")
    fn = Flaky(ConnectionResetError("reset while sending token=SECRET-DO-NOT-LOG"))
    policy = RetryPolicy(attempts=3, initial_wait=0.001, max_wait=0.001)
    scrub = lambda text: text.replace("SECRET-DO-NOT-LOG", "***")
    assert policy.call(fn, what="s3://b/run/LATEST: write", scrub=scrub) == "ok"
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("s3://b/run/LATEST: write: transient failure (ConnectionResetError: ")
    assert "token=***" in line and "SECRET-DO-NOT-LOG" not in line
    assert "retry 1 of 2" in line


# ---- describe --------------------------------------------------------------------------------------------------
def test_describe_gives_type_and_message_on_one_bounded_line():
    assert describe(ConnectionResetError(104, "Connection reset by peer")) == (
        "ConnectionResetError: [Errno 104] Connection reset by peer"
    )
    assert describe(TimeoutError()) == "TimeoutError"
    long = describe(ValueError("line one\nline two " + "x" * 1000))
    assert "\n" not in long and long.startswith("ValueError: line one line two ")
    assert len(long) <= len("ValueError: ") + 300 and long.endswith("...")


def test_no_attempt_starts_after_max_total(monkeypatch: pytest.MonkeyPatch):
    now = [0.0]  # a virtual clock whose sleeps last exactly as long as asked: the random waits decide alone
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    starts: list[float] = []
    t0 = time.monotonic()

    def always_times_out():
        starts.append(time.monotonic() - t0)
        raise TimeoutError("stalled")

    policy = RetryPolicy(attempts=1000, initial_wait=0.3, max_wait=0.3, max_total=0.1)
    with pytest.raises(TimeoutError):
        policy.call(always_times_out)
    assert all(s <= 0.1 for s in starts), starts  # the next wait would have ended past max_total: no attempt


def test_once_abort_is_set_the_wait_ends_and_no_attempt_follows():
    """The end of a grace period: a call waiting out its backoff (60 s here) gives up at once with the last
    failure, and a call that fails after the abort is not retried at all."""
    abort = threading.Event()
    calls = []

    def failing():
        calls.append(time.monotonic())
        if len(calls) == 1:
            threading.Thread(target=abort.set).start()  # while the policy waits
        raise ConnectionResetError("store down")

    policy = RetryPolicy(attempts=5, initial_wait=60, max_wait=60)
    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError):
        policy.call(failing, abort=abort, retry_after=lambda e: 60.0)  # a 60 s wait, whatever the draw
    assert len(calls) == 1 and time.monotonic() - t0 < 30
    calls.clear()
    with pytest.raises(ConnectionResetError):
        policy.call(failing, abort=abort)
    assert len(calls) == 1
