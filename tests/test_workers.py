"""syncckpt._workers: DataLoader workers (fork start method) under real signals, in this process.

A SIGTERM that does not come from the worker's parent is sent by a separate ``kill`` process, as a scheduler would;
the test then waits, through /proc, until the worker has taken it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils import worker

from syncckpt._workers import _ShieldedWorkerLoop, shield_dataloader_workers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; needs sigwaitinfo")


class Items(Dataset):
    """``i -> i``; with ``stall_from``, items from that index on block for a minute (a busy worker)."""

    def __init__(self, n: int, stall_from: int | None = None) -> None:
        self.n, self.stall_from = n, stall_from

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if self.stall_from is not None and i >= self.stall_from:
            time.sleep(60)
        return i


class Masks(Dataset):
    """Item 0: the worker's blocked-signal mask, and that of a child it forks."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> tuple[int, int]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, _blocked().to_bytes(8, "little"))
            os._exit(0)
        os.close(w)
        child = int.from_bytes(os.read(r, 8), "little")
        os.close(r)
        os.waitpid(pid, 0)
        return _blocked(), child


def _blocked(pid: int | str = "self") -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("SigBlk:", 1)[1].split()[0], 16)


def _threads(workers: list) -> dict[int, list[str]]:
    """Each worker's threads by name: what to look at when a worker was left unshielded."""
    return {
        w.pid: [Path(t, "comm").read_text().strip() for t in Path(f"/proc/{w.pid}/task").iterdir()] for w in workers
    }


def _pending(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("ShdPnd:", 1)[1].split()[0], 16)


def _bit(sig: int) -> int:
    return 1 << (sig - 1)


def _signal_from_elsewhere(pids: list[int], sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to each pid from a ``kill`` process (not the workers' parent), then wait until each took it."""
    subprocess.run(["kill", f"-{signal.Signals(sig).name[3:]}", *map(str, pids)], check=True)
    deadline = time.monotonic() + 10
    for pid in pids:
        while _pending(pid) & _bit(sig):
            assert time.monotonic() < deadline, f"worker {pid} never took signal {sig}"
            time.sleep(0.01)  # polling /proc: the kernel offers no event for "signal dequeued"


@pytest.fixture
def shielded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shield (SIGTERM) for this test only, over torch's own worker entry point: managers made by other tests may
    have shielded this process already, with other signals; their state comes back afterwards."""
    current = worker._worker_loop
    monkeypatch.setattr(
        worker, "_worker_loop", current.original if isinstance(current, _ShieldedWorkerLoop) else current
    )
    assert shield_dataloader_workers()


def test_shielding_again_keeps_one_wrapper_around_torchs_worker_loop(shielded):
    first = worker._worker_loop
    assert isinstance(first, _ShieldedWorkerLoop) and first.signals == {signal.SIGTERM}
    assert not isinstance(first.original, _ShieldedWorkerLoop) and first.original.__module__ == worker.__name__
    assert shield_dataloader_workers() and shield_dataloader_workers([signal.SIGTERM])
    assert worker._worker_loop is first
    assert shield_dataloader_workers([signal.SIGUSR1])
    assert worker._worker_loop.signals == {signal.SIGTERM, signal.SIGUSR1}
    assert worker._worker_loop.original is first.original


def test_a_worker_ignores_sigterm_from_another_process_and_the_loader_finishes_and_shuts_down(shielded):
    loader = DataLoader(Items(64), batch_size=4, num_workers=2)
    it = iter(loader)
    got = next(it).tolist() + next(it).tolist()  # one batch from each worker: both run torch's loop
    workers = list(it._workers)
    assert all(_blocked(w.pid) & _bit(signal.SIGTERM) for w in workers), _threads(workers)
    _signal_from_elsewhere([w.pid for w in workers])
    assert all(w.is_alive() for w in workers)
    for batch in it:
        got.extend(batch.tolist())
    assert got == list(range(64))
    for w in workers:
        w.join(timeout=10)
        assert w.exitcode == 0

    it = iter(loader)  # stopped half-way: the iterator's shutdown must not wait for a timeout
    next(it), next(it)
    workers = list(it._workers)
    _signal_from_elsewhere([w.pid for w in workers])
    start = time.monotonic()
    del it
    took = time.monotonic() - start
    assert [w.exitcode for w in workers] == [0, 0]
    assert took < 3.0, f"shutting the workers down took {took:.1f} s"  # torch waits 5 s for a worker that hangs


def test_a_busy_shielded_worker_still_ends_at_once_when_its_parent_terminates_it(shielded):
    it = iter(DataLoader(Items(64, stall_from=8), batch_size=4, num_workers=2))
    next(it), next(it)  # batches 2 and 3 (items 8..15) are being fetched now: both workers sleep in __getitem__
    workers = list(it._workers)
    start = time.monotonic()
    for w in workers:
        w.terminate()  # what _shutdown_workers and multiprocessing's exit hook do
    for w in workers:
        w.join(timeout=10)
    took = time.monotonic() - start
    assert [w.exitcode for w in workers] == [0, 0]  # torch's convention for its parent's SIGTERM
    assert took < 3.0
    del it


def test_sigusr1_can_be_shielded_too(shielded):
    assert shield_dataloader_workers([signal.SIGUSR1])
    it = iter(DataLoader(Items(16), batch_size=4, num_workers=2))
    got = next(it).tolist() + next(it).tolist()
    workers = list(it._workers)
    _signal_from_elsewhere([w.pid for w in workers], signal.SIGUSR1)  # its default action would end the worker
    assert all(w.is_alive() for w in workers)
    assert got + [i for batch in it for i in batch.tolist()] == list(range(16))


def test_a_process_a_worker_forks_does_not_inherit_the_blocked_signal(shielded):
    own, child = next(iter(DataLoader(Masks(), batch_size=None, num_workers=1)))
    assert own & _bit(signal.SIGTERM)
    assert not child & _bit(signal.SIGTERM)


def test_workers_are_left_to_torch_when_the_platform_lacks_sigwaitinfo(monkeypatch):
    before = worker._worker_loop
    monkeypatch.setattr(worker, "_worker_loop", before)
    monkeypatch.delattr(signal, "sigwaitinfo")
    assert shield_dataloader_workers() is False
    assert worker._worker_loop is before
    torch.testing.assert_close(next(iter(DataLoader(torch.arange(4), batch_size=4, num_workers=1))), torch.arange(4))
