"""A fault-injecting HTTP proxy for tests: sits between a client (s3fs) and a server (moto) on 127.0.0.1.

Each client connection carries one request: the proxy reads it, forwards it upstream with ``Connection: close``
and relays the answer, so every request gets its own dice roll. With probability ``rate`` it instead injects
one of ``kinds``:

- ``reset``: close the client connection with a TCP RST after reading the request;
- ``503`` / ``500`` / ``slowdown``: answer an S3-style XML error without asking upstream;
- ``stall``: read the request and answer nothing for ``stall_s`` (set longer than the client's read timeout);
- ``truncate``: forward the request (so it takes effect upstream), then relay only half the answer and reset;
- ``403`` (only through ``inject``): answer AccessDenied, which a client must not retry;
- ``cut`` (only through ``inject``): like ``truncate``, but after the half it sends nothing for ``stall_s`` before
  the reset, so the client has read all of that half when its read timeout fires (a stream broken mid-object at
  a known byte).

``inject(*kinds)`` forces the faults of the next requests, in order (for deterministic tests). ``down()`` resets
every connection until ``up()`` (or until ``count`` connections were refused), which looks like an outage to the
client. ``counts`` says how many of each fault were injected; ``answered`` lists the requests upstream answered
(method, target, status), in the order their answers reached the client; ``requests`` lists every request read
(method, target, its headers by lower-case name). ``fail_agent(text, kind)`` gives fault ``kind`` to every
request whose User-Agent contains ``text`` (one client of two sharing a store), or to the next ``count`` of them.

>>> FaultProxy("127.0.0.1", 9, kinds=("teleport",))
Traceback (most recent call last):
...
ValueError: unknown fault kinds ['teleport']; known: ('reset', '503', '500', 'slowdown', 'stall', 'truncate')
"""

from __future__ import annotations

import random
import socket
import struct
import threading
from collections import Counter, deque

KINDS = ("reset", "503", "500", "slowdown", "stall", "truncate")  # transient: a client should retry these
PERMANENT_KINDS = ("403",)  # not retryable; only injected when asked for
INJECT_ONLY_KINDS = ("cut",)  # transient, but only injected when asked for

_ERRORS = {
    "503": (503, "Service Unavailable", "ServiceUnavailable", "Injected by FaultProxy: service unavailable"),
    "500": (500, "Internal Server Error", "InternalError", "Injected by FaultProxy: internal error"),
    "slowdown": (503, "Slow Down", "SlowDown", "Injected by FaultProxy: please reduce your request rate"),
    "403": (403, "Forbidden", "AccessDenied", "Injected by FaultProxy: access denied"),
}
_HOP_HEADERS = {b"connection", b"keep-alive", b"expect", b"proxy-connection"}


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``upstream_host:upstream_port``, breaking a share of the requests.

    Use as a context manager or call ``start()``/``stop()``; ``url`` is what the client should talk to.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        rate: float = 0.2,
        kinds: tuple[str, ...] = KINDS,
        seed: int = 0,
        stall_s: float = 3.0,
    ):
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {KINDS}")
        self.upstream = (upstream_host, upstream_port)
        self.rate = rate
        self.kinds = tuple(kinds)
        self.stall_s = stall_s
        self.counts: Counter[str] = Counter()
        self.answered: list[tuple[str, str, int]] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._agent_fault: tuple[str, str] | None = None
        self._agent_left: int | None = None  # faults left for that agent (None: no limit)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._forced: deque[str] = deque()
        self._down_left: int | None = None  # None: up; -1: down until up(); n > 0: down for n more connections
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def faults(self) -> int:
        """Faults injected so far, all kinds together (refused connections while down included)."""
        with self._lock:
            return sum(v for k, v in self.counts.items() if k != "passed")

    # ---- control ---------------------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # also wakes stalled handlers
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = rate

    def inject(self, *kinds: str) -> None:
        """Give the next ``len(kinds)`` requests these faults, in order ("pass" lets one through untouched)."""
        known = KINDS + PERMANENT_KINDS + INJECT_ONLY_KINDS
        unknown = [k for k in kinds if k not in (*known, "pass")]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {known} and 'pass'")
        with self._lock:
            self._forced.extend(kinds)

    def fail_agent(self, text: str | None, kind: str = "403", count: int | None = None) -> None:
        """Fault ``kind`` for the requests whose User-Agent contains ``text`` (None: stop): every one, or the
        next ``count``."""
        with self._lock:
            self._agent_fault = None if text is None else (text, kind)
            self._agent_left = count

    def down(self, count: int | None = None) -> None:
        """Reset every new connection: until ``up()``, or for the next ``count`` connections only."""
        with self._lock:
            self._down_left = -1 if count is None else count

    def up(self) -> None:
        with self._lock:
            self._down_left = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- serving ---------------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="faultproxy-conn", daemon=True).start()

    def _refuse_while_down(self) -> bool:
        with self._lock:
            if self._down_left is None:
                return False
            self.counts["down"] += 1
            if self._down_left > 0:
                self._down_left -= 1
                if self._down_left == 0:
                    self._down_left = None
            return True

    def _pick(self) -> str | None:
        with self._lock:
            if self._forced:
                kind = self._forced.popleft()
                self.counts["passed" if kind == "pass" else kind] += 1
                return None if kind == "pass" else kind
            if self._rng.random() >= self.rate:
                self.counts["passed"] += 1
                return None
            kind = self._rng.choice(self.kinds)
            self.counts[kind] += 1
            return kind

    def _handle(self, conn: socket.socket) -> None:
        try:
            if self._refuse_while_down():
                _reset(conn)
                return
            conn.settimeout(30)
            reader = conn.makefile("rb")
            try:
                request = _read_request(reader, conn)
            finally:
                reader.close()  # the socket's fd (and so the RST below) is only released once no file wraps it
            if request is None:
                return
            method, head, body = request
            headers = _headers(head)
            with self._lock:
                self.requests.append((method, _target(head), headers))
                agent = self._agent_fault
                hit = agent is not None and agent[0] in headers.get("user-agent", "") and self._agent_left != 0
                if hit and self._agent_left is not None:
                    self._agent_left -= 1
            kind = agent[1] if hit and agent else self._pick()
            if kind == "reset":
                _reset(conn)
            elif kind in _ERRORS:
                conn.sendall(_error_response(method, *_ERRORS[kind]))
            elif kind == "stall":
                self._stopping.wait(self.stall_s)
            else:
                response = self._forward(head, body)
                if kind in ("truncate", "cut"):
                    conn.sendall(_truncated(response))
                    if kind == "cut":
                        self._stopping.wait(self.stall_s)
                    _reset(conn)
                    return
                with self._lock:  # before the client can read the answer, so the order is the client's
                    self.answered.append((method, _target(head), _status(response)))
                conn.sendall(response)
        except OSError:
            pass  # the client gave up (timeout) or the proxy is stopping
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _forward(self, head: bytes, body: bytes) -> bytes:
        with socket.create_connection(self.upstream, timeout=30) as up:
            up.sendall(head + body)
            chunks = []
            while True:
                data = up.recv(1 << 16)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks)


def _target(head: bytes) -> str:
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].decode("latin-1") if len(parts) > 1 else ""


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return out


def _status(response: bytes) -> int:
    parts = response.split(b"\r\n", 1)[0].split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _read_request(reader, conn: socket.socket) -> tuple[str, bytes, bytes] | None:
    """One request from the client: (method, head rewritten for upstream, body as received)."""
    request_line = reader.readline(65536)
    if not request_line:
        return None
    headers: list[bytes] = []
    length = 0
    chunked = expect_continue = False
    while True:
        line = reader.readline(65536)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif key == b"expect" and b"100-continue" in value.lower():
            expect_continue = True
        if key not in _HOP_HEADERS:
            headers.append(line)
    if expect_continue:
        # aiohttp waits for this before sending a large body; the proxy answers it and reads the body itself.
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = _read_chunked(reader) if chunked else reader.read(length) if length else b""
    head = request_line + b"".join(headers) + b"Connection: close\r\n\r\n"
    return request_line.split(b" ", 1)[0].decode("ascii", "replace"), head, body


def _read_chunked(reader) -> bytes:
    out = []
    while True:
        size_line = reader.readline(65536)
        out.append(size_line)
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then the blank line
                line = reader.readline(65536)
                out.append(line)
                if line in (b"\r\n", b"\n", b""):
                    return b"".join(out)
        out.append(reader.read(size + 2))


def _error_response(method: str, status: int, reason: str, code: str, message: str) -> bytes:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>faultproxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n\r\n"
    ).encode()
    return head if method == "HEAD" else head + body


def _truncated(response: bytes) -> bytes:
    head, sep, body = response.partition(b"\r\n\r\n")
    if body:
        return head + sep + body[: len(body) // 2]
    return response[: max(1, len(head) // 2)]


def _reset(conn: socket.socket) -> None:
    """Close with RST rather than FIN: the client sees 'connection reset by peer'."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()
