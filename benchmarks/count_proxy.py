"""A counting HTTP reverse proxy in front of one S3 endpoint (stdlib only, threaded): one listening port per
client group (a "node"), every request forwarded unchanged and logged with its method, path, query, status,
bytes each way and wall-clock times (``time.time()``, the clock the jobs stamp their events with).

Nothing is mocked: the clients speak real S3 to a real server (moto) through it. Request bodies are read whole
and forwarded with their length (botocore sends ``Content-Length``; a chunked body is de-chunked first); the
response is read whole, then written back, so ``t1`` is when the client's request was completely answered.

>>> classify("GET", "/b", "list-type=2&prefix=run%2F&delimiter=%2F"), classify("GET", "/b/run/x", "")
('LIST', 'GET')
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
#: The request bodies kept in the log (the small control objects: LATEST, parts, manifests), in bytes.
KEEP_BODY = 1 << 20


@dataclass
class Request:
    node: int
    method: str
    op: str  # PUT, GET, LIST, HEAD, DELETE, POST
    path: str  # unquoted, without the query
    query: str
    status: int
    up: int  # request body bytes
    down: int  # response body bytes
    t0: float
    t1: float
    body: bytes | None = None  # the request body when it is at most KEEP_BODY bytes


def classify(method: str, path: str, query: str) -> str:
    """The request class S3 bills and throttles: a GET on a bucket (``/BUCKET`` only) with a listing query is a
    LIST; otherwise the HTTP method."""
    if method == "GET" and path.strip("/").count("/") == 0 and ("list-type" in query or "prefix=" in query):
        return "LIST"
    return method


class CountingProxy:
    """Ports ``ports[node]`` forward to ``upstream`` (``http://host:port``); ``requests`` is the log, in the
    order the requests were answered."""

    def __init__(self, upstream: str, nodes: int) -> None:
        u = urlsplit(upstream)
        self._upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._servers = [self._server(node) for node in range(nodes)]
        self._threads: list[threading.Thread] = []

    @property
    def ports(self) -> list[int]:
        return [s.server_address[1] for s in self._servers]

    def endpoint(self, node: int) -> str:
        return f"http://127.0.0.1:{self.ports[node]}"

    def start(self) -> CountingProxy:
        for s in self._servers:
            t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()
        for t in self._threads:
            t.join(10)

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def _record(self, r: Request) -> None:
        with self._lock:
            self.requests.append(r)

    def _server(self, node: int) -> ThreadingHTTPServer:
        proxy = self

        class Handler(_Forward):
            pass

        Handler.node, Handler.proxy = node, proxy
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        return server


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and ``Expect: 100-continue`` answered by the base class
    node: int
    proxy: CountingProxy
    _local = threading.local()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: the log is the request list

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._forward()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET  # noqa: N815

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _upstream(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection(*self.proxy._upstream, timeout=900)
            self._local.conn = conn
        return conn

    def _exchange(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in (0, 1):  # a kept-alive upstream connection the server closed meanwhile: once more, fresh
            conn = self._upstream(fresh=attempt == 1)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                return resp, resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def _forward(self) -> None:
        t0 = time.time()
        body = self._read_body()
        resp, data = self._exchange(body)
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()
        t1 = time.time()
        u = urlsplit(self.path)
        path = unquote(u.path)
        self.proxy._record(
            Request(
                node=self.node,
                method=self.command,
                op=classify(self.command, path, u.query),
                path=path,
                query=u.query,
                status=resp.status,
                up=len(body),
                down=len(data),
                t0=t0,
                t1=t1,
                body=body if len(body) <= KEEP_BODY else None,
            )
        )
