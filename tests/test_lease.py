"""The lease: one writer per remote run. Acquire, refuse a second session with how to take over, take over an
expired, dead or (with takeover=True) live holder, notice having been taken over, release.

Mostly on memory:// (the conditional create is a process-wide lock there); conditional creates that race are
checked on file:// (hard link) and S3 (If-None-Match, enforced by moto). A holder on another host is a LEASE
object written as that host would write it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from syncckpt.errors import LeaseHeld, RemoteConflict
from syncckpt.lease import LEASE_NAME, Lease
from syncckpt.remote import open_remote
from syncckpt.remote.base import Remote


@pytest.fixture
def remote() -> Remote:
    r = open_remote(f"memory://test-lease-{uuid.uuid4().hex[:12]}/run")
    yield r
    r.close()


def lease_record(remote: Remote) -> dict[str, Any]:
    return json.loads(remote.read_bytes(LEASE_NAME))


def write_foreign_lease(
    remote: Remote, *, age: float, host: str = "gpu-node-7.invalid", pid: int = 4242, ttl: float = 60.0
) -> None:
    """A LEASE written by a session elsewhere whose last heartbeat was ``age`` seconds ago."""
    remote.write_bytes(
        LEASE_NAME,
        json.dumps(
            {"session": f"{host}:{pid}:0badf00d", "host": host, "pid": pid, "heartbeat": time.time() - age, "ttl": ttl}
        ).encode(),
    )


def dead_pid() -> int:
    """The pid of a process on this machine that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def eventually(predicate, timeout: float) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.02)
    return True


def warnings_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ---- acquire and release ---------------------------------------------------------------------------------------
def test_acquire_creates_the_lease_naming_this_session_and_release_deletes_it(remote: Remote):
    lease = Lease(remote, heartbeat=None)
    t0 = time.time()
    lease.acquire()
    record = lease_record(remote)
    assert record["session"] == lease.session
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert t0 - 1 <= record["heartbeat"] <= time.time() + 1
    assert record["ttl"] == lease.ttl
    lease.check()  # still ours
    lease.release()
    with pytest.raises(FileNotFoundError):
        remote.read_bytes(LEASE_NAME)


def test_release_is_safe_twice_and_without_acquire(remote: Remote):
    Lease(remote, heartbeat=None).release()
    lease = Lease(remote, heartbeat=None)
    lease.acquire()
    lease.release()
    lease.release()
    Lease(remote, heartbeat=None).acquire()  # free again


def test_a_second_live_session_is_refused_naming_the_holder_and_takeover(remote: Remote):
    first = Lease(remote, heartbeat=None)
    first.acquire()
    second = Lease(remote, heartbeat=None)
    with pytest.raises(LeaseHeld) as excinfo:
        second.acquire()
    message = str(excinfo.value)
    assert remote.url in message
    assert f"{socket.gethostname()} pid {os.getpid()}" in message
    assert "takeover=True" in message and "expires in" in message
    assert isinstance(excinfo.value, RemoteConflict)
    assert lease_record(remote)["session"] == first.session  # the refused session wrote nothing
    first.release()
    second.acquire()
    assert lease_record(remote)["session"] == second.session
    second.release()


def test_a_live_lease_of_another_host_is_refused(remote: Remote):
    write_foreign_lease(remote, age=5)
    with pytest.raises(LeaseHeld, match="gpu-node-7.invalid pid 4242"):
        Lease(remote, heartbeat=None).acquire()


def test_a_lease_whose_heartbeat_is_older_than_its_ttl_is_taken_over(remote: Remote, caplog):
    caplog.set_level(logging.WARNING, logger="syncckpt")
    write_foreign_lease(remote, age=3600, ttl=60)
    lease = Lease(remote, heartbeat=None)
    lease.acquire()
    assert lease_record(remote)["session"] == lease.session
    assert "expired" in warnings_text(caplog) and "gpu-node-7.invalid" in warnings_text(caplog)
    lease.release()


def test_the_holders_own_ttl_decides_when_its_lease_expired(remote: Remote):
    write_foreign_lease(remote, age=120, ttl=600)  # older than our TTL, fresh by its own
    with pytest.raises(LeaseHeld):
        Lease(remote, ttl=60, heartbeat=None).acquire()
    write_foreign_lease(remote, age=120, ttl=60)
    Lease(remote, ttl=600, heartbeat=None).acquire()


def test_a_lease_held_by_a_process_of_this_machine_that_no_longer_runs_is_taken_over(remote: Remote, caplog):
    caplog.set_level(logging.WARNING, logger="syncckpt")
    pid = dead_pid()
    write_foreign_lease(remote, age=1, host=socket.gethostname(), pid=pid)  # fresh heartbeat, dead holder
    lease = Lease(remote, heartbeat=None)
    lease.acquire()
    assert lease_record(remote)["session"] == lease.session
    assert f"pid {pid} on this machine" in warnings_text(caplog)


def test_a_damaged_lease_counts_as_expired(remote: Remote):
    remote.write_bytes(LEASE_NAME, b"{not json")
    lease = Lease(remote, heartbeat=None)
    lease.acquire()
    assert lease_record(remote)["session"] == lease.session


# ---- takeover --------------------------------------------------------------------------------------------------
def test_takeover_true_takes_a_live_lease_and_the_old_session_learns_it_lost(remote: Remote, caplog):
    caplog.set_level(logging.WARNING, logger="syncckpt")
    old = Lease(remote, heartbeat=None)
    old.acquire()
    new = Lease(remote, takeover=True, heartbeat=None)
    new.acquire()
    assert "takeover=True" in warnings_text(caplog)
    assert lease_record(remote)["session"] == new.session

    with pytest.raises(RemoteConflict, match="took over") as excinfo:
        old.check()  # reads LEASE now: an upload between two heartbeats must already stop
    assert "never interleave" in str(excinfo.value)
    assert old.lost is not None and remote.url in old.lost
    with pytest.raises(RemoteConflict):
        old.heartbeat()
    assert lease_record(remote)["session"] == new.session  # the old session's heartbeat wrote nothing

    old.release()  # no longer its lease: left to the new owner
    assert lease_record(remote)["session"] == new.session
    new.check()
    new.release()


def test_heartbeat_refreshes_the_record_of_the_same_session(remote: Remote):
    lease = Lease(remote, heartbeat=None)
    lease.acquire()
    first = lease_record(remote)["heartbeat"]
    deadline = time.time() + 5
    while lease_record(remote)["heartbeat"] == first and time.time() < deadline:
        lease.heartbeat()
    record = lease_record(remote)
    assert record["heartbeat"] > first and record["session"] == lease.session
    lease.release()


def test_the_heartbeat_thread_keeps_a_live_lease_fresh_past_its_ttl(remote: Remote):
    holder = Lease(remote, ttl=0.3)  # heartbeats every 0.1 s
    holder.acquire()
    try:
        started = lease_record(remote)["heartbeat"]
        # The lease offers no event per heartbeat: watch the store until a beat two TTLs later shows up.
        assert eventually(lambda: lease_record(remote)["heartbeat"] > started + 0.6, timeout=10)
        with pytest.raises(LeaseHeld):
            Lease(remote, heartbeat=None).acquire()  # refreshed, so never expired
    finally:
        holder.release()
    with pytest.raises(FileNotFoundError):
        remote.read_bytes(LEASE_NAME)  # release stopped the thread before deleting: no beat re-created it


# ---- conditional creates on real stores ------------------------------------------------------------------------
def racing_acquires(url: str, options: dict[str, Any] | None, n: int) -> tuple[list[Lease], list[Exception]]:
    remotes = [open_remote(url, options) for _ in range(n)]
    leases = [Lease(r, heartbeat=None) for r in remotes]
    won: list[Lease] = []
    refused: list[Exception] = []
    barrier = threading.Barrier(n)
    lock = threading.Lock()

    def go(lease: Lease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            with lock:
                won.append(lease)
        except LeaseHeld as e:
            with lock:
                refused.append(e)

    threads = [threading.Thread(target=go, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won, refused


def test_of_sessions_racing_for_a_file_lease_exactly_one_wins(tmp_path: Path):
    url = (tmp_path / "bucket" / "run").as_uri()
    won, refused = racing_acquires(url, None, n=6)
    assert len(won) == 1 and len(refused) == 5
    assert lease_record(open_remote(url))["session"] == won[0].session
    won[0].release()


def test_of_sessions_racing_for_an_s3_lease_exactly_one_wins_and_release_frees_it(
    s3_remote_url: str, s3_storage_options: dict[str, Any]
):
    won, refused = racing_acquires(s3_remote_url, s3_storage_options, n=3)
    assert len(won) == 1 and len(refused) == 2
    assert all("takeover=True" in str(e) for e in refused)
    r = open_remote(s3_remote_url, s3_storage_options)
    assert lease_record(r)["session"] == won[0].session
    won[0].release()
    later = Lease(r, heartbeat=None)
    later.acquire()
    assert lease_record(r)["session"] == later.session
    later.release()


def test_a_session_taken_over_never_gets_the_lease_back_when_the_new_owner_releases():
    remote = open_remote(f"memory://lease-back-{uuid.uuid4().hex[:8]}/run")
    a = Lease(remote, heartbeat=None)
    a.acquire()
    b = Lease(remote, takeover=True, heartbeat=None)
    b.acquire()
    b.release()
    with pytest.raises(RemoteConflict):
        a.check()
    with pytest.raises(RemoteConflict):
        a.heartbeat()
    with pytest.raises(FileNotFoundError):
        remote.read_bytes("LEASE")  # the old session did not recreate it
