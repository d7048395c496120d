"""Bounding what background saves and transfers hold in memory.

:class:`ByteBudget` is a counting semaphore in bytes: many small parts or a few large ones may be in flight; one
request larger than the whole budget still goes, alone, so a budget never deadlocks on a big part.
:func:`release_free_memory` hands freed heap back to the OS after a save or an upload.

>>> b = ByteBudget(100)
>>> b.acquire(60); b.try_acquire(60), b.in_use
(False, 60)
>>> b.release(60); b.acquire(250); b.in_use  # larger than the budget: allowed when nothing else is held
250
>>> b.release(250)
"""

from __future__ import annotations

import ctypes
import functools
import threading

__all__ = ["ByteBudget", "available_memory", "holds_in_memory", "release_free_memory"]


class ByteBudget:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a byte budget must be positive, got {limit}")
        self.limit = limit
        self._used = 0
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._used

    def _fits(self, n: int) -> bool:
        return not self._used or self._used + n <= self.limit

    def acquire(self, n: int) -> None:
        """Block until ``n`` more bytes fit (or nothing else is held)."""
        with self._cond:
            self._cond.wait_for(lambda: self._fits(n))
            self._used += n

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes if they fit now; never blocks."""
        with self._cond:
            if not self._fits(n):
                return False
            self._used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self._used -= n
            self._cond.notify_all()


@functools.cache
def _malloc_trim():  # type: ignore[no-untyped-def]
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Return to the OS what glibc keeps in its per-thread arenas after a save's transient buffers are freed.

    Freed blocks below the (dynamic, up to 32 MB) mmap threshold stay in the arena of the thread that used them;
    the writer and the upload threads each keep their own, so a process grows by a few hundred MB after the first
    save and stays there. No-op where there is no glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def available_memory() -> int | None:
    """The kernel's estimate of the memory that can be taken without swapping (``MemAvailable``), in bytes;
    None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def holds_in_memory(nbytes: int, available: int | None) -> bool:
    """Whether a download of ``nbytes`` about to be loaded may be kept in anonymous memory (which, unlike the
    page cache, the kernel cannot drop under pressure): up to a quarter of what is available, never when
    that is unknown.

    >>> holds_in_memory(1 << 30, 8 << 30), holds_in_memory(3 << 30, 8 << 30), holds_in_memory(1, None)
    (True, False, False)
    """
    return available is not None and nbytes <= available // 4
