"""Per-rank data state under torchrun (gloo, CPU): ranks that stream different shards (``split_dataset_by_node``
through a ShuffleBuffer in a StatefulDataLoader) each get their own loader state back after a SIGKILL, and continue
exactly as the uninterrupted run; a mid-epoch checkpoint of such state refuses another world size in one line.
Before, rank 0's state was saved once and loaded on every rank: rank 1 trained rank 0's samples and lost its own.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from per_rank_job import BATCH, ROWS, rank_loader  # noqa: E402
from test_elastic import run_job  # noqa: E402

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("per_rank_job.py")


_IDS = re.compile(r"ids (\d+) (\d+) (\[[0-9, ]*\])$")


def _by_rank_and_step(lines: list[str]) -> dict[int, dict[int, list[int]]]:
    """Each rank's batch per step, from its ``ids STEP RANK [..]`` lines. Searched, not matched at the start: the
    ranks' stderr shares the pipe, and a warning written in pieces can leave part of a line just before one."""
    out: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for ln in lines:
        m = _IDS.search(ln)
        if m:
            out[int(m.group(2))][int(m.group(1))] = json.loads(m.group(3))
    return out


def test_each_rank_resumes_its_own_stream_and_another_world_size_is_refused(tmp_path: Path):
    reference = {r: [b["i"].tolist() for b in rank_loader(r, 2)] for r in (0, 1)}  # uninterrupted, per rank
    steps = len(reference[0])
    assert steps == len(reference[1]) == 2 * ROWS // BATCH
    args = ["--ckpt-dir", str(tmp_path / "ckpt")]

    killed, _ = run_job(args, 2, kill_after=3, job=JOB)
    assert "step 3" in killed, "\n".join(killed[-40:])
    resumed, rc = run_job(args, 2, job=JOB)
    assert rc == 0, "\n".join(resumed[-40:])
    seen = _by_rank_and_step(killed)
    for rank, done in _by_rank_and_step(resumed).items():
        assert min(done) == 4, done  # resumed after checkpoint-step-3
        seen[rank].update(done)
    for rank in (0, 1):
        trained = [seen[rank][s] for s in range(1, steps + 1)]
        assert trained == reference[rank], f"rank {rank}: {trained} != {reference[rank]}"
        shards = {i // ROWS for batch in trained for i in batch}
        assert shards == {rank, rank + 2}, shards  # split_dataset_by_node: rank r streams shards r, r + 2

    alone, rc = run_job(args, 1, job=JOB)  # checkpoint-step-8 is mid-epoch (batch_idx 7): refused on 1 rank
    failed = [ln for ln in alone if ln.startswith("resume failed:")]
    assert rc != 0 and len(failed) == 1, "\n".join(alone[-40:])
    assert "StateMismatch" in failed[0] and "saved by 2 rank(s); resume with 2 (now 1)" in failed[0], failed[0]
