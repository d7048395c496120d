"""One writer per remote run: a lease object with a heartbeat, created with the store's conditional write.

The first session creates ``LEASE`` at the run prefix with a conditional create (S3 If-None-Match, GCS
ifGenerationMatch=0, Hub parent_commit, O_EXCL for plain files) and refreshes its heartbeat while it runs. A second
session finds a live lease and refuses with :class:`~syncckpt.errors.LeaseHeld`; a lease whose heartbeat is older
than its TTL (its session died), or whose holder was a process on this machine that no longer runs, is taken over
automatically, and ``takeover=True`` takes over a live one. A
session whose lease was taken over stops mirroring rather than interleave checkpoints with the new owner.

Heartbeats compare wall clocks of different machines; TTLs are minutes, far above ordinary clock skew.

>>> from syncckpt.remote import open_remote
>>> r = open_remote("memory://doc-lease/run")
>>> a = Lease(r, heartbeat=None); a.acquire()
>>> b = Lease(r, heartbeat=None)
>>> try:
...     b.acquire()
... except LeaseHeld as e:
...     print("refused")
refused
>>> a.release(), b.acquire(), b.release(timeout=5)  # a release at the end of a grace period is bounded
(True, None, True)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from .errors import LeaseHeld, RemoteConflict, RemoteError
from .remote.base import Remote

log = logging.getLogger("syncckpt")

LEASE_NAME = "LEASE"
RELEASE_FLOOR = 1.0  # seconds a bounded release always gets: a store that answers releases in milliseconds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """Exclusive right to write a remote run, kept alive by a heartbeat thread."""

    def __init__(
        self, remote: Remote, takeover: bool = False, ttl: float | None = None, heartbeat: float | None = -1.0
    ) -> None:
        self.remote = remote
        self.takeover = takeover
        self.ttl = ttl if ttl is not None else getattr(remote, "lease_ttl", 60.0)
        # -1 means "the backend's default": a third of the TTL (the Hub backend asks for rare heartbeats,
        # since each one is a commit); None disables the thread (tests drive heartbeats by hand).
        self.interval = self.ttl / 3 if heartbeat == -1.0 else heartbeat
        self.session = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost: str | None = None
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {
                "session": self.session,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "heartbeat": time.time(),
                "ttl": self.ttl,
            }
        ).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            raw = json.loads(self.remote.read_bytes(LEASE_NAME, max_size=64 * 1024))
            return raw if isinstance(raw, dict) else {}
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # damaged lease: treat as expired

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeld naming the holder and how to take over."""
        if self.remote.create_exclusive(LEASE_NAME, self._record()):
            self._start()
            return
        cur = self._read()
        if cur is None:  # released between our create and read: one more try
            if self.remote.create_exclusive(LEASE_NAME, self._record()):
                self._start()
                return
            cur = self._read() or {}
        age = time.time() - float(cur.get("heartbeat", 0) or 0)
        ttl = float(cur.get("ttl", self.ttl) or self.ttl)
        holder = f"{cur.get('host', '?')} pid {cur.get('pid', '?')}"
        if cur.get("host") == socket.gethostname() and isinstance(cur.get("pid"), int) and not _alive(cur["pid"]):
            log.warning(
                "Taking over %s: the lease holder (pid %s on this machine) is no longer running",
                self.remote.url,
                cur["pid"],
            )
        elif age > ttl:
            log.warning(
                "Taking over %s: the lease of %s expired (last heartbeat %.0fs ago, TTL %.0fs)",
                self.remote.url,
                holder,
                age,
                ttl,
            )
        elif self.takeover:
            log.warning("Taking over %s from live session %s (takeover=True)", self.remote.url, holder)
        else:
            raise LeaseHeld(
                f"{self.remote.url} is being written by another session ({holder}, heartbeat {age:.0f}s ago). "
                f"If that session is dead its lease expires in {max(ttl - age, 0):.0f}s; to take over now pass "
                "takeover=True to CheckpointManager (--takeover for syncckpt push/watch and train_hallucination.py)."
            )
        self.remote.write_bytes(LEASE_NAME, self._record())
        self._start()

    def _start(self) -> None:
        self._held = True
        if self.interval:
            self._thread = threading.Thread(target=self._beat, name="syncckpt-lease", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.heartbeat()
            except RemoteConflict:
                return
            except (OSError, RemoteError) as e:  # an outage: the next beat tries again
                log.debug("Lease heartbeat on %s failed: %s", self.remote.url, e)

    def heartbeat(self) -> None:
        """Refresh the lease, noticing when another session took it over."""
        if self._taken_over():
            raise RemoteConflict(self.lost)
        self.remote.write_bytes(LEASE_NAME, self._record())

    def check(self) -> None:
        """Raise RemoteConflict when the lease was taken over (uploads must stop).

        Reads LEASE now rather than trusting the last heartbeat: a takeover between two heartbeats must already
        stop this upload, or the two sessions' checkpoints would interleave.
        """
        if self.lost or self._taken_over():
            raise RemoteConflict(f"{self.lost}; not uploading so checkpoints never interleave")

    def _taken_over(self) -> bool:
        cur = self._read()
        if cur is not None and cur.get("session") not in (None, self.session):
            lost = f"session {cur.get('host')} pid {cur.get('pid')} took over {self.remote.url}"
        elif cur is None and self._held:
            # Nobody but the holder deletes a held lease: gone means another session took over and released it
            # (or a human removed it). Recreating it would resume mirroring over that session's checkpoints.
            lost = f"the lease on {self.remote.url} was taken over and released, or deleted, by someone else"
        else:
            return False
        if not self.lost:
            self.lost = lost
            log.error("Lease lost: %s; this session stops mirroring", self.lost)
        return True

    def release(self, timeout: float | None = None) -> bool:
        """Stop the heartbeat and delete the lease if it is still ours; True once that is done (or nothing was
        held). With ``timeout`` (the end of a grace period: the process is about to exit) the heartbeat and the
        delete get that many seconds, and at least ``RELEASE_FLOOR``, between them; a store that does not answer
        in time is left to the lease's TTL, and False says the delete may still be running."""
        end = time.monotonic() + (5.0 if timeout is None else max(timeout, RELEASE_FLOOR))
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=min(5.0, max(0.0, end - time.monotonic())))
        if not self._held:
            return True
        self._held = False
        if timeout is None:
            self._delete_if_ours()
            return True
        worker = threading.Thread(target=self._delete_if_ours, name="syncckpt-lease-release", daemon=True)
        worker.start()
        worker.join(max(0.0, end - time.monotonic()))
        if worker.is_alive():
            log.warning(
                "Could not release the lease on %s in the time left; it expires by itself within %.0fs",
                self.remote.url,
                self.ttl,
            )
            return False
        return True

    def _delete_if_ours(self) -> None:
        try:
            cur = self._read()
            if cur is not None and cur.get("session") == self.session:
                self.remote.delete(LEASE_NAME)
        except (OSError, RemoteError) as e:
            log.warning("Could not release the lease on %s: %s (it expires by itself)", self.remote.url, e)
