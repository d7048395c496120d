"""Kill a training process with SIGKILL mid-epoch, resume in a new process, and get bit-identical tensors."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procs import assert_same_tensors, committed, run_and_kill, run_to_end  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (same code, never killed)."""
    d = tmp_path_factory.mktemp("ref")
    out = d / "ref.safetensors"
    run_to_end(["--ckpt-dir", str(d / "ck"), "--out", str(out)])
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, reference, num_workers):
    rnd = random.Random(1000 + num_workers)
    ck, out = tmp_path / "ck", tmp_path / "out.safetensors"
    args = ["--ckpt-dir", str(ck), "--out", str(out), "--num-workers", str(num_workers)]
    # Kill at a random optimizer step that is not an epoch boundary (6 steps an epoch), after a checkpoint exists.
    kill_at = rnd.choice([s for s in range(3, 17) if s % 6])
    lines, rc = run_and_kill(args, lambda ls: ls[-1] == f"step {kill_at}")
    assert rc == -9, lines[-5:]
    assert committed(lines), "the killed run committed no checkpoint"
    resumed = run_to_end(args + ["--poison-pickle"])
    assert "Resuming from checkpoint:" in resumed
    assert "Resuming mid-epoch from epoch" in resumed or "Resuming at the start of epoch" in resumed
    assert_same_tensors(reference, out)


def test_kill_during_several_phases_each_resume_bit_identical(tmp_path, reference):
    """Several kills in a row, at different points (right after a step line, i.e. possibly mid-save)."""
    ck, out = tmp_path / "ck", tmp_path / "out.safetensors"
    args = ["--ckpt-dir", str(ck), "--out", str(out)]
    for kill_at in (4, 9, 15):
        lines, rc = run_and_kill(args, lambda ls, k=kill_at: ls[-1] == f"step {k}")
        assert rc == -9 or any(ln.startswith("done") for ln in lines)
    run_to_end(args)
    assert_same_tensors(reference, out)
