"""SIGKILL mid-epoch, resume in a new process: three data pipelines end bit-identical to an uninterrupted run.

One job (``tests/distributed/data_job.py``) trains three tiny models side by side, one per pipeline: torchdata's
StatefulDataLoader with 2 workers registered as it is; a Hugging Face IterableDataset streamed from local JSONL
shards through ShuffleBuffer in a 2-worker StatefulDataLoader; random crops and noise drawn inside DataLoader
workers from per-sample generators (PerSampleRandom). One killed-and-resumed run checks all three at once, against
the same training run uninterrupted in the test's process while the job runs, and a third run, uninterrupted,
with the augmentations drawn in 3 workers (num_workers 0 and 3 give the same parameters).
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
sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import torch  # noqa: E402
from procs import assert_same_tensors, committed, env  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

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


def _kill_when(p: subprocess.Popen, kill_when) -> list[str]:
    """Read the started job's lines; SIGKILL it (and its workers) as soon as ``kill_when(lines)`` holds."""
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


def _reference(d: Path, data: Path) -> list[str]:
    """The uninterrupted run, in this process (augmentations drawn in the main process: 0 workers), one torch
    thread as the jobs (OMP_NUM_THREADS=1): its lines; its tensors go to ``d/out.safetensors``."""
    import warnings

    from data_job import train

    d.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            tensors, _ = train(
                str(d / "ck"), str(data), str(d / "reads.log"), aug_workers=0, handle_sigterm=False, say=lines.append
            )
    finally:
        torch.set_num_threads(n)
    save_file(tensors, str(d / "out.safetensors"))
    return lines


def _ids_by_step(lines: list[str]) -> dict[int, list[int]]:
    return {int(ln.split()[1]): json.loads(ln.split(" ", 2)[2]) for ln in lines if ln.startswith("ids ")}


def test_stateful_loader_stream_and_augmentations_resume_bit_identical_after_sigkill(tmp_path):
    data = tmp_path / "data"
    ref, three, run = tmp_path / "ref", tmp_path / "three", tmp_path / "run"
    # The job is started (2 workers everywhere) and SIGKILLed at step 10 of epoch 0's 12 (it holds there;
    # --sync-saves: checkpoint-step-9 is committed by then); meanwhile the uninterrupted run trains here, with
    # the augmentations drawn in the main process (0 workers) and its own copy of the shards. Resumed in a new
    # process with 2 workers, the job must end bit-identical to it.
    # Beside them, the same job uninterrupted with the augmentations drawn in 3 workers must end bit-identical to
    # the 0-worker run too (num_workers 0 == 3): ~1 s more wall time, ~5 s of CPU, on one pytest worker.
    killed_job = _start(_cmd(run, 2, data) + ["--sync-saves", "--hold-at", "10"])
    uninterrupted_three = _start(_cmd(three, 3, tmp_path / "data-three"))
    try:
        ref_lines = _reference(ref, tmp_path / "data-ref")
    finally:
        killed = _kill_when(killed_job, lambda ls: ls[-1] == "step 10")
    assert "checkpoint-step-9" in committed(killed)
    resumed = _finish(_start(_cmd(run, 2, data, reads="reads-resumed.log")))
    assert "INFO Resuming from global step 9" in resumed and "INFO Resuming mid-epoch from epoch 1" in resumed
    assert_same_tensors(ref / "out.safetensors", run / "out.safetensors")
    _finish(uninterrupted_three)
    assert_same_tensors(ref / "out.safetensors", three / "out.safetensors")  # num_workers 0 == 3

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
