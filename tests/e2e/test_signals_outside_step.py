"""A signal that arrives while the loop is away from ``step()`` (issue 16): in a validation longer than half the
grace period, or waiting on a DataLoader whose workers are blocked. The watchdog saves the live state as of the
last ``step()`` (the weights and optimizer change only in ``optimizer.step()``, right before it), mirrors it and
exits 143 within the grace period; a fresh session with an empty local folder resumes from that step.

Under SLURM (``SLURM_JOB_ID`` set) SIGUSR1 does the same and the job is requeued with ``scontrol requeue``. SLURM
cannot run here: a fake ``scontrol`` on PATH records its arguments, which is all syncckpt asks of it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procs import env  # noqa: E402
from test_process_group_signal import _lines, _start, _steps, _wait_for, _wait_gone, _workers  # noqa: E402

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("signal_group_job.py")
GRACE = 12.0


def _fake_scontrol(bin_dir: Path, record: Path) -> None:
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def _fresh_session_step(tmp_path: Path, remote: str) -> int:
    """A new machine: empty local folder, the same remote; the step ``resume()`` continues from."""
    out = subprocess.run(
        [sys.executable, str(JOB), "--ckpt-dir", str(tmp_path / "fresh"), "--remote", remote, "--workers", "0"]
        + ["--max-steps", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env(),
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("resumed step "))
    return int(line.split()[2])


@pytest.mark.parametrize(
    ("stall", "sig", "slurm"),
    [("validation", signal.SIGUSR1, True), ("loader", signal.SIGTERM, False)],
    ids=["sigusr1-in-validation-under-slurm", "sigterm-with-a-blocked-dataloader"],
)
def test_a_signal_outside_step_still_saves_mirrors_and_exits_in_the_grace_period(tmp_path, stall, sig, slurm):
    remote = (tmp_path / "bucket" / "run").as_uri()
    job_env = env()
    record = tmp_path / "scontrol-calls"
    if slurm:
        _fake_scontrol(tmp_path / "bin", record)
        job_env = {**job_env, "SLURM_JOB_ID": "4242", "PATH": f"{tmp_path / 'bin'}{os.pathsep}{job_env['PATH']}"}
    args = ["--ckpt-dir", str(tmp_path / "ck"), "--remote", remote, "--save-every", "4", "--stall-at", "7"]
    args += ["--stall", stall, "--grace-period", str(GRACE), "--workers", "2" if stall == "loader" else "0"]
    log = tmp_path / "job.log"
    proc = _start(args, log, job_env)
    try:
        lines = _wait_for(log, proc, lambda ls: "stalling" in ls and any("Mirrored checkpoint-step-4" in x for x in ls))
        if stall == "loader":  # both workers blocked: the loop waits in next(loader), short of a whole step
            lines = _wait_for(log, proc, lambda ls: ls.count("blocked") >= 2)
        at = max(_steps(lines))
        sent = time.monotonic()
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=GRACE + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    out = _lines(log)
    assert code == 143, "\n".join(out[-30:])
    assert took <= GRACE + 5, f"exited {took:.1f} s after the signal (grace period {GRACE} s)"
    name = signal.Signals(sig).name
    said = [ln for ln in out if f"{name}: training did not come back to step()" in ln]
    assert len(said) == 1 and f"saved checkpoint-step-{at} from the live state" in said[0], "\n".join(out[-30:])
    assert "mirrored; exiting" in said[0], said[0]
    assert (tmp_path / "bucket" / "run" / f"checkpoint-step-{at}" / "manifest.json").exists()
    if slurm:
        assert record.read_text().split() == ["requeue", "4242"]
        assert any("Requeued SLURM job 4242" in ln for ln in out)
    if stall == "loader":  # the blocked workers, shielded from SIGTERM, do not outlive the process that left them
        workers = _workers(out)
        assert len(workers) == 2, "\n".join(out[-30:])
        left, _ = _wait_gone(lambda: {p for p in workers if Path(f"/proc/{p}").exists()})
        assert not left, f"DataLoader workers {sorted(left)} still run after the job exited"
    assert _fresh_session_step(tmp_path, remote) >= at  # nothing trained before the signal is lost


def test_sigusr1_to_a_torchrun_job_in_validation_mirrors_and_every_rank_exits_in_the_grace_period(tmp_path):
    """SLURM delivers ``--signal=USR1@90`` to the job step's tasks; here each of torchrun's two ranks gets it while
    both are in a validation longer than half the grace period. (torchrun itself does not handle SIGUSR1: sent to
    the launcher, its default action would end it, which is SLURM's ``B:`` form with a trap to write.)"""
    from test_process_group_signal import _procs, _tree

    record = tmp_path / "scontrol-calls"
    _fake_scontrol(tmp_path / "bin", record)
    job_env = env(OMP_NUM_THREADS="1", SLURM_JOB_ID="77")
    job_env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{job_env['PATH']}"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    remote = (tmp_path / "bucket" / "run").as_uri()
    args = ["--ckpt-dir", str(tmp_path / "ck"), "--remote", remote, "--save-every", "4", "--stall-at", "7"]
    args += ["--stall", "validation", "--grace-period", str(GRACE), "--workers", "0"]
    log = tmp_path / "job.log"
    proc = _start(args, log, job_env, launcher)
    try:
        _wait_for(log, proc, lambda ls: "stalling" in ls and any("Mirrored checkpoint-step-4" in x for x in ls))
        ranks = _tree(proc.pid) - {proc.pid}
        assert len(ranks) == 2, ranks
        sent = time.monotonic()
        for pid in ranks:
            os.kill(pid, signal.SIGUSR1)
        while ranks & set(_procs()) and time.monotonic() - sent < GRACE + 10:
            time.sleep(0.05)  # polling /proc: the ranks are torchrun's children, not ours to wait on
        took = time.monotonic() - sent
        proc.wait(timeout=30)
    finally:
        for pid in _tree(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    out = _lines(log)
    assert not ranks & set(_procs()) and took <= GRACE, f"ranks left after {took:.1f} s:\n" + "\n".join(out[-30:])
    said = [ln for ln in out if "SIGUSR1: training did not come back to step()" in ln]
    assert len(said) >= 1 and all("mirrored" in ln or "saved" in ln for ln in said), "\n".join(out[-30:])
    assert (tmp_path / "bucket" / "run" / "checkpoint-step-4" / "manifest.json").exists()
    assert record.read_text().split() == ["requeue", "77"]  # once, by rank 0
