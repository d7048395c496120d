"""DDP under torchrun (2 processes, gloo, CPU): the same CheckpointManager code, exact resume after the whole job
is SIGKILLed, fresh-session resume from moto S3 with an empty local directory, and a rank dying mid-save never
commits a checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from syncckpt.local import list_checkpoints

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("ddp_job.py")


def _env() -> dict[str, str]:
    # PYTHONFAULTHANDLER: a rank that aborts in C++ (SIGABRT) prints every thread's Python stack into the output
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def _cmd(args: list[str], nproc: int, job: Path) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(job), *args]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # that thread or process is gone
                continue
            out += children
            todo += children
    return out


def kill_job(p: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank at once, like a lost node, and wait until all are gone. torchrun starts
    each rank in a session of its own: killing torchrun's process group alone leaves the ranks running."""
    fds = []
    for pid in _descendants(p.pid):
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    os.killpg(p.pid, signal.SIGKILL)
    for fd in fds:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        select.select([fd], [], [])  # readable once the process has exited
        os.close(fd)
    p.wait()


def after_a_commit(lines: list[str]) -> bool:
    """``kill_when`` for a kill mid-run once a checkpoint is committed: the first ``step N`` line after rank 0
    logged a commit. It comes by the third due save at the latest: a save waits for the previous one's staging
    buffers, and the one writer thread has committed the save before that by then."""
    return lines[-1].startswith("step ") and any("Checkpoint committed" in ln for ln in lines)


def run_job(args: list[str], kill_when=None, timeout: float = 300, job: Path = JOB, nproc: int = 2):
    """Run a torchrun job; with ``kill_when(lines)`` SIGKILL torchrun and every rank once it is true.
    Returns (output lines, exit status)."""
    p = subprocess.Popen(
        _cmd(args, nproc, job),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if kill_when is not None and kill_when(lines):
                kill_job(p)
                break
        lines.extend((p.communicate(timeout=timeout)[0] or "").splitlines())
    finally:
        if p.poll() is None:
            kill_job(p)
    return lines, p.returncode


def assert_same(a: Path, b: Path) -> None:
    for rank in (0, 1):
        ta, tb = load_file(str(a / f"rank{rank}.safetensors")), load_file(str(b / f"rank{rank}.safetensors"))
        assert ta.keys() == tb.keys()
        diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not diff, f"rank {rank} differs from the uninterrupted run: {diff[:8]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp-ref")
    lines, rc = run_job(["--ckpt-dir", str(d / "ck"), "--out-dir", str(d / "out")])
    assert rc == 0, "\n".join(lines[-300:])
    return d / "out"


def test_whole_job_sigkilled_then_resumed_is_bit_identical(tmp_path, reference):
    args = ["--ckpt-dir", str(tmp_path / "ck"), "--out-dir", str(tmp_path / "out")]
    lines, rc = run_job(args, kill_when=after_a_commit)
    assert rc == -signal.SIGKILL
    lines, rc = run_job(args)
    assert rc == 0, "\n".join(lines[-300:])
    assert any("Resuming from checkpoint:" in ln for ln in lines)
    manifest = json.loads((tmp_path / "ck" / "checkpoint-step-8" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and "rng-rank1.safetensors" in [f["path"] for f in manifest["files"]]
    assert_same(reference, tmp_path / "out")


def test_fresh_session_from_s3_with_empty_local_dirs(tmp_path, reference, s3_remote_url, s3_storage_options):
    args = [
        "--ckpt-dir",
        str(tmp_path / "ck"),
        "--out-dir",
        str(tmp_path / "out"),
        "--remote",
        s3_remote_url,
        "--storage-options",
        json.dumps(s3_storage_options),
    ]
    lines, rc = run_job(args, kill_when=lambda ls: "Mirrored checkpoint-step-" in ls[-1])
    assert rc == -signal.SIGKILL
    shutil.rmtree(tmp_path / "ck")
    lines, rc = run_job(args)
    assert rc == 0, "\n".join(lines[-300:])
    assert any("Pulled checkpoint-" in ln for ln in lines)
    assert_same(reference, tmp_path / "out")


@pytest.mark.parametrize("point", ["serialize", "snapshot"])
def test_a_rank_dying_mid_save_never_commits(tmp_path, point):
    ck = tmp_path / "ck"
    lines, rc = run_job(
        ["--ckpt-dir", str(ck), "--out-dir", str(tmp_path / "out"), "--die-rank", "1", "--die-at", point]
    )
    assert rc != 0
    assert not any("Checkpoint committed" in ln for ln in lines), "\n".join(lines[-20:])
    assert list_checkpoints(ck) == []
