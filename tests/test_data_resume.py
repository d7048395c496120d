"""SIGKILL mid-epoch, resume in a new process: three data pipelines end bit-identical to an uninterrupted run.

One job (``tests/distributed/data_job.py``) trains three tiny models side by side, one per pipeline: torchdata's
StatefulDataLoader with 2 workers registered as it is; a Hugging Face IterableDataset streamed from local JSONL
shards through ShuffleBuffer in a 2-worker StatefulDataLoader; random crops and noise drawn inside DataLoader
workers from per-sample generators (PerSampleRandom). One killed-and-resumed run checks all three at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from procs import assert_same_tensors, committed, env  # noqa: E402

pytestmark = pytest.mark.slow

JOB = Path(__file__).parent / "distributed" / "data_job.py"
ROWS_PER_SHARD = 12  # data_job: 48 rows in 4 shards


def _cmd(d: Path, aug_workers: int, data: Path, reads: str = "reads.log") -> list[str]:
    return [
        sys.executable,
        str(JOB),
        "--ckpt-dir",
        str(d / "ck"),
        "--data-dir",
        str(data),
        "--out",
        str(d / "out.safetensors"),
        "--reads",
        str(d / reads),
        "--aug-workers",
        str(aug_workers),
    ]


def _finish(p: subprocess.Popen) -> list[str]:
    out = p.communicate(timeout=240)[0]
    assert p.returncode == 0, (
        out[-3000:] + (Path(p.args[p.args.index("--out") + 1]).parent / "stderr.log").read_text()[-3000:]
    )
    return out.splitlines()


def _start(cmd: list[str]) -> subprocess.Popen:
    """stdout is the job's log (parsed); warnings from workers go to a file, so they never split a line."""
    e = dict(env(), OMP_NUM_THREADS="1")
    folder = Path(cmd[cmd.index("--out") + 1]).parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stderr.log", "a") as err:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=e, start_new_session=True)


def _run_and_kill(cmd: list[str], kill_when) -> list[str]:
    p = _start(cmd)
    lines: list[str] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if kill_when(lines):
                os.killpg(p.pid, signal.SIGKILL)  # the job and its DataLoader workers at once, like a lost machine
                break
        lines += (p.communicate(timeout=240)[0] or "").splitlines()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == -signal.SIGKILL, lines[-10:]
    return lines


def _ids_by_step(lines: list[str]) -> dict[int, list[int]]:
    return {int(ln.split()[1]): json.loads(ln.split(" ", 2)[2]) for ln in lines if ln.startswith("ids ")}


def test_stateful_loader_stream_and_augmentations_resume_bit_identical_after_sigkill(tmp_path):
    data = tmp_path / "data"
    ref, three, run = tmp_path / "ref", tmp_path / "three", tmp_path / "run"
    # the uninterrupted runs: augmentations drawn in the main process (0 workers) and in 3 workers, side by side
    procs = [_start(_cmd(ref, 0, data)), _start(_cmd(three, 3, data))]
    ref_lines, _ = (_finish(p) for p in procs)
    assert_same_tensors(ref / "out.safetensors", three / "out.safetensors")  # num_workers 0 == 3

    # kill (2 workers everywhere) at step 10 of epoch 0's 12 (the job holds there); --sync-saves: checkpoint-step-9
    # is committed by then
    killed = _run_and_kill(_cmd(run, 2, data) + ["--sync-saves", "--hold-at", "10"], lambda ls: ls[-1] == "step 10")
    assert "checkpoint-step-9" in committed(killed)
    resumed = _finish(_start(_cmd(run, 2, data, reads="reads-resumed.log")))
    assert "INFO Resuming from global step 9" in resumed and "INFO Resuming mid-epoch from epoch 1" in resumed
    assert_same_tensors(ref / "out.safetensors", run / "out.safetensors")

    # the stream trained the same examples at every step, and its resume opened no shard it had consumed
    assert {**_ids_by_step(killed), **_ids_by_step(resumed)} == _ids_by_step(ref_lines)
    per_shard = defaultdict(set)
    for step, ids in _ids_by_step(killed).items():
        if step <= 9:
            for i in ids:
                per_shard[i // ROWS_PER_SHARD].add(i)
    consumed = {f"shard-{s}.jsonl" for s, ids in per_shard.items() if len(ids) == ROWS_PER_SHARD}
    assert consumed, "the checkpoint should follow at least one fully trained shard"
    opens = [ln.split()[1] for ln in (run / "reads-resumed.log").read_text().splitlines()]
    rest_of_epoch0 = opens[: len(opens) - 4]  # epoch 1 opens its 4 shards after epoch 0's workers are done
    print(f"\nstream resume: {len(rest_of_epoch0)} shard opens for the rest of epoch 0 (a full pass: 4)")
    assert len(rest_of_epoch0) < 4 and not consumed & set(rest_of_epoch0), (consumed, opens)
    assert sorted(opens[len(rest_of_epoch0) :]) == [f"shard-{s}.jsonl" for s in range(4)]
