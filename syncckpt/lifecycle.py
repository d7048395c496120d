"""The end of a process: SIGTERM, Ctrl-C, interpreter exit and the grace period, for any front end that checkpoints.

A preempted notebook or job gets SIGTERM and a grace period. The signal handler only notes the time; the owner
calls :meth:`Lifecycle.finish` at its next consistent point (the manager's ``step()``/``save_epoch()``), which
takes the last checkpoint, flushes within what is left of the grace period and exits with status 143. A watchdog
covers a loop that never gets there (a long validation, a stalled DataLoader): at half the grace period it asks the
owner to save what it can save consistently from outside the loop (``on_stalled``), flushes and exits anyway. At
interpreter exit, pending work is flushed for at most ``exit_timeout`` (the grace period by default), a warning
names what is still pending, and the owner is closed (``on_exit``); a failed mirror is one logged line there.

The signals are configurable (:func:`default_signals`: SIGTERM, plus SIGUSR1 under SLURM). Before exiting, every
rank agrees (``before_exit``: a barrier), and under SLURM the job is requeued (``scontrol requeue``) once the last
checkpoint is mirrored (``requeue``).

Ctrl-C (SIGINT: a terminal, the notebook's stop button) works the same way when ``handle_interrupt`` is on: the
first one is noted and :meth:`Lifecycle.finish_interrupt` takes a last checkpoint at the next step boundary, then
raises KeyboardInterrupt there (a notebook cell ends, the kernel lives on and the next run can resume); a second
Ctrl-C before that interrupts at once, as Python does. Only Python's default SIGINT handler is replaced.

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
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from .deadline import Deadline, announce, taking_last
from .errors import ConfigError, SyncCkptError

log = logging.getLogger("syncckpt")

# ``record.syncckpt_event`` of the line that ends a Ctrl-C (what was saved): a program that reports the end
# itself (scripts/train_hallucination.py) drops that line with a logging filter instead of saying it twice.
INTERRUPTED_EVENT = "interrupted"


def check_grace_period(grace_period: float) -> float:
    """``grace_period`` when it is a positive, finite number of seconds, else ConfigError (a negative one used to
    be taken as is, and every wait on SIGTERM returned at once)."""
    if isinstance(grace_period, bool) or not isinstance(grace_period, (int, float)) or not 0 < grace_period < 1e12:
        raise ConfigError(f"grace_period must be a positive number of seconds, got {grace_period!r}")
    return grace_period


class Lifecycle:
    """Signal and exit handling for one owner.

    ``flush(timeout)`` waits for the owner's pending saves and uploads (True when all done). ``mirrored`` only
    picks the log wording. At interpreter exit the lifecycle flushes for ``exit_timeout`` seconds, warns with
    ``status()`` when work is still pending, then calls ``on_exit()`` (the owner closes there).
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
        handle_interrupt: bool = False,
        deadline: Deadline | None = None,
        signals: Sequence[int] | None = None,
        requeue: bool = False,
        on_stalled: Callable[[], str | None] | None = None,
        before_exit: Callable[[], None] | None = None,
        exit_timeout: float | None = None,
        status: Callable[[], Any] | None = None,
    ) -> None:
        self.grace_period = check_grace_period(grace_period)
        self._exit_timeout = grace_period if exit_timeout is None else exit_timeout
        self._status = status or (lambda: "see status()")
        self.save_on_sigterm = save_on_sigterm
        self._flush = flush
        self._mirrored = mirrored
        self._pid = os.getpid()
        self._term_at: float | None = None
        self._why = "SIGTERM"  # what asked for the end: the log says it
        self._deadline = deadline
        self._requeue = requeue
        self._on_stalled = on_stalled
        self._before_exit = before_exit or (lambda: None)
        announce(deadline)
        self._done = threading.Event()
        self._returned = threading.Event()  # the loop came back to a boundary after the signal: finish() owns the end
        self._installed = False
        self._int_at: float | None = None
        self._int_installed = False
        exit_ref = weakref.WeakMethod(on_exit) if hasattr(on_exit, "__self__") else (lambda: on_exit)
        self._atexit = lambda: (f := exit_ref()) is not None and self._at_exit(f)
        _arm_exit(self._atexit)
        main = threading.current_thread() is threading.main_thread()
        shielded: list[int] = []
        self._prev_handlers: dict[int, Any] = {}
        if handle_sigterm and main:
            for sig in default_signals(os.environ) if signals is None else signals:
                self._prev_handlers[sig] = _original_handler(signal.signal(sig, self._on_sigterm), sig)
                shielded.append(sig)
            self._installed = bool(shielded)
        # Python's default, or the handler of an earlier owner never closed (a notebook cell run again builds a
        # new manager): the newest owner handles Ctrl-C, else it would be swallowed by one that never steps.
        current = signal.getsignal(signal.SIGINT)
        if handle_interrupt and main and (current is signal.default_int_handler or _is_lifecycle(current)):
            signal.signal(signal.SIGINT, self._on_sigint)
            self._int_installed = True
            shielded.append(signal.SIGINT)  # Ctrl-C in a terminal reaches the DataLoader workers too
        if shielded:
            from ._workers import shield_dataloader_workers  # a job-wide signal must not kill DataLoader workers

            shield_dataloader_workers(shielded)

    @property
    def requested(self) -> bool:
        """SIGTERM arrived (here, or on another rank: see :meth:`request`)."""
        return self._term_at is not None

    def request(self, why: str | None = None) -> None:
        """Note a termination request another rank saw (every rank must finish at the same step), or one of the
        owner's own (``why``: e.g. the session deadline)."""
        if self._term_at is None:
            self._term_at = time.monotonic()
            self._why = why or self._why

    @property
    def interrupted(self) -> bool:
        """Ctrl-C arrived and the last checkpoint is not taken yet (here, or on another rank: :meth:`interrupt`)."""
        return self._int_at is not None

    def interrupt(self) -> None:
        """Note a Ctrl-C another rank saw (every rank must stop at the same step)."""
        if self._int_at is None:
            self._int_at = time.monotonic()

    def finish_interrupt(self, save: Callable[[], None], last: Callable[[], str | None]) -> NoReturn:
        """At a consistent point after Ctrl-C: ``save()`` the last checkpoint, flush within the grace period, say
        what ``last()`` names as saved, then raise KeyboardInterrupt. Ready for the next run afterwards."""
        try:
            save()
            ok = self._flush(self.grace_period)
            name = last()
            said = {"syncckpt_event": INTERRUPTED_EVENT}  # a caller with a last word of its own filters on it
            if name is None:
                log.warning("Interrupted: no checkpoint was saved", extra=said)
            else:
                done = "saved and mirrored" if self._mirrored else "saved"
                log.warning(
                    "Interrupted: %s %s%s; run again to resume from it",
                    name,
                    done,
                    "" if ok else " (flush incomplete: still uploading)",
                    extra=said,
                )
        finally:
            self._int_at = None
        raise KeyboardInterrupt

    def deadline_due(self, global_step: int, last_durable_seconds: float | None) -> bool:
        """At a step boundary: whether the session deadline calls for the last checkpoint now; if so the end is
        requested (as on SIGTERM: the last checkpoint, mirrored, then exit) and the log says so once."""
        d = self._deadline
        if d is None or not d.save_due(last_durable_seconds):
            return False
        taking_last(d, global_step, last_durable_seconds)
        self._deadline = None
        self.request("Session deadline")
        return True

    def at_boundary(
        self,
        save: Callable[[], None],
        last: Callable[[], str | None],
        *,
        terminating: bool | None = None,
        interrupted: bool | None = None,
    ) -> None:
        """At a consistent point (a step or epoch boundary): after SIGTERM :meth:`finish`, after Ctrl-C
        :meth:`finish_interrupt`, with ``save`` taking the last checkpoint. ``terminating``/``interrupted`` are the
        decisions every rank agreed on (default: what this process saw); otherwise this returns at once."""
        if self.requested if terminating is None else terminating:
            self.request()
            self.finish(save, last)
        if self.interrupted if interrupted is None else interrupted:
            self.interrupt()
            self.finish_interrupt(save, last)

    def remaining(self) -> float:
        """Seconds left of the grace period since the request."""
        return max(0.0, (self._term_at or time.monotonic()) + self.grace_period - time.monotonic())

    def finish(self, save: Callable[[], None] | None, last: Callable[[], str | None] | None = None) -> NoReturn | None:
        """At a consistent point after a request: ``save()`` the last checkpoint (when saving on SIGTERM), flush
        within the grace period, say what ``last()`` names as saved, then exit with status 143. Returns at once if
        already finishing. From here on the watchdog stands down: the flush is bounded by the grace period."""
        if self._done.is_set():
            return None
        self._returned.set()
        try:
            if self.save_on_sigterm and save is not None:
                save()
            ok = self._flush(self.remaining())
            log.warning("%s: %s; exiting", self._why, self._saved_line(last() if last is not None else None, ok))
            self._exit_timeout = min(self._exit_timeout, self.remaining())  # the exit flush gets what is left
            self._end()
        finally:
            self._done.set()
        raise SystemExit(143)

    def _at_exit(self, close: Callable[[], None]) -> None:
        if os.getpid() != self._pid:
            return
        try:  # an exception here would only reach stderr as "Exception ignored in atexit callback"
            if not self._flush(self._exit_timeout):
                log.warning(
                    "Exiting with checkpoint work still pending after %.0fs: %s", self._exit_timeout, self._status()
                )
            close()
        except SyncCkptError as e:  # on_upload_error="raise" and the mirror failed: say so plainly
            log.error("At exit: %s", e)

    def _end(self) -> None:
        """Before the exit: every rank agrees (``before_exit``), then the job is requeued when asked (SLURM)."""
        self._before_exit()
        if self._requeue:
            requeue_slurm_job(os.environ)

    def close(self) -> None:
        """Stop handling: the handlers from before any owner are back and nothing runs at exit."""
        _disarm_exit(self._atexit)
        if self._installed and threading.current_thread() is threading.main_thread():
            for sig, prev in self._prev_handlers.items():
                if signal.getsignal(sig) == self._on_sigterm:  # a newer owner's stays
                    signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
            self._installed = False
        if self._int_installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) == self._on_sigint:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            self._int_installed = False

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._term_at is not None or os.getpid() != self._pid:
            return
        self._term_at = time.monotonic()
        self._why = signal.Signals(signum).name
        log.warning(
            "%s received: %s at the next step, then flushing uploads (grace period %.0fs)",
            self._why,
            "saving a last checkpoint" if self.save_on_sigterm else "stopping",
            self.grace_period,
        )
        threading.Thread(target=self._watchdog, name="syncckpt-sigterm", daemon=True).start()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            raise KeyboardInterrupt
        if self._int_at is not None:  # the second Ctrl-C: stop now
            self._int_at = None
            raise KeyboardInterrupt
        self._int_at = time.monotonic()
        log.warning("Interrupted: saving a last checkpoint at the next step, then stopping (Ctrl-C again to stop now)")

    def _saved_line(self, name: str | None, flushed: bool) -> str:
        """What the exit line says was saved, and whether it is mirrored; when the flush did not finish, which
        checkpoint (``name``, when known) only the local folder holds."""
        if flushed:
            return "checkpoint saved and mirrored" if self._mirrored else "checkpoint saved"
        if not self._mirrored:
            return "flush incomplete"
        what = name or "the last checkpoint"
        return f"{what} saved locally; flush incomplete: not mirrored yet, only the local copy has it"

    def _watchdog(self) -> None:
        # The loop did not come back to a step boundary in time (a long validation, a stalled DataLoader, a long
        # save_epoch): save what the owner can save consistently from here (``on_stalled``), flush, exit. Once it
        # came back, finish() owns the end (its flush is bounded by the grace period) and this stands down.
        if self._returned.wait(self.grace_period * 0.5):
            return
        saved = None
        if self._on_stalled is not None and self.save_on_sigterm:
            try:
                saved = self._on_stalled()
            except Exception as e:  # noqa: BLE001 - the exit must happen whatever the save did
                log.warning("%s: could not save from outside the training loop: %s", self._why, e)
        ok = self._flush(self.remaining())
        done = "mirrored" if self._mirrored else "saved"
        log.warning(
            "%s: training did not come back to step() within %.0fs (half the grace period); %s; %s; exiting",
            self._why,
            self.grace_period * 0.5,
            saved or "the last committed checkpoint is the last state",
            done if ok else "flush incomplete",
        )
        if ok and self._requeue:
            requeue_slurm_job(os.environ)
        logging.shutdown()
        os._exit(143)


# ---- interpreter exit -------------------------------------------------------------------------------------------
# The exit flush uploads through thread pools (files in parallel, ranged reads), and concurrent.futures refuses new
# work once its own exit hook has run ("cannot schedule new futures after interpreter shutdown"): an atexit
# callback comes too late, and a checkpoint pending when a script crashed was never mirrored. threading's exit
# hooks run first, newest first, while pools still take work and before non-daemon threads are joined; one hook,
# registered after concurrent.futures' own, runs the armed owners' exit callbacks, newest first.
_EXIT_CALLBACKS: dict[int, Callable[[], Any]] = {}  # id -> callback, in arming order
_EXIT_LOCK = threading.Lock()
_exit_hook_registered = False


def _run_exit_callbacks() -> None:
    with _EXIT_LOCK:
        callbacks = list(_EXIT_CALLBACKS.values())
        _EXIT_CALLBACKS.clear()
    for callback in reversed(callbacks):
        try:
            callback()
        except Exception:  # noqa: BLE001 - one owner's failure must not stop the others' flush
            log.exception("syncckpt: exit flush failed")


def _arm_exit(callback: Callable[[], Any]) -> None:
    """Run ``callback`` at interpreter exit, before thread pools stop taking work (until :func:`_disarm_exit`)."""
    global _exit_hook_registered
    with _EXIT_LOCK:
        _EXIT_CALLBACKS[id(callback)] = callback
        if _exit_hook_registered:
            return
        _exit_hook_registered = True
    import concurrent.futures.thread  # noqa: F401 - its exit hook is registered at import: ours must come after

    register = getattr(threading, "_register_atexit", None) or atexit.register  # the hook concurrent.futures uses
    try:
        register(_run_exit_callbacks)
    except RuntimeError:  # already shutting down: atexit is the next best
        atexit.register(_run_exit_callbacks)


def _disarm_exit(callback: Callable[[], Any]) -> None:
    with _EXIT_LOCK:
        _EXIT_CALLBACKS.pop(id(callback), None)


def _is_lifecycle(handler: Any) -> bool:
    return isinstance(getattr(handler, "__self__", None), Lifecycle)


def _original_handler(handler: Any, sig: int) -> Any:
    """What to restore at close: the handler from before any owner (an earlier owner's, never closed, is not)."""
    if _is_lifecycle(handler):
        return handler.__self__._prev_handlers.get(sig, signal.SIG_DFL)
    return handler


def default_signals(environ: Mapping[str, str]) -> list[int]:
    """The signals that end a run with a last checkpoint: SIGTERM, plus SIGUSR1 under SLURM (``SLURM_JOB_ID``),
    which ``sbatch --signal=USR1@90`` sends ahead of the time limit.

    >>> [s.name for s in default_signals({})], [s.name for s in default_signals({"SLURM_JOB_ID": "42"})]
    (['SIGTERM'], ['SIGTERM', 'SIGUSR1'])
    """
    return [signal.SIGTERM, *([signal.SIGUSR1] if environ.get("SLURM_JOB_ID") else [])]


def requeue_slurm_job(environ: Mapping[str, str], timeout: float = 15.0) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` after the last checkpoint is mirrored; True when scontrol agreed. A
    failure is logged, never raised: the checkpoint is safe either way."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("Could not requeue SLURM job %s: %s", job, e)
        return False
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, (done.stderr or done.stdout).strip())
        return False
    log.warning("Requeued SLURM job %s: it resumes from the last checkpoint when it runs again", job)
    return True
