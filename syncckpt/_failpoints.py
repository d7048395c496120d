"""Crash points for the reliability suite: ``SYNCCKPT_FAILPOINT=NAME[:N]`` makes the process SIGKILL itself the
N-th time (default 1st) it reaches failpoint NAME. Unset (always, outside tests) it costs one comparison.

The suite also kills processes at random instants from outside; named points guarantee that every step of the
commit protocol (snapshot, serialisation, local rename, remote data/manifest/LATEST, retention deletes) is hit.
"""

from __future__ import annotations

import os
import signal
import threading

_SPEC = os.environ.get("SYNCCKPT_FAILPOINT", "")
_NAME, _, _N = _SPEC.partition(":")
_TARGET = int(_N) if _N.isdigit() else 1
_hits = 0
_lock = threading.Lock()

NAMES = (
    "snapshot",
    "serialize",
    "local-manifest",
    "local-rename",
    "retention-delete",
    "remote-data",
    "remote-manifest",
    "remote-latest",
    "remote-delete",
)
# Reached only when a save starts with the mirror idle (its data then goes while it is written, remote.early),
# which a chain of fast saves rarely gives; hit for sure by the early-data crash test.
EARLY_NAMES = ("remote-early-data",)
# Points inside quarantine (a damaged checkpoint moved aside at resume); hit only by the quarantine crash test.
QUARANTINE_NAMES = ("quarantine-rename", "quarantine-index", "quarantine-latest")


def failpoint(name: str) -> None:
    global _hits
    if not _NAME or name != _NAME:
        return
    with _lock:
        _hits += 1
        if _hits == _TARGET:
            os.kill(os.getpid(), signal.SIGKILL)
