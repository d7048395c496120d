"""CPU priority of syncckpt's background threads.

A checkpoint's background work (health check, writing, hashing, uploading) should use the CPU time training
leaves idle rather than take turns with it. On Linux a thread has its own nice value and the threads it starts
inherit it, so the writer and uploader threads lower their own priority when they start: the scheduler then
runs them in the gaps (between kernels, while data loads, while a GPU computes) and gives them only a small share
of a core that training keeps busy. Elsewhere (macOS, Windows) setpriority would change the whole process, so
nothing is changed there.

>>> import threading
>>> t = threading.Thread(target=lower_priority, args=(0,)); t.start(); t.join()  # 0: leave it as it is
"""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["lower_priority"]

log = logging.getLogger("syncckpt")


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value to ``nice`` (0..19) on Linux; never lowers it, never raises."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, min(nice, 19))
    except OSError as e:  # a sandbox without the syscall: the thread keeps the process's priority
        log.debug("could not lower the priority of %s: %s", threading.current_thread().name, e)
