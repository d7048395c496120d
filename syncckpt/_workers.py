"""Keep DataLoader workers alive when a termination signal reaches every process of the job, so that the main
process can take its last checkpoint.

SLURM (scancel, the time limit), systemd, GNU ``timeout``, ``tini -g``, dumb-init, torchrun (it stops each rank
with ``killpg``) and ``kill -TERM -- -PGID`` signal every process of a job, DataLoader workers included. torch's
worker handler (``handler_SIGTERM`` in torch/csrc/DataLoader.cpp, installed at the start of ``_worker_loop`` by
``_utils.signal_handling._set_worker_signal_handlers``) calls ``_exit(0)`` when the worker's parent sent the signal
and otherwise dies by it; the main process's SIGCHLD handler then raises ``RuntimeError: DataLoader worker (pid N)
is killed by signal: Terminated.`` before the loop reaches the ``step()`` that would save: exit status 1, not 143,
and no last checkpoint.

:func:`shield_dataloader_workers` (lifecycle.py calls it for the signals a CheckpointManager handles: SIGTERM, and
SIGINT, which a terminal sends to its whole foreground group) makes each DataLoader worker started afterwards block
the signals before torch's loop runs (threads started later inherit the mask, so torch's handler never runs) and
take them in one thread with ``sigwaitinfo``, which, unlike a Python signal handler, says who sent the signal:

- from the DataLoader's process (or the worker's parent): ``_exit(0)``, as torch does, so ``_shutdown_workers``
  (join, then ``terminate()``) and multiprocessing's exit hook (``terminate()``, then ``join()`` without a
  timeout) still end the workers;
- from anyone else while that process runs: ignored; the worker serves batches until the main process shuts it
  down as it exits;
- once the DataLoader's process is gone (``os._exit``, SIGKILL) without stopping it: ``_exit(0)`` within 1 s
  (0.1 s after such a signal), even when the worker is blocked in its dataset, where torch's own check of its
  parent never runs and the blocked signals could no longer end it.

Covered: torch's ``DataLoader`` iterators started after the call, persistent workers included, with the fork
start method (Linux's default before Python 3.14). spawn and forkserver workers import this module when they
unpickle their entry point and are covered when they start with a single thread. But numpy's OpenBLAS (torch
imports numpy) starts its thread pool in them before any code of ours runs; the kernel may hand the signal to one
of those threads, where torch's handler runs, so such a worker is left as torch made it (``OMP_NUM_THREADS=1`` or
``OPENBLAS_NUM_THREADS=1`` in the job's environment gets it covered). Under forkserver the fork server dies by the
same signal; a shielded worker then watches the DataLoader's process rather than its parent. Not covered: loaders
with their own worker entry point (torchdata's StatefulDataLoader), platforms without ``signal.sigwaitinfo``
(Windows, macOS: nothing changes there), SIGKILL. The mask survives ``exec``: a program a worker starts with
``subprocess`` starts with the signals blocked, so stop it with ``kill()``, or pass ``Popen`` a ``preexec_fn``
(any: Python's fork hooks then run in the child, and one unblocks them, as in children made with ``os.fork``).

>>> import torch
>>> from torch.utils.data import DataLoader
>>> shield_dataloader_workers()  # idempotent; False where the platform or torch lacks what it needs
True
>>> [b.tolist() for b in DataLoader(torch.arange(4), batch_size=2, num_workers=2)]
[[0, 1], [2, 3]]
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger("syncckpt")

_ORPHAN_POLL_S = 0.1  # after a signal from outside: the owner may be going too
_OWNER_POLL_S = 1.0
_lock = threading.Lock()


def shield_dataloader_workers(signals: Iterable[int] = (signal.SIGTERM,)) -> bool:
    """Make DataLoader workers started from now on ignore ``signals`` unless their parent sends them.

    Idempotent: a second call adds its signals to those of the first. Returns whether the shield is in place.

    >>> import signal
    >>> shield_dataloader_workers([signal.SIGTERM])
    True
    """
    wanted = frozenset(signal.Signals(s) for s in signals)
    if not (hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask")):
        log.debug("DataLoader workers are not shielded from group signals: no signal.sigwaitinfo on this platform")
        return False
    try:
        from torch.utils.data._utils import worker
    except ImportError as e:
        log.debug("DataLoader workers are not shielded from group signals: %s", e)
        return False
    with _lock:
        # torch's DataLoader looks ``_utils.worker._worker_loop`` up each time it starts a worker
        # (``Process(target=_utils.worker._worker_loop, ...)``), so replacing that attribute reaches every worker
        # started afterwards. Wrapping ``_set_worker_signal_handlers`` instead would miss spawn and forkserver,
        # whose fresh interpreters never see a patch made in this one; an entry point that pickles by reference
        # to this module makes them import it. A torch without that attribute keeps its own behaviour.
        current = getattr(worker, "_worker_loop", None)
        if isinstance(current, _ShieldedWorkerLoop):
            if not wanted <= current.signals:
                worker._worker_loop = _ShieldedWorkerLoop(current.signals | wanted, current.original)
            return True
        if not callable(current):
            log.debug(
                "DataLoader workers are not shielded from group signals: torch %s has no "
                "torch.utils.data._utils.worker._worker_loop",
                torch.__version__,
            )
            return False
        worker._worker_loop = _ShieldedWorkerLoop(wanted, current)
    return True


class _ShieldedWorkerLoop:
    """Stands in for torch's ``_worker_loop``: shields the worker process, then runs torch's loop unchanged."""

    def __init__(
        self, signals: frozenset[signal.Signals], original: Callable[..., None] | None = None, owner: int | None = None
    ) -> None:
        self.signals = signals
        self.original = original
        self.owner = owner  # the process that owns the DataLoader; None: the worker's parent (fork)

    def __reduce__(self) -> tuple[Any, ...]:
        # spawn/forkserver pickle the target: the worker gets the signals and this process's pid, and finds
        # torch's loop in its own interpreter
        return (_ShieldedWorkerLoop, (self.signals, None, os.getpid()))

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        try:
            _shield_this_worker(self.signals, _Owner(os.getppid() if self.owner is None else self.owner))
        except Exception:  # e.g. no thread left to start: the worker still serves, as torch made it
            log.debug("DataLoader worker %d not shielded from group signals", os.getpid(), exc_info=True)
        return _torch_worker_loop(self.original)(*args, **kwargs)


def _torch_worker_loop(original: Callable[..., None] | None) -> Callable[..., None]:
    from torch.utils.data._utils import worker

    if original is not None:
        return original
    loop = worker._worker_loop  # the worker's own torch: the original unless this process shielded it too
    return loop.original if isinstance(loop, _ShieldedWorkerLoop) and loop.original is not None else loop


class _Owner:
    """Whether the process that owns the DataLoader still runs.

    With fork and spawn the owner is the worker's parent and a changed ``getppid()`` says it is gone, which is
    torch's own test. With forkserver the parent is the fork server, which the job's signal kills as well (its
    SIGTERM disposition is the default), so the owner itself is watched, through a pidfd where there is one.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.parent = os.getppid()
        self._pidfd: int | None = None
        if pid != self.parent and hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(pid)
            except OSError:  # already gone, or a kernel without pidfds: os.kill below
                pass

    def is_alive(self) -> bool:
        if self.pid == self.parent:
            return os.getppid() == self.parent
        if self._pidfd is not None:
            return not select.select([self._pidfd], [], [], 0)[0]
        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, PermissionError):  # PermissionError: the pid now names someone else's process
            return False
        return True


def _shield_this_worker(signals: frozenset[signal.Signals], owner: _Owner) -> None:
    """In the worker, before torch's loop: block ``signals`` (threads started later inherit the mask) and take
    them in a daemon thread. torch's loop then installs its handlers, which never run for a blocked signal."""
    if _other_threads():
        # spawn, forkserver: numpy's OpenBLAS (torch imports numpy) started threads before this code could run.
        # They do not block the signals and the kernel hands a process-directed signal to one of them, where
        # torch's handler kills the worker anyway; blocking would only leak the mask into the worker's subprocesses.
        log.debug("DataLoader worker %d not shielded from group signals: it already runs other threads", os.getpid())
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        threading.Thread(
            target=_take_signals, args=(signals, owner), name="syncckpt-worker-signals", daemon=True
        ).start()
    except BaseException:
        # blocked with no one to take them, the parent's terminate() would go unheard
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise
    newly = signals - set(blocked)
    if newly and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, newly))
    if owner.pid != owner.parent:
        from torch.utils.data._utils import worker

        if hasattr(worker, "ManagerWatchdog"):
            # torch's loop ends when its parent goes; under forkserver that is the fork server, dead from the same
            # signal while the owner still wants batches. Watch the owner instead (this worker process only).
            worker.ManagerWatchdog = lambda: owner


def _other_threads() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) > 1
    except OSError:  # no procfs: take it for a fork child, which runs only the thread that forked
        return False


def _take_signals(signals: frozenset[signal.Signals], owner: _Owner) -> None:
    # The owner is watched all along, not only after an ignored signal: a worker blocked in its dataset never
    # reaches torch's own check of its parent, and with these signals blocked only SIGKILL could end it once the
    # owner left without terminating it (os._exit after a last checkpoint). After an ignored signal, more often.
    poll = _OWNER_POLL_S
    while True:
        info = signal.sigtimedwait(signals, poll)
        if not owner.is_alive() or (info is not None and info.si_pid in (owner.pid, owner.parent)):
            os._exit(0)  # torch's handler_SIGTERM does this for its parent; a non-zero status would be reported
        if info is not None:
            poll = _ORPHAN_POLL_S
