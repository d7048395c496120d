"""keep_local on a small disk (issue 18): a mirrored run on a 64 MB tmpfs writes 30 checkpoints of about 12 MB
each with keep_last 5, which would need 75 MB kept locally; with keep_local "none" the disk never fills,
and a fresh session resumes from the remote bit-identical.

The tmpfs is real: the job runs in its own mount namespace (``unshare``) with a 64 MB tmpfs as its checkpoint
folder, so nothing is mounted on the machine itself and the disk goes away with the job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procs import assert_same_tensors, env  # noqa: E402

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("disk_bound_job.py")
TMPFS_BYTES = 64 << 20


def run_job(args: list[str], tmpfs: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(JOB), *args]
    if tmpfs is not None:
        tmpfs.mkdir(parents=True)
        unshare = ["unshare", "--mount", "--propagation", "private"] + ([] if os.geteuid() == 0 else ["-r"])
        mount = f'mount -t tmpfs -o size={TMPFS_BYTES} tmpfs {tmpfs} && exec "$@"'
        cmd = [*unshare, "sh", "-c", mount, "sh", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())


def test_keep_local_none_trains_30_mirrored_checkpoints_on_a_64mb_tmpfs_and_resumes_bit_identical(tmp_path):
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to give the job its own 64 MB tmpfs")
    remote = (tmp_path / "bucket" / "run").as_uri()
    ref = run_job(
        ["--ckpt-dir", str(tmp_path / "ref-ck"), "--save-every", "0", "--out", str(tmp_path / "ref.safetensors")]
    )
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    small = tmp_path / "small-disk"
    first = run_job(
        ["--ckpt-dir", str(small), "--remote", remote, "--keep-local", "none", "--stop-after", "30"]
        + ["--out", str(tmp_path / "first.safetensors")],
        tmpfs=small,
    )
    out = first.stdout
    assert first.returncode == 0, out[-3000:] + first.stderr[-3000:]
    assert out.count("Checkpoint committed: checkpoint-step-") == 30, out[-3000:]
    assert "NOT saved" not in out and "No space left" not in out, out[-3000:]
    size = (tmp_path / "bucket" / "run" / "checkpoint-step-30" / "model.safetensors").stat().st_size
    size += (tmp_path / "bucket" / "run" / "checkpoint-step-30" / "optimizer.safetensors").stat().st_size
    assert size > 12_000_000  # ~12 MB each: keep_last 5 (+1 being written) kept locally would not fit in 64 MB
    assert 6 * size > TMPFS_BYTES
    peak = int(out.rsplit("PEAK ", 1)[1].split()[0])
    assert peak < TMPFS_BYTES, peak
    # the remote keeps keep_last 5 of what it received (a step whose upload a newer one superseded never went)
    kept = [p.name for p in (tmp_path / "bucket" / "run").iterdir() if p.name.startswith("checkpoint-")]
    assert "checkpoint-step-30" in kept and len(kept) <= 5, kept

    fresh = tmp_path / "fresh-session"  # the small disk is gone with its namespace; a new session starts empty
    second = run_job(
        ["--ckpt-dir", str(fresh), "--remote", remote, "--keep-local", "none"]
        + ["--out", str(tmp_path / "resumed.safetensors")]
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Pulled checkpoint-step-30 from" in second.stdout, second.stdout[-3000:]
    assert_same_tensors(tmp_path / "ref.safetensors", tmp_path / "resumed.safetensors")
