"""Elastic resume under torchrun (gloo, CPU): an epoch killed with 2 ranks continues with 1, is killed again and
finishes with 2; every sample of the epoch is trained exactly once on some rank, plus the stated padding (three
torchrun jobs, ~40 s on 2 cores); ``tests/test_sampler.py`` checks the rule in-process for more world sizes.

The rule (README, ``syncckpt/sampler.py``): a checkpoint saves the global samples consumed ``C``; the resumed
pass splits the rest of the epoch's order, ``order[C:n]``, over the new ranks, padded to a multiple of the new
world size by repeating the epoch's first samples: ``(-(n - C)) % world_size`` of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_ddp import _cmd, _env  # noqa: E402

from syncckpt import ResumableSampler

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("elastic_job.py")
N, SEED = 101, 3  # elastic_job's dataset size and sampler seed


def run_job(args: list[str], nproc: int, kill_after: int | None = None, timeout: float = 120, job: Path = JOB):
    """Run the job under torchrun; with ``kill_after`` SIGKILL torchrun and every rank once rank 0 printed that step
    (the job holds there). torchrun starts each rank in a session of its own, so killing torchrun's process group
    would leave the ranks running: they are killed by the pids they print. Returns (lines, exit status)."""
    if kill_after is not None:
        args = [*args, "--hold-at", str(kill_after)]
    p = subprocess.Popen(
        _cmd(args, nproc, job),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    lines: list[str] = []
    pids: list[int] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("pid "):
                pids.append(int(line.split()[2]))
            if kill_after is not None and lines[-1] == f"step {kill_after}":
                for pid in [p.pid, *pids]:
                    os.kill(pid, signal.SIGKILL)  # torchrun and every rank at once, like a lost node
                break
        lines.extend((p.communicate(timeout=timeout)[0] or "").splitlines())
    finally:
        for pid in [p.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
    return lines, p.returncode


def _trained(lines: list[str], after: int, upto: float) -> list[int]:
    """Sample indices every rank trained at optimizer steps in (after, upto]."""
    ids = []
    for ln in lines:
        if ln.startswith("ids "):
            _, step, _rank, batch = ln.split(" ", 3)
            if after < int(step) <= upto:
                ids += json.loads(batch)
    return ids


def _why(lines: list[str]) -> str:
    """A failed stage's output for the assertion message: every line but the ``ids`` ones (each rank's own
    traceback and log lines, torchrun's summary), whole; rank 0's traceback is often far from the end."""
    return "\n".join(ln for ln in lines if not ln.startswith("ids "))


def _resumed_from(lines: list[str]) -> int:
    found = [ln for ln in lines if "Resuming from global step" in ln]
    assert found, _why(lines)
    return int(found[0].rsplit(" ", 1)[1])


def test_epoch_killed_with_2_ranks_resumed_with_1_then_2_trains_every_sample_once(tmp_path):
    args = ["--ckpt-dir", str(tmp_path / "ck"), "--sync-saves"]
    first, rc = run_job(args, nproc=2, kill_after=5)
    assert rc == -9, _why(first)
    second, rc = run_job(args, nproc=1, kill_after=10)
    assert rc == -9, _why(second)
    third, rc = run_job(args, nproc=2)
    assert rc == 0, _why(third)
    g1, g2 = _resumed_from(second), _resumed_from(third)
    assert (g1, g2) == (4, 10)  # --sync-saves: the checkpoint before each kill was committed
    segments = [_trained(first, 0, g1), _trained(second, g1, g2), _trained(third, g2, float("inf"))]
    consumed = len(segments[0]) + len(segments[1])
    assert [len(s) for s in segments[:2]] == [4 * 4 * 2, 6 * 4 * 1]  # 2 ranks x batch 4, then 1 rank
    order = ResumableSampler(range(N), 1, seed=SEED)
    order.set_epoch(0)
    padding = list(order)[: -(N - consumed) % 2]  # the last segment ran on 2 ranks
    trained = Counter(segments[0] + segments[1] + segments[2])
    assert trained == Counter(range(N)) + Counter(padding), (sorted(trained - Counter(range(N))), padding)
    assert len(padding) == 1
