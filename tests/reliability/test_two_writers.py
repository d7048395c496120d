"""Two writers on one remote run. The second session finds the first through the LEASE object and refuses with
LeaseHeld, saying how to take over; a lease whose heartbeat expired (its holder, on another host, died) is taken
over automatically; ``takeover=True`` takes over a live one, and from then on the old session must not mirror
anything (its uploads fail with RemoteConflict), so checkpoints of the two never interleave in the bucket.

On file:// (hard link / O_EXCL), S3 (``If-None-Match: *``, enforced by moto) and memory://. The two sessions are
two CheckpointManagers in this process (same host, both alive), which is what a second notebook or a restarted
job looks like to the lease; a holder on another host is a LEASE object written directly, as that host would.
Synchronisation is on the uploader's own log records ("Mirrored ..." or "Upload of ... failed"), never on sleeps.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time

import pytest
import torch

from syncckpt import CheckpointManager, LeaseHeld
from syncckpt.lease import LEASE_NAME
from syncckpt.remote import open_remote

STORES = ["file", "s3", "memory"]


class _UploadEvents(logging.Handler):
    """Collects the uploader's outcome per checkpoint name from the ``syncckpt`` log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.outcomes: dict[str, list[str]] = {}
        self.cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        m = re.match(r"(?:Mirrored|Upload of) (\S+) ", msg)
        if m:
            with self.cond:
                self.outcomes.setdefault(m.group(1), []).append(msg)
                self.cond.notify_all()

    def wait_for(self, name: str, timeout: float = 60.0) -> str:
        with self.cond:
            if not self.cond.wait_for(lambda: name in self.outcomes, timeout):
                raise AssertionError(f"no upload outcome for {name} within {timeout}s")
            return self.outcomes[name][0]


@pytest.fixture
def uploads():
    handler = _UploadEvents()
    logger = logging.getLogger("syncckpt")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def _session(directory, url, options, **kw) -> tuple[CheckpointManager, torch.nn.Module]:
    model = torch.nn.Linear(4, 2)
    mgr = CheckpointManager(
        directory,
        save_every_n_steps=None,
        keep_last=10,
        remote=url,
        storage_options=options,
        handle_sigterm=False,
        **kw,
    )
    mgr.register(model=model)
    return mgr, model


def _lease(url, options) -> dict:
    r = open_remote(url, options)
    try:
        return json.loads(r.read_bytes(LEASE_NAME))
    finally:
        r.close()


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_second_session_refused_with_how_to_take_over(store, tmp_path):
    kind, url, options = store
    first, _ = _session(tmp_path / "a", url, options)
    try:
        with pytest.raises(LeaseHeld) as exc:
            _session(tmp_path / "b", url, options)
        message = str(exc.value)
        print(f"\n[two-writers/{kind}] second session refused: {message}")
        assert "takeover=True" in message and url.rstrip("/") in message
        assert _lease(url, options)["session"] == first._uploader.lease.session
    finally:
        first.close()


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_conditional_create_admits_exactly_one_of_racing_writers(store):
    """What the lease rests on: of many simultaneous creates of one object, exactly one succeeds."""
    kind, url, options = store
    remotes = [open_remote(url, options) for _ in range(8)]
    results: list[bool] = []
    barrier = threading.Barrier(len(remotes))

    def create(i: int) -> None:
        barrier.wait()
        results.append(remotes[i].create_exclusive("race-probe", f"writer {i}".encode()))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(len(remotes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in remotes:
        r.close()
    print(f"\n[two-writers/{kind}] racing conditional creates: {sum(results)} of {len(results)} succeeded")
    assert sorted(results) == [False] * (len(remotes) - 1) + [True]


@pytest.mark.parametrize("store", STORES, indirect=True)
@pytest.mark.parametrize("live", [False, True], ids=["expired", "live"])
def test_lease_of_another_host(store, live, tmp_path, caplog):
    """A holder on another machine: taken over once its heartbeat is older than its TTL, refused while fresh."""
    kind, url, options = store
    r = open_remote(url, options)
    heartbeat = time.time() - (5 if live else 3600)
    r.write_bytes(
        LEASE_NAME,
        json.dumps(
            {
                "session": "gpu-node-7:4242:0badf00d",
                "host": "gpu-node-7.invalid",
                "pid": 4242,
                "heartbeat": heartbeat,
                "ttl": 60,
            }
        ).encode(),
    )
    r.close()
    assert socket.gethostname() != "gpu-node-7.invalid"
    if live:
        with pytest.raises(LeaseHeld) as exc:
            _session(tmp_path / "ck", url, options)
        print(f"\n[two-writers/{kind}] live lease of another host: refused: {exc.value}")
        assert "gpu-node-7.invalid" in str(exc.value) and "takeover=True" in str(exc.value)
        return
    with caplog.at_level(logging.WARNING, logger="syncckpt"):
        mgr, _ = _session(tmp_path / "ck", url, options)
    try:
        taken = [r.getMessage() for r in caplog.records if "Taking over" in r.getMessage()]
        print(f"\n[two-writers/{kind}] expired lease of another host: {taken}")
        assert taken and "expired" in taken[0]
        assert _lease(url, options)["session"] == mgr._uploader.lease.session
        mgr.save(7)
        assert mgr.wait(60)
        assert mgr.status()["mirrored"] == ["checkpoint-step-7"]
    finally:
        mgr.close()


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_takeover_stops_the_old_session_mirroring(store, tmp_path, uploads):
    kind, url, options = store
    old, _ = _session(tmp_path / "old", url, options)
    new = None
    try:
        old.save(10)
        assert uploads.wait_for("checkpoint-step-10").startswith("Mirrored")

        new, _ = _session(tmp_path / "new", url, options, takeover=True)
        new.save(20)
        assert uploads.wait_for("checkpoint-step-20").startswith("Mirrored")

        # The old session trains on and saves: its upload must not happen.
        old.save(30)
        outcome = uploads.wait_for("checkpoint-step-30")
        remote = open_remote(url, options)
        names, latest = sorted(remote.list_checkpoints()), remote.read_latest()
        remote.close()
        print(f"\n[two-writers/{kind}] after takeover the old session's upload: {outcome}")
        print(f"[two-writers/{kind}] remote holds {names}, LATEST {latest.name if latest else None}")
        refused = outcome.startswith("Upload of checkpoint-step-30") and (
            "took over" in outcome or "RemoteConflict" in outcome
        )
        assert refused, f"the old session still mirrors after a takeover: {outcome}"
        assert "checkpoint-step-30" not in names, "the old session's checkpoint was interleaved with the new one's"
        assert latest is not None and latest.name == "checkpoint-step-20"
        assert _lease(url, options)["session"] == new._uploader.lease.session
    finally:
        old.close(timeout=1)
        if new is not None:
            new.close()
