"""Shared fixtures: storage servers are started here (session-wide) and each test gets a fresh run prefix.

Helpers live next to this file (``servers.py``, ``faultproxy.py``); with ``--import-mode=importlib`` the tests
folder is not a package, so it is put on ``sys.path`` here and tests import the helpers by module name. So is
``e2e/``: its job scripts import ``procs`` (the one-write ``say``), and ``--doctest-modules`` imports them too.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# gcsfs 2026.x otherwise probes each bucket over gRPC for zonal/HNS features, which the emulator does not serve:
# a 60 s hang. gcsfs reads this when imported, so it is set before anything can import it.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

# A suite started in the background (``nohup``, ``&`` in a script, a CI runner without a terminal) inherits SIGINT
# ignored, and Python then leaves it ignored, in this process and in every job it starts: Ctrl-C handling (which
# only replaces Python's default handler) would be off, and a test sending SIGINT would pass or fail depending on
# whether an earlier test on the same worker had put Python's handler in place. Tests run with what an interactive
# python and a notebook kernel have.
signal.signal(signal.SIGINT, signal.default_int_handler)

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from hub_server import TOKEN, HubServer  # noqa: E402
from servers import FakeGcsServer, MotoS3Server  # noqa: E402

S3_BUCKET = "syncckpt-test"
GCS_BUCKET = "syncckpt-test"


def _unique() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(autouse=True)
def _signal_handlers_as_found() -> Iterator[None]:
    """Each test leaves the signal handlers as it found them. A run that ends in ``SystemExit(143)`` (a deadline, a
    SIGTERM) keeps its finished owner's handler installed, as a process on its way out may; the next test on the
    same worker must not inherit it."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    saved = {s: signal.getsignal(s) for s in signals}
    yield
    for s, handler in saved.items():
        if handler is not None and signal.getsignal(s) != handler:
            signal.signal(s, handler)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    """moto S3 on 127.0.0.1 with bucket ``syncckpt-test``; ``restart()`` simulates an outage."""
    server = MotoS3Server().start()
    server.create_bucket(S3_BUCKET)
    yield server
    server.stop()


@pytest.fixture
def s3_storage_options(s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """s3fs options for the moto server. The AWS variables keep botocore from looking for real credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTSYNCCKPT")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRET-DO-NOT-LOG")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server.options()


@pytest.fixture
def s3_remote_url() -> str:
    """A run prefix no other test uses."""
    return f"s3://{S3_BUCKET}/{_unique()}/run"


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGcsServer]:
    """fake-gcs-server on 127.0.0.1 (memory backend) with bucket ``syncckpt-test``."""
    server = FakeGcsServer().start()
    server.create_bucket(GCS_BUCKET)
    yield server
    server.stop()


@pytest.fixture
def gcs_storage_options(gcs_server: FakeGcsServer) -> dict[str, Any]:
    return gcs_server.options()


@pytest.fixture
def gcs_remote_url() -> str:
    return f"gs://{GCS_BUCKET}/{_unique()}/run"


@pytest.fixture
def fault_proxy(s3_server: MotoS3Server) -> Iterator[FaultProxy]:
    """A FaultProxy in front of moto that injects nothing until the test sets a rate or calls ``down()``.

    Point s3fs at it with ``fault_s3_storage_options``.
    """
    proxy = FaultProxy("127.0.0.1", s3_server.port, rate=0.0, seed=1234, stall_s=3.0).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def fault_s3_storage_options(
    s3_server: MotoS3Server, s3_storage_options: dict[str, Any], fault_proxy: FaultProxy
) -> dict[str, Any]:
    """s3fs options through ``fault_proxy``: client timeouts shorter than its stalls, no botocore retries."""
    options = s3_server.options(fast=True)
    options["client_kwargs"]["endpoint_url"] = fault_proxy.url
    return options


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """The in-memory Hub (tests/hub_server.py) speaking the endpoints huggingface_hub calls."""
    with HubServer(lfs_threshold=4096) as hub:
        yield hub


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """huggingface_hub pointed at ``hub_server``: HF_ENDPOINT/HF_TOKEN in the environment, and the constants it read
    at import time patched (ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET: the server speaks plain LFS only)."""
    import importlib

    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    # huggingface_hub.utils exposes a `tqdm` class under the module's name: fetch the module itself.
    monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", True)
    hub_server.clear_injections()
    yield hub_server
    hub_server.clear_injections()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for the test (tiny in-process models run slower on two shared cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
