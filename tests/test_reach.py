"""The reachability probe (issue 18): an unreachable store fails with one line within one stated total,
PROBE_TIMEOUT seconds, name resolution and every address included.

Real sockets where this machine can produce the failure: a refused port, a name under ``.invalid`` (RFC 6761:
never resolves), a listening endpoint. Two failures cannot be produced reliably here and are simulated through
``check_reachable``'s ``resolve``/``connect`` parameters: a resolver that never answers (``getaddrinfo`` has no
timeout of its own) and a connection that never completes (non-routable addresses such as 10.255.255.1 are
answered at once on this machine, by a transparent proxy, so they do not block).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from syncckpt.errors import RemoteError
from syncckpt.remote.reach import PROBE_TIMEOUT, check_reachable

TIMEOUT = 0.5  # the budget of the probes that must run out of time
SLACK = 1.5  # a loaded machine starts threads late; still far below one PROBE_TIMEOUT per address
# Probes that must end at once get the whole default budget, so a stalled thread on a busy machine cannot run them
# out of time; "at once" is then well under that budget.
AT_ONCE = TIMEOUT + SLACK


@pytest.fixture
def never():
    """An event nothing sets before the test ends: what a hung resolver or connection waits on."""
    event = threading.Event()
    yield event
    event.set()  # let the simulated hung calls (daemon threads) finish


def s3(port: int, host: str = "127.0.0.1") -> tuple[str, dict]:
    return "s3://bucket/run", {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}


def tcp(host: str, port: int) -> list[tuple]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def probe(url: str, options: dict, timeout: float = TIMEOUT, **kw) -> tuple[float, str | None]:
    t0 = time.monotonic()
    try:
        check_reachable(url, options, timeout=timeout, environ={}, **kw)
    except RemoteError as e:
        return time.monotonic() - t0, str(e)
    return time.monotonic() - t0, None


def test_the_default_bound_is_five_seconds_in_all():
    assert PROBE_TIMEOUT == 5.0  # the figure README's "Cloud sync" section states


def test_a_refused_port_fails_at_once_with_the_reason():
    held = socket.socket()  # bound, never listening: refused, and no other process takes the port meanwhile
    held.bind(("127.0.0.1", 0))
    with held:
        took, error = probe(*s3(held.getsockname()[1]), timeout=PROBE_TIMEOUT)
    assert error is not None and "cannot reach the store at 127.0.0.1" in error, error
    assert "Connection refused" in error and f"checked within {PROBE_TIMEOUT:g} s" in error
    assert "\n" not in error
    assert took < AT_ONCE


def test_a_name_that_does_not_resolve_fails_with_one_line():
    took, error = probe("gs://bucket/run", {"endpoint_url": "http://storage.syncckpt-test.invalid"})
    assert error is not None and "cannot resolve the store's host storage.syncckpt-test.invalid" in error, error
    assert took < TIMEOUT + SLACK


def test_a_listening_endpoint_passes():
    with socket.create_server(("127.0.0.1", 0)) as server:
        took, error = probe(*s3(server.getsockname()[1]), timeout=PROBE_TIMEOUT)
    assert error is None and took < AT_ONCE


def test_a_resolver_that_never_answers_fails_within_the_total(never):
    # simulated: the injected resolver blocks until the test ends, as getaddrinfo does with a silent DNS server
    asked = []

    def silent_resolver(host, port):
        asked.append((host, port))
        never.wait()
        return []

    took, error = probe(*s3(9000, "store.example"), resolve=silent_resolver)
    assert asked == [("store.example", 9000)]
    assert error is not None and "cannot resolve the store's host store.example" in error, error
    assert f"no answer within {TIMEOUT:g} s" in error
    assert TIMEOUT <= took < TIMEOUT + SLACK


def test_connections_that_never_complete_time_out_once_for_all_addresses_not_once_per_address(never):
    # simulated: the injected connect blocks until the test ends, as a SYN to a black-holed address does
    started = []

    def hung(address, timeout):
        started.append((address[4][0], timeout))
        never.wait()

    addresses = tcp("127.0.0.1", 9000) + [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 9000, 0, 0))]
    took, error = probe(*s3(9000, "store.example"), resolve=lambda h, p: addresses, connect=hung)
    assert error is not None and "cannot reach the store at store.example:9000" in error, error
    assert f"(timed out, checked within {TIMEOUT:g} s)" in error
    assert TIMEOUT <= took < TIMEOUT + SLACK  # IPv4 and IPv6 together: one total, not 2 x TIMEOUT
    assert sorted(host for host, _ in started) == ["127.0.0.1", "::1"]  # both addresses were tried
    assert all(0 < timeout <= TIMEOUT for _, timeout in started)


def test_slow_resolution_leaves_the_connection_only_what_remains_of_the_total(never):
    # simulated: resolution answers after 60 % of the total, then the connection never completes
    given = []

    def slow_resolver(host, port):
        threading.Event().wait(0.6 * TIMEOUT)  # latency of a slow resolver, not a synchronisation
        return tcp("127.0.0.1", port)

    def hung(address, timeout):
        given.append(timeout)
        never.wait()

    took, error = probe(*s3(9000), resolve=slow_resolver, connect=hung)
    assert error is not None and "timed out" in error, error
    assert TIMEOUT <= took < TIMEOUT + SLACK  # not 0.6 x TIMEOUT + a full TIMEOUT
    assert len(given) == 1 and given[0] <= 0.4 * TIMEOUT + 0.05


def test_one_hung_address_does_not_hide_one_that_answers(never):
    # IPv6 black-holed (simulated), IPv4 a real listening socket: the probe passes without waiting for IPv6
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        v6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))

        def connect(address, timeout):
            if address is v6:
                never.wait()
            with socket.create_connection(address[4], timeout=timeout):
                pass

        took, error = probe(
            *s3(port, "store.example"),
            timeout=PROBE_TIMEOUT,
            resolve=lambda h, p: [v6, *tcp("127.0.0.1", p)],
            connect=connect,
        )
    assert error is None, error
    assert took < AT_ONCE  # the hung address would have taken the whole PROBE_TIMEOUT


def test_a_refused_address_does_not_hide_one_that_answers():
    # real sockets: ::1 at the port refuses (or has no IPv6 at all), 127.0.0.1 listens
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        v6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))
        took, error = probe(
            *s3(port, "store.example"), timeout=PROBE_TIMEOUT, resolve=lambda h, p: [v6, *tcp("127.0.0.1", p)]
        )
    assert error is None, error
    assert took < AT_ONCE


def test_behind_a_proxy_nothing_is_probed(never):
    def resolver(host, port):
        raise AssertionError("resolved behind a proxy")

    check_reachable(*s3(9000, "store.example"), environ={"HTTPS_PROXY": "http://proxy:3128"}, resolve=resolver)
