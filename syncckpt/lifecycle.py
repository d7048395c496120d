"""The end of a process: SIGTERM, interpreter exit and the grace period, for any front end that checkpoints.

A preempted notebook or job gets SIGTERM and a grace period. The signal handler only notes the time; the owner
calls :meth:`Lifecycle.finish` at its next consistent point (the manager's ``step()``/``save_epoch()``), which
takes the last checkpoint, flushes within what is left of the grace period and exits with status 143. A watchdog
covers a loop that never gets there (a long validation): at half the grace period it flushes what is committed
and exits anyway. At interpreter exit, pending work is flushed for at most the grace period.

>>> flushed = []
>>> life = Lifecycle(flush=lambda timeout: flushed.append(timeout) or True, grace_period=5, mirrored=False,
...                  handle_sigterm=False, on_exit=lambda: None)
>>> life.requested
False
>>> life.request(); life.requested
True
>>> try:
...     life.finish(save=lambda: print("last checkpoint"))
... except SystemExit as e:
...     print(e.code)
last checkpoint
143
>>> life.close()
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

log = logging.getLogger("syncckpt")


class Lifecycle:
    """Signal and exit handling for one owner.

    ``flush(timeout)`` waits for the owner's pending saves and uploads (True when all done). ``mirrored`` only
    picks the log wording. ``on_exit()`` runs at interpreter exit (the owner flushes and closes there).
    """

    def __init__(
        self,
        *,
        flush: Callable[[float | None], bool],
        grace_period: float,
        mirrored: bool,
        handle_sigterm: bool,
        on_exit: Callable[[], None],
        save_on_sigterm: bool = True,
    ) -> None:
        self.grace_period = grace_period
        self.save_on_sigterm = save_on_sigterm
        self._flush = flush
        self._mirrored = mirrored
        self._pid = os.getpid()
        self._term_at: float | None = None
        self._done = threading.Event()
        self._prev: Any = None
        self._installed = False
        exit_ref = weakref.WeakMethod(on_exit) if hasattr(on_exit, "__self__") else (lambda: on_exit)
        self._atexit = lambda: (f := exit_ref()) is not None and f()
        atexit.register(self._atexit)
        if handle_sigterm and threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    @property
    def requested(self) -> bool:
        """SIGTERM arrived (here, or on another rank: see :meth:`request`)."""
        return self._term_at is not None

    def request(self) -> None:
        """Note a termination request another rank saw (every rank must finish at the same step)."""
        if self._term_at is None:
            self._term_at = time.monotonic()

    def remaining(self) -> float:
        """Seconds left of the grace period since the request."""
        return max(0.0, (self._term_at or time.monotonic()) + self.grace_period - time.monotonic())

    def finish(self, save: Callable[[], None] | None) -> NoReturn | None:
        """At a consistent point after a request: ``save()`` the last checkpoint (when saving on SIGTERM), flush
        within the grace period, then exit with status 143. Returns at once if already finishing."""
        if self._done.is_set():
            return None
        try:
            if self.save_on_sigterm and save is not None:
                save()
            ok = self._flush(self.remaining())
            done = "checkpoint saved and mirrored" if self._mirrored else "checkpoint saved"
            log.warning("SIGTERM: %s; exiting", done if ok else "flush incomplete")
        finally:
            self._done.set()
        raise SystemExit(143)

    def close(self) -> None:
        """Stop handling: the previous SIGTERM handler is back and nothing runs at exit."""
        atexit.unregister(self._atexit)
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._prev or signal.SIG_DFL)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._term_at is not None or os.getpid() != self._pid:
            return
        self._term_at = time.monotonic()
        log.warning(
            "SIGTERM received: %s at the next step, then flushing uploads (grace period %.0fs)",
            "saving a last checkpoint" if self.save_on_sigterm else "stopping",
            self.grace_period,
        )
        threading.Thread(target=self._watchdog, name="syncckpt-sigterm", daemon=True).start()

    def _watchdog(self) -> None:
        # If the loop does not reach a step boundary in time (a long validation), flush what is committed and exit.
        if self._done.wait(self.grace_period * 0.5):
            return
        ok = self._flush(self.remaining())
        done = "committed checkpoints are mirrored" if self._mirrored else "committed checkpoints are saved"
        log.warning(
            "SIGTERM: training did not reach a step boundary in time; %s; exiting", done if ok else "flush incomplete"
        )
        logging.shutdown()
        os._exit(143)
