"""The session deadline (issue 18): a checkpoint is taken and mirrored before a Kaggle or Colab session's hard
limit, and the run stops there, so no trained step is lost to the deadline.

A 12 h session runs in a second: a fake clock advances 30 s per optimizer step. Saves, uploads and waits run in
real time, which the fake clock does not see (it stands still while they run); the margin covers them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from syncckpt import CheckpointManager, local
from syncckpt.deadline import Deadline, resolve_deadline, session_start
from syncckpt.errors import ConfigError


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _fake_proc(root: Path, boot: int, ticks: int) -> Path:
    (root / "1").mkdir(parents=True)
    (root / "stat").write_text(f"cpu  10 0 5 100\nbtime {boot}\nprocesses 42\n")
    (root / "1" / "stat").write_text(f"1 (tini) S 0 1 1 0 -1 4194560 {'0 ' * 12}{ticks} 0 0 0\n")
    return root


def test_the_deadline_checkpoint_is_mirrored_and_the_run_stops_with_no_step_lost(tmp_path, caplog):
    start = 1_700_000_000.0
    clock = FakeClock(start)
    deadline = Deadline(at=start + 3600, why="a 1 h test limit", margin=60, clock=clock)
    remote = tmp_path / "bucket" / "run"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    caplog.set_level(logging.INFO, logger="syncckpt")
    trained = 0
    mgr = CheckpointManager(
        tmp_path / "ck", save_every_n_steps=100, remote=str(remote), deadline=deadline, grace_period=30
    )
    mgr.register(model=model, optimizer=opt)
    with pytest.raises(SystemExit) as stopped:
        for step in range(1, 1000):
            assert clock() < deadline.at, f"step {step} ran into the deadline"
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            trained = step
            clock.t += 30  # this optimizer step took 30 s of session time
            mgr.step(step, batch_idx=step - 1)
            if step == 100:
                assert mgr.wait(30)  # the step-100 save is durable: its duration is known from here on
    assert stopped.value.code == 143
    # 3600 s at 30 s a step; the checkpoint is due with <= 60 s (margin) + the save's duration left: step 118
    assert trained == 118 and deadline.at - clock() == 60
    said = [r.getMessage() for r in caplog.records if "Session deadline" in r.getMessage()]
    assert len(said) == 3 and "(a 1 h test limit); a checkpoint is taken and mirrored before it" in said[0], said
    assert "in 60 s: saving checkpoint-step-118 now, mirroring it, then stopping" in said[1], said
    assert said[2] == "Session deadline: checkpoint saved and mirrored; exiting", said
    assert mgr.status()["mirrored"][-1] == "checkpoint-step-118"
    manifest, _ = local.verify(remote / "checkpoint-step-118")
    assert manifest.global_step == trained  # every step trained is in the mirrored checkpoint
    mgr.close()


def test_session_start_per_platform_from_a_fake_proc_and_environment(tmp_path):
    proc = _fake_proc(tmp_path / "proc", boot=1_700_000_000, ticks=50_000)
    import os

    container_start = 1_700_000_000 + 50_000 / os.sysconf("SC_CLK_TCK")
    assert session_start("kaggle", environ={}, proc=proc) == container_start
    assert session_start("colab", environ={}, proc=proc) == container_start
    assert session_start(None, environ={}, proc=proc) is None  # elsewhere: unknown
    assert session_start("kaggle", environ={"SYNCCKPT_SESSION_START": "1700000123.5"}, proc=proc) == 1700000123.5
    assert session_start("kaggle", environ={}, proc=tmp_path / "no-proc") is None
    with pytest.raises(ConfigError, match="SYNCCKPT_SESSION_START"):
        session_start("kaggle", environ={"SYNCCKPT_SESSION_START": "yesterday"}, proc=proc)


def test_platform_defaults_durations_and_off():
    start = 1_700_000_000.0
    kaggle = resolve_deadline("auto", "kaggle", start, now=lambda: start + 60)
    assert kaggle is not None and kaggle.at == start + 12 * 3600 and "Kaggle's 12 h session limit" in kaggle.why
    assert resolve_deadline("auto", "colab", start, now=lambda: start).at == start + 12 * 3600
    assert resolve_deadline("auto", "kaggle", start, now=lambda: start + 13 * 3600) is None  # a wrong start guess
    assert resolve_deadline("auto", None, start) is None  # not a notebook platform: no deadline
    assert resolve_deadline("auto", "kaggle", None) is None  # start unknown: no guess
    assert resolve_deadline("off", "kaggle", start) is None and resolve_deadline(None, "kaggle", start) is None
    assert resolve_deadline("9h", "kaggle", start).at == start + 9 * 3600  # a TPU session
    with pytest.raises(ConfigError, match="expected a duration"):
        resolve_deadline("11 hours", "kaggle", start)


def test_a_kaggle_manager_announces_its_deadline_from_the_session_start(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("SYNCCKPT_SESSION_START", str(time.time() - 3600))  # the session started an hour ago
    caplog.set_level(logging.INFO, logger="syncckpt")
    with CheckpointManager(tmp_path / "ck", handle_sigterm=False):
        pass
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Session deadline: "))
    assert "Kaggle's 12 h session limit" in line and "deadline='off'" in line
