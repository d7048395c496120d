"""The session deadline (issue 18): a checkpoint is taken and mirrored before a Kaggle or Colab session's hard
limit, and the run stops there, so no trained step is lost to the deadline.

A 12 h session runs in a second: a fake clock advances 30 s per optimizer step. Saves, uploads and waits run in
real time, which the fake clock does not see (it stands still while they run); the margin covers them.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from syncckpt import CheckpointManager, env, local
from syncckpt.deadline import Deadline, resolve_deadline, session_limit, session_start
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
    kaggle = resolve_deadline("auto", "kaggle", start, now=lambda: start + 60, tpu=False)
    assert kaggle is not None and kaggle.at == start + 12 * 3600 and "Kaggle's 12 h session limit" in kaggle.why
    assert resolve_deadline("auto", "colab", start, now=lambda: start).at == start + 12 * 3600
    assert resolve_deadline("auto", "kaggle", start, now=lambda: start + 13 * 3600, tpu=False) is None  # wrong start
    assert resolve_deadline("auto", None, start) is None  # not a notebook platform: no deadline
    assert resolve_deadline("auto", "kaggle", None) is None  # start unknown: no guess
    assert resolve_deadline("off", "kaggle", start) is None and resolve_deadline(None, "kaggle", start) is None
    assert resolve_deadline("9h", "kaggle", start).at == start + 9 * 3600  # a TPU session the heuristic missed
    with pytest.raises(ConfigError, match="expected a duration"):
        resolve_deadline("11 hours", "kaggle", start)


def _no_tpu(monkeypatch) -> None:
    for name in env.TPU_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(env, "detect_tpu", lambda: env.tpu_from(os.environ, accel_device_exists=False))


def test_a_kaggle_manager_announces_its_deadline_from_the_session_start(tmp_path, monkeypatch, caplog):
    _no_tpu(monkeypatch)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("SYNCCKPT_SESSION_START", str(time.time() - 3600))  # the session started an hour ago
    caplog.set_level(logging.INFO, logger="syncckpt")
    with CheckpointManager(tmp_path / "ck", handle_sigterm=False):
        pass
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Session deadline: "))
    assert "Kaggle's 12 h session limit" in line and "deadline='off'" in line


# ---- Kaggle TPU sessions: 9 h, recognised heuristically -----------------------------------------------------


def test_a_tpu_session_is_recognised_from_a_fake_environment_or_device_node(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    assert not env.detect_tpu({}, dev=dev)  # a CPU/GPU session: none of the signs
    for name in ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "XRT_TPU_CONFIG", "COLAB_TPU_ADDR"):
        assert env.detect_tpu({name: "v3-8" if name == "TPU_ACCELERATOR_TYPE" else "local"}, dev=dev), name
    assert not env.detect_tpu({"TPU_NAME": ""}, dev=dev)  # set but empty is not a TPU
    (dev / "accel0").touch()  # a TPU chip's device node, no variables at all
    assert env.detect_tpu({}, dev=dev)


def test_auto_on_a_kaggle_tpu_is_9_hours_and_12_elsewhere(monkeypatch):
    start = 1_700_000_000.0
    tpu = resolve_deadline("auto", "kaggle", start, now=lambda: start + 60, tpu=True)
    assert tpu.at == start + 9 * 3600 and tpu.why == "Kaggle's 9 h TPU session limit"
    assert resolve_deadline("auto", "colab", start, now=lambda: start, tpu=True).at == start + 12 * 3600
    assert session_limit("colab", tpu=True) == (12 * 3600.0, "Colab's 12 h session limit")
    # tpu not given: the probe decides (here a fake environment, the way a Kaggle TPU session looks)
    monkeypatch.setattr(env, "detect_tpu", lambda: env.tpu_from({"TPU_ACCELERATOR_TYPE": "v3-8"}, False))
    assert resolve_deadline("auto", "kaggle", start, now=lambda: start).at == start + 9 * 3600
    monkeypatch.setattr(env, "detect_tpu", lambda: env.tpu_from({}, False))
    assert resolve_deadline("auto", "kaggle", start, now=lambda: start).at == start + 12 * 3600
    # 10 h into a TPU session, the 9 h limit has passed: the start guess is wrong, so no deadline, as for 12 h
    assert resolve_deadline("auto", "kaggle", start, now=lambda: start + 10 * 3600, tpu=True) is None


def test_a_kaggle_tpu_manager_announces_the_9_hour_limit(tmp_path, monkeypatch, caplog):
    _no_tpu(monkeypatch)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v3-8")  # what the TPU runtime sets
    monkeypatch.setenv("SYNCCKPT_SESSION_START", str(time.time() - 3600))
    caplog.set_level(logging.INFO, logger="syncckpt")
    with CheckpointManager(tmp_path / "ck", handle_sigterm=False):
        pass
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Session deadline: "))
    assert "Kaggle's 9 h TPU session limit" in line, line


# ---- a wall-clock deadline -----------------------------------------------------------------------------------


def test_a_wall_clock_datetime_is_the_deadline_instant_naive_ones_in_local_time():
    now = 1_700_000_000.0
    aware = datetime(2023, 11, 15, 0, 0, tzinfo=timezone.utc)  # 1700006400
    d = resolve_deadline(aware, "kaggle", start=now - 3600, now=lambda: now)
    assert d.at == 1_700_006_400.0 and d.why == "the deadline given"  # the session start plays no part
    naive = datetime.fromtimestamp(now + 7200)  # local time, as a user writes it
    assert resolve_deadline(naive, None, start=None, now=lambda: now).at == pytest.approx(now + 7200)
    with pytest.raises(ConfigError, match="that time has passed"):
        resolve_deadline(datetime.fromtimestamp(now - 60), None, start=None, now=lambda: now)


def test_a_datetime_deadline_minutes_away_takes_mirrors_and_stops_at_the_first_step(tmp_path, caplog):
    # Five minutes left is under the first save's assumed 300 s plus the 120 s margin: the checkpoint is due now.
    at = datetime.now() + timedelta(minutes=5)
    remote = tmp_path / "bucket" / "run"
    caplog.set_level(logging.INFO, logger="syncckpt")
    model = torch.nn.Linear(4, 2)
    mgr = CheckpointManager(tmp_path / "ck", save_every_n_steps=100, remote=str(remote), deadline=at, grace_period=30)
    mgr.register(model=model)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Session deadline: ")]
    assert said and f"{at:%Y-%m-%d %H:%M}" in said[0] and "(the deadline given)" in said[0], said
    with pytest.raises(SystemExit) as stopped:
        mgr.step(1, batch_idx=0)
    assert stopped.value.code == 143
    assert mgr.status()["mirrored"] == ["checkpoint-step-1"]
    assert local.verify(remote / "checkpoint-step-1")[0].global_step == 1
    mgr.close()
