"""CheckpointManager: triggers, best/epoch/retention, resume selection and fallback, exact state, failure modes."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import random
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import syncckpt.manager as manager_mod
from syncckpt import (
    CheckpointManager,
    CheckpointNotFound,
    ResumableSampler,
    StateMismatch,
    StateNotSerializable,
    SyncCkptError,
)
from syncckpt import local as local_mod


def make_model(seed: int = 0, out: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out)).to(dtype)


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def new_mgr(directory: Path, **kw: Any) -> CheckpointManager:
    kw.setdefault("handle_sigterm", False)
    return CheckpointManager(directory, **kw)


def folders(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir())


def read_manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "manifest.json").read_bytes())


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def warnings_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


class Custom:
    """A user object with its own state_dict."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


# ---- triggers -----------------------------------------------------------------------------------------------------


def test_step_saves_every_n_steps_and_returns_whether_it_saved(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    with new_mgr(tmp_path, save_every_n_steps=3, keep_last=2) as mgr:
        mgr.register(model=model, optimizer=opt)
        started = []
        for g in range(1, 8):
            train_step(model, opt)
            started.append(mgr.step(g, epoch=0, batch_idx=g - 1))
        assert started == [False, False, True, False, False, True, False]
        assert mgr.step(6, epoch=0, batch_idx=5) is False  # the same step is never saved twice
        assert mgr.wait(30) is True
    assert folders(tmp_path) == ["checkpoint-step-3", "checkpoint-step-6"]


def test_save_every_n_minutes_uses_the_monotonic_clock(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(manager_mod, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=lambda: 0.0))
    with new_mgr(tmp_path, save_every_n_steps=None, save_every_n_minutes=5) as mgr:
        mgr.register(model=make_model())
        results = []
        for g, t in [(1, 1000), (2, 1299), (3, 1300), (4, 1301), (5, 1599), (6, 1600), (7, 1601)]:
            clock[0] = float(t)
            results.append(mgr.step(g))
        assert results == [False, False, True, False, False, True, False]
        assert mgr.wait(30)
    assert folders(tmp_path) == ["checkpoint-step-6"]


def test_steps_and_minutes_combine(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(manager_mod, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=lambda: 0.0))
    with new_mgr(tmp_path, save_every_n_steps=10, save_every_n_minutes=1, keep_last=5) as mgr:
        mgr.register(model=make_model())
        assert mgr.step(10) is True
        clock[0] = 61.0
        assert mgr.step(11) is True
        assert mgr.step(12) is False  # the minutes timer restarted at the last save
        assert mgr.step(20) is True
        mgr.wait(30)
    assert folders(tmp_path) == ["checkpoint-step-10", "checkpoint-step-11", "checkpoint-step-20"]


def test_save_writes_a_step_checkpoint_now(tmp_path):
    with new_mgr(tmp_path, save_every_n_steps=None) as mgr:
        mgr.register(model=make_model())
        assert mgr.step(5) is False
        mgr.save(7, epoch=1, batch_idx=2, metrics={"loss": torch.tensor(0.25)})
        assert mgr.wait(30)
        assert mgr.status()["last_committed"] == "checkpoint-step-7"
    m = read_manifest(tmp_path / "checkpoint-step-7")
    assert (m["global_step"], m["epoch"], m["batch_idx"], m["metrics"]) == (7, 1, 2, {"loss": 0.25})


# ---- epochs, best, retention ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,metric,values,best_epochs",
    [
        ("max", "acc", [0.5, 0.4, 0.7, 0.7], [0, 0, 2, 2]),
        ("min", "loss", [0.5, 0.6, 0.3, 0.3], [0, 0, 2, 2]),
    ],
)
def test_save_epoch_writes_epoch_checkpoints_and_best_only_on_improvement(tmp_path, mode, metric, values, best_epochs):
    with new_mgr(tmp_path, metric_for_best=metric, mode=mode, keep_epochs=10) as mgr:
        mgr.register(model=make_model())
        for epoch, (value, best_epoch) in enumerate(zip(values, best_epochs, strict=True)):
            assert mgr.save_epoch(epoch, global_step=10 * (epoch + 1), metrics={metric: value}) is True
            assert mgr.wait(30)
            best = read_manifest(tmp_path / "best_model")
            assert (best["kind"], best["epoch"], best["metrics"][metric]) == ("best", best_epoch, values[best_epoch])
            ep = read_manifest(tmp_path / f"checkpoint-epoch-{epoch}")
            assert (ep["kind"], ep["global_step"], ep["metrics"][metric]) == ("epoch", 10 * (epoch + 1), value)
        local_mod.verify(tmp_path / "best_model")
    assert folders(tmp_path) == ["best_model"] + [f"checkpoint-epoch-{e}" for e in range(4)]


def test_save_epoch_returns_false_when_nothing_is_due(tmp_path, caplog):
    with new_mgr(tmp_path, metric_for_best="acc", save_every_n_epochs=2) as mgr:
        mgr.register(model=make_model())
        assert mgr.save_epoch(0, global_step=5, metrics={"acc": 0.5}) is True  # best only
        assert mgr.save_epoch(1, global_step=10, metrics={"acc": 0.1}) is True  # epoch only
        assert mgr.save_epoch(2, global_step=15, metrics={"acc": 0.2}) is False
        assert mgr.save_epoch(3, global_step=20, metrics={"acc": float("nan")}) is True  # NaN never improves
        assert mgr.save_epoch(4, global_step=25, metrics={"other": 1.0}) is False
        mgr.wait(30)
    assert folders(tmp_path) == ["best_model", "checkpoint-epoch-1", "checkpoint-epoch-3"]
    assert read_manifest(tmp_path / "best_model")["epoch"] == 0
    assert "metric_for_best 'acc' is not in the metrics" in warnings_text(caplog)


def test_best_survives_a_resume(tmp_path):
    with new_mgr(tmp_path, metric_for_best="acc") as mgr:
        mgr.register(model=make_model())
        mgr.save_epoch(0, global_step=10, metrics={"acc": 0.8})
    with new_mgr(tmp_path, metric_for_best="acc") as mgr:
        mgr.register(model=make_model(1))
        assert mgr.resume().name == "checkpoint-epoch-0"
        assert mgr.save_epoch(1, global_step=20, metrics={"acc": 0.6}) is True
        mgr.wait(30)
        best = read_manifest(tmp_path / "best_model")
        assert (best["epoch"], best["metrics"]["acc"]) == (0, 0.8)
        mgr.save_epoch(2, global_step=30, metrics={"acc": 0.9})
        mgr.wait(30)
    best = read_manifest(tmp_path / "best_model")
    assert (best["epoch"], best["metrics"]["acc"]) == (2, 0.9)


def test_retention_on_disk_keep_last_1_keep_epochs_2(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with new_mgr(tmp_path, save_every_n_steps=2, keep_last=1, keep_epochs=2, metric_for_best="acc") as mgr:
        mgr.register(model=model, optimizer=opt)
        for g in range(1, 16):
            epoch, batch_idx = divmod(g - 1, 5)
            train_step(model, opt)
            mgr.step(g, epoch=epoch, batch_idx=batch_idx)
            if batch_idx == 4:
                mgr.save_epoch(epoch, global_step=g, metrics={"acc": [0.5, 0.9, 0.7][epoch]})
        assert mgr.wait(30)
        assert sorted(mgr.list_local()) == mgr.status()["local"]
    assert folders(tmp_path) == ["best_model", "checkpoint-epoch-1", "checkpoint-epoch-2", "checkpoint-step-14"]
    assert read_manifest(tmp_path / "best_model")["epoch"] == 1


# ---- resume --------------------------------------------------------------------------------------------------------


def test_resume_prefers_epoch_then_best_then_step_on_equal_steps(tmp_path):
    """At an epoch's end the step checkpoint precedes validation; the epoch one saves validating again."""
    with new_mgr(tmp_path, metric_for_best="acc") as mgr:
        mgr.register(model=make_model())
        mgr.save(10, epoch=0, batch_idx=9)
        mgr.save_epoch(0, global_step=10, metrics={"acc": 1.0})
    assert folders(tmp_path) == ["best_model", "checkpoint-epoch-0", "checkpoint-step-10"]
    for expected in ("checkpoint-epoch-0", "best_model", "checkpoint-step-10"):
        with new_mgr(tmp_path) as mgr:
            mgr.register(model=make_model(1))
            info = mgr.resume()
        assert info.name == expected
        local_mod.delete(tmp_path, expected)


def test_resume_prefers_the_newest_global_step(tmp_path):
    with new_mgr(tmp_path, metric_for_best="acc", keep_last=3) as mgr:
        mgr.register(model=make_model())
        mgr.save_epoch(0, global_step=8, metrics={"acc": 1.0})
        mgr.save(9, epoch=1, batch_idx=0)
        mgr.save_epoch(1, global_step=12, metrics={"acc": 0.0})
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model(1))
        assert mgr.resume().name == "checkpoint-epoch-1"


def test_resume_info_for_a_step_checkpoint(tmp_path):
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model())
        mgr.save(7, epoch=2, batch_idx=3, metrics={"loss": 1.5})
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model(1))
        info = mgr.resume()
    assert (info.global_step, info.epoch, info.batch_idx, info.name, info.kind, info.source) == (
        7,
        2,
        3,
        "checkpoint-step-7",
        "step",
        "local",
    )
    assert Path(info.path) == tmp_path / "checkpoint-step-7"
    assert info.metrics == {"loss": 1.5}


def test_resume_info_for_an_epoch_checkpoint(tmp_path):
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model())
        mgr.save_epoch(2, global_step=9)
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model(1))
        info = mgr.resume()
    assert (info.global_step, info.epoch, info.batch_idx, info.name, info.kind) == (
        9,
        3,
        -1,
        "checkpoint-epoch-2",
        "epoch",
    )


def test_resume_logs_the_seed_lines(tmp_path, caplog):
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model())
        mgr.save(7, epoch=2, batch_idx=3)
    caplog.set_level(logging.INFO, logger="syncckpt")
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model(1))
        mgr.resume()
    lines = [r.getMessage() for r in caplog.records if r.name == "syncckpt"]
    assert f"Resuming from checkpoint: {tmp_path / 'checkpoint-step-7'}" in lines
    assert "Resuming from global step 7" in lines
    assert "Checkpoint epoch: 2, batch: 3" in lines
    assert "Resuming mid-epoch from epoch 3" in lines


def test_resume_with_nothing_to_resume(tmp_path):
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model())
        assert mgr.resume() is None
        with pytest.raises(CheckpointNotFound, match=str(tmp_path)):
            mgr.resume(tmp_path)
        with pytest.raises(CheckpointNotFound):
            mgr.resume(tmp_path / "missing")
        with pytest.raises(FileNotFoundError):  # CheckpointNotFound is also a FileNotFoundError
            mgr.resume(str(tmp_path))


def test_resume_from_an_explicit_checkpoint_folder(tmp_path):
    model = make_model()
    with new_mgr(tmp_path / "run", keep_last=2, save_every_n_steps=1) as mgr:
        mgr.register(model=model)
        mgr.step(1)
        expected = state_copy(model)
        with torch.no_grad():
            model[0].weight.add_(1)
        mgr.wait(30)
        mgr.step(2)
    fresh = make_model(5)
    with new_mgr(tmp_path / "other") as mgr:
        mgr.register(model=fresh)
        assert mgr.resume(tmp_path / "run" / "checkpoint-step-1").global_step == 1
    assert_state_equal(fresh, expected)


def test_resume_from_an_older_checkpoint_is_refused_while_newer_ones_would_win(tmp_path):
    """Retention keeps the highest global steps and auto-resume picks the newest: training on from an older
    checkpoint next to newer ones would have every new checkpoint deleted as it lands. resume(path) refuses
    before restoring anything, naming the newer checkpoints, locally and on the remote."""
    remote = (tmp_path / "remote").as_uri()
    model = make_model()
    with new_mgr(tmp_path / "run", keep_last=2, save_every_n_steps=1, remote=remote) as mgr:
        mgr.register(model=model)
        mgr.step(1)
        mgr.wait(30)
        mgr.step(2)
    older = tmp_path / "run" / "checkpoint-step-1"
    fresh = make_model(5)
    untouched = state_copy(fresh)
    with new_mgr(tmp_path / "run", keep_last=2) as mgr:
        mgr.register(model=fresh)
        with pytest.raises(SyncCkptError, match=r"newer checkpoints .*/run: checkpoint-step-2"):
            mgr.resume(older)
    assert_state_equal(fresh, untouched)
    # A new local folder for the branch, but the remote still holds the earlier run's step 2.
    with new_mgr(tmp_path / "branch", remote=remote) as mgr:
        mgr.register(model=fresh)
        with pytest.raises(SyncCkptError, match=r"remote: checkpoint-step-2"):
            mgr.resume(older)
    # Without a remote, the branch's own folder holds nothing newer: it resumes and keeps its new checkpoints.
    with new_mgr(tmp_path / "branch2", keep_last=1, save_every_n_steps=1) as mgr:
        mgr.register(model=fresh)
        assert mgr.resume(older).global_step == 1
        mgr.step(2)
        mgr.wait(30)
        assert folders(tmp_path / "branch2") == ["checkpoint-step-2"]
    # The newest checkpoint itself may always be named explicitly.
    with new_mgr(tmp_path / "run") as mgr:
        mgr.register(model=fresh)
        assert mgr.resume(tmp_path / "run" / "checkpoint-step-2").global_step == 2


def test_resume_requires_registered_objects(tmp_path):
    with new_mgr(tmp_path) as mgr, pytest.raises(SyncCkptError, match="register"):
        mgr.resume()


def _two_step_checkpoints(directory: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Run steps 1..4 saving at 2 and 4 (keep_last=2); returns the model state at each save."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    states = {}
    with new_mgr(directory, save_every_n_steps=2, keep_last=2) as mgr:
        mgr.register(model=model, optimizer=opt)
        for g in range(1, 5):
            train_step(model, opt)
            if mgr.step(g, epoch=0, batch_idx=g - 1):
                states[g] = state_copy(model)
    assert folders(directory) == ["checkpoint-step-2", "checkpoint-step-4"]
    return states


def _edit_manifest_digest(ckpt: Path) -> None:
    raw = read_manifest(ckpt)
    entry = next(f for f in raw["files"] if f["path"] == "model.safetensors")
    entry["sha256"] = ("0" if entry["sha256"][0] != "0" else "1") + entry["sha256"][1:]
    (ckpt / "manifest.json").write_text(json.dumps(raw))


CORRUPTIONS = {
    "flipped-byte": (lambda c: flip_byte(c / "model.safetensors"), "model.safetensors"),
    "truncated": (
        lambda c: (c / "optimizer.safetensors").write_bytes((c / "optimizer.safetensors").read_bytes()[:-9]),
        "optimizer.safetensors",
    ),
    "missing-file": (lambda c: (c / "state.json").unlink(), "state.json"),
    "edited-manifest": (_edit_manifest_digest, "model.safetensors"),
    "garbled-manifest": (lambda c: (c / "manifest.json").write_bytes(b'{"format": "syncckpt", '), "manifest.json"),
    "manifest-step": (
        lambda c: (c / "manifest.json").write_bytes(
            (c / "manifest.json").read_bytes().replace(b'"global_step": 4', b'"global_step": 40')
        ),
        "manifest.json",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, corruption):
    states = _two_step_checkpoints(tmp_path)
    damage, filename = CORRUPTIONS[corruption]
    damage(tmp_path / "checkpoint-step-4")
    fresh = make_model(9)
    with new_mgr(tmp_path, keep_last=2) as mgr:
        mgr.register(model=fresh, optimizer=torch.optim.AdamW(fresh.parameters(), lr=0.1))
        info = mgr.resume()
    assert info.name == "checkpoint-step-2"
    assert_state_equal(fresh, states[2])
    text = warnings_text(caplog)
    assert "checkpoint-step-4" in text and filename in text, text


def test_corrupt_explicit_checkpoint_is_not_found(tmp_path):
    _two_step_checkpoints(tmp_path)
    flip_byte(tmp_path / "checkpoint-step-4" / "model.safetensors")
    with new_mgr(tmp_path / "elsewhere") as mgr:
        mgr.register(model=make_model(), optimizer=torch.optim.AdamW(make_model().parameters()))
        with pytest.raises(CheckpointNotFound, match="model.safetensors"):
            mgr.resume(tmp_path / "checkpoint-step-4")


# ---- exact state ---------------------------------------------------------------------------------------------------


def test_grad_scaler_state_round_trips(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024, growth_interval=2)
    for _ in range(3):
        scaler.scale(model(torch.randn(5, 4)).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() == 2048.0 and scaler._get_growth_tracker() == 1
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=model, optimizer=opt, scaler=scaler)
        mgr.save(3)
    model2 = make_model(1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=8, growth_interval=100)
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=model2, optimizer=opt2, scaler=scaler2)
        mgr.resume()
    assert scaler2.state_dict() == scaler.state_dict()
    assert scaler2.get_scale() == 2048.0 and scaler2._get_growth_tracker() == 1
    assert scaler2.get_growth_interval() == 2


def test_rng_states_are_restored(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model(seed=4))
        torch.manual_seed(3)
        mgr.save(1)
        expected = (random.random(), np.random.rand(), np.random.standard_normal(), torch.rand(3))
    random.seed(100)
    np.random.seed(100)
    torch.manual_seed(100)
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model(seed=5))
        mgr.resume()
    got = (random.random(), np.random.rand(), np.random.standard_normal(), torch.rand(3))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_params_keep_their_dtype(tmp_path, dtype):
    model = make_model(dtype=dtype)
    expected = state_copy(model)
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=model)
        mgr.save(1)
    on_disk = safetensors.torch.load_file(tmp_path / "checkpoint-step-1" / "model.safetensors")
    assert {t.dtype for t in on_disk.values()} == {dtype}
    fresh = make_model(seed=7, dtype=dtype)
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=fresh)
        mgr.resume()
    assert_state_equal(fresh, expected)
    assert {p.dtype for p in fresh.parameters()} == {dtype}


def test_resumed_sampler_continues_the_epoch(tmp_path):
    ds = range(40)
    sampler = ResumableSampler(ds, batch_size=4, seed=3)
    sampler.set_epoch(1)
    full = list(sampler)
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model(), sampler=sampler)
        mgr.save(13, epoch=1, batch_idx=2)
    fresh = ResumableSampler(ds, batch_size=4, seed=0)
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model(), sampler=fresh)
        info = mgr.resume()
    fresh.set_epoch(info.epoch)
    assert list(fresh) == full[12:]


# ---- non-finite weights --------------------------------------------------------------------------------------------


def test_non_finite_checkpoint_is_unhealthy_and_never_evicts_the_last_healthy_one(tmp_path, caplog):
    model = make_model()
    healthy = state_copy(model)
    with new_mgr(tmp_path, keep_last=1) as mgr:
        mgr.register(model=model)
        mgr.save(2)
        mgr.wait(30)
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
        mgr.save(4)
        assert mgr.wait(30)
    assert "Non-finite values in model/0.weight" in warnings_text(caplog)
    assert folders(tmp_path) == ["checkpoint-step-2", "checkpoint-step-4"]
    bad = read_manifest(tmp_path / "checkpoint-step-4")
    assert bad["healthy"] is False and bad["unhealthy_tensors"] == ["model/0.weight"]
    assert read_manifest(tmp_path / "checkpoint-step-2")["healthy"] is True

    caplog.clear()
    fresh = make_model(3)
    with new_mgr(tmp_path, keep_last=1) as mgr:
        mgr.register(model=fresh)
        assert mgr.resume().name == "checkpoint-step-2"
        assert_state_equal(fresh, healthy)
        assert "newest healthy" in warnings_text(caplog)
        mgr.save(6)  # a newer healthy checkpoint: now the old ones may go
    assert folders(tmp_path) == ["checkpoint-step-6"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_non_finite_half_precision_and_optimizer_state_are_detected(tmp_path, dtype):
    model = make_model(dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4, dtype=dtype)).float().pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        model[2].bias[0] = float("inf")
        opt.state[model[0].weight]["momentum_buffer"][0, 0] = float("nan")
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=model, optimizer=opt)
        mgr.save(1)
    m = read_manifest(tmp_path / "checkpoint-step-1")
    assert m["healthy"] is False
    assert sorted(m["unhealthy_tensors"]) == ["model/2.bias", "optimizer/state.0.momentum_buffer"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn])
def test_health_check_finds_nan_and_inf_in_every_float_dtype_and_accepts_huge_finite_values(dtype):
    """The check sums each tensor (float32 slices for 16- and 8-bit floats) and looks element-wise only when the
    sum is not finite: a NaN or Inf anywhere is caught; finite values so large that their sum overflows are not
    called unhealthy."""
    from syncckpt.snapshot import _all_finite

    n = 3 << 20  # more than one slice
    big = torch.finfo(dtype).max
    huge = torch.full((n,), big, dtype=torch.float64).to(dtype)  # finite; their sum overflows any float type
    assert _all_finite(huge) and _all_finite(torch.zeros(0, dtype=dtype))
    assert _all_finite(torch.linspace(-1, 1, n).to(dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        if dtype == torch.float8_e4m3fn and math.isinf(bad):
            continue  # e4m3fn has no infinities (they saturate to NaN on conversion, checked as NaN)
        t = huge.clone()
        t[n - 7] = bad
        assert not _all_finite(t), (dtype, bad)
        assert not _all_finite(t.view(3, -1)[:, 1:]), (dtype, bad)  # a non-contiguous view of the same values


def test_only_unhealthy_checkpoints_are_still_resumed_with_a_warning(tmp_path, caplog):
    model = make_model()
    with torch.no_grad():
        model[2].bias.fill_(float("inf"))
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=model)
        mgr.save(3)
    with new_mgr(tmp_path) as mgr:
        fresh = make_model(1)
        mgr.register(model=fresh)
        assert mgr.resume().name == "checkpoint-step-3"
    assert torch.isinf(fresh[2].bias).all()
    assert "No healthy checkpoint" in warnings_text(caplog)


# ---- mismatches ----------------------------------------------------------------------------------------------------


def test_state_mismatch_names_keys_and_shapes_and_leaves_the_model_untouched(tmp_path):
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model(out=2), optimizer=torch.optim.SGD(make_model().parameters(), lr=0.1))
        mgr.save(1)
    other = make_model(seed=5, out=3)
    before = state_copy(other)
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
        with pytest.raises(StateMismatch) as info:
            mgr.resume()
    message = str(info.value)
    assert "2.weight: checkpoint (2, 8) vs model (3, 8)" in message and "2.bias" in message
    assert_state_equal(other, before)

    different = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2), nn.Linear(2, 2))
    before = state_copy(different)
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=different)
        with pytest.raises(StateMismatch, match=r"missing keys \['1\.weight'.*unexpected keys|missing keys.*3\.weight"):
            mgr.resume()
    assert_state_equal(different, before)


def test_state_mismatch_when_a_registered_object_is_not_in_the_checkpoint(tmp_path):
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model())
        mgr.save(1)
    with new_mgr(tmp_path) as mgr:
        mgr.register(model=make_model(), ema=Custom({"decay": 0.9}))
        with pytest.raises(StateMismatch, match=r"holds no state for \['ema'\]"):
            mgr.resume()


# ---- no pickle -----------------------------------------------------------------------------------------------------


def _everything(tmp_path: Path) -> dict[str, Any]:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    train_step(model, opt)
    return dict(
        model=model,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.StepLR(opt, 3),
        scaler=torch.amp.GradScaler("cpu"),
        sampler=ResumableSampler(range(10), 2),
        custom=Custom({"counts": {1: 2}, "arr": np.arange(3), "t": (1, 2)}),
    )


def test_resume_never_unpickles(tmp_path, monkeypatch):
    with new_mgr(tmp_path) as mgr:
        mgr.register(**_everything(tmp_path))
        mgr.save(5, epoch=0, batch_idx=1)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle used during resume")

    for target, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
        (torch.serialization, "load"),
    ]:
        monkeypatch.setattr(target, name, forbidden)
    with new_mgr(tmp_path) as mgr:
        mgr.register(**_everything(tmp_path))
        assert mgr.resume().global_step == 5


def test_checkpoint_files_are_safetensors_or_json(tmp_path):
    with new_mgr(tmp_path, metric_for_best="acc") as mgr:
        mgr.register(**_everything(tmp_path))
        mgr.save(5, epoch=0, batch_idx=1)
        mgr.save_epoch(0, global_step=6, metrics={"acc": 0.5})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "optimizer.safetensors", "state.json", "manifest.json"}
    for p in files:
        data = p.read_bytes()
        assert not data.startswith(b"\x80"), p
        if p.suffix == ".safetensors":
            safetensors.torch.load_file(p)
        else:
            json.loads(data)


# ---- failures while saving -----------------------------------------------------------------------------------------


def failing_while(full: list[bool], real: Any) -> Any:
    """``real``, except that it raises ENOSPC (a full disk) while ``full[0]`` is set."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("where", ["write_file", "fsync"])
def test_full_disk_keeps_the_previous_checkpoint_and_training_going(tmp_path, monkeypatch, caplog, where):
    full = [False]
    if where == "write_file":
        monkeypatch.setattr(local_mod, "write_file", failing_while(full, local_mod.write_file))
    else:
        monkeypatch.setattr(os, "fsync", failing_while(full, os.fsync))

    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    with new_mgr(tmp_path, save_every_n_steps=2, keep_last=1) as mgr:
        mgr.register(model=model, optimizer=opt)
        for g in (1, 2):
            train_step(model, opt)
            mgr.step(g)
        assert mgr.wait(30)
        full[0] = True
        for g in range(3, 7):
            train_step(model, opt)
            assert mgr.step(g) == (g % 2 == 0)
            assert mgr.wait(30)
        assert folders(tmp_path) == ["checkpoint-step-2"]
        local_mod.verify(tmp_path / "checkpoint-step-2")
        error = mgr.status()["save_error"]
        assert error and "checkpoint-step-6" in error and "No space left" in error
        assert "not being saved" in warnings_text(caplog)

        full[0] = False
        caplog.clear()
        train_step(model, opt)
        assert mgr.step(8) is True
        assert mgr.wait(30)
        assert mgr.status()["save_error"] is None
        assert "being saved again" in warnings_text(caplog)
    assert folders(tmp_path) == ["checkpoint-step-8"]
    local_mod.verify(tmp_path / "checkpoint-step-8")


def test_a_best_model_that_failed_to_save_does_not_raise_the_bar(tmp_path, monkeypatch):
    # The improvement of epoch 1 was never written (disk full). best_model on disk is still epoch 0's, so once the
    # disk is fine again, epoch 2 (better than what is on disk) must replace it.
    full = [False]
    monkeypatch.setattr(local_mod, "write_file", failing_while(full, local_mod.write_file))
    with new_mgr(tmp_path, metric_for_best="acc", keep_epochs=5) as mgr:
        mgr.register(model=make_model())
        mgr.save_epoch(0, global_step=10, metrics={"acc": 0.5})
        mgr.wait(30)
        full[0] = True
        mgr.save_epoch(1, global_step=20, metrics={"acc": 0.9})
        mgr.wait(30)
        assert mgr.status()["save_error"]
        full[0] = False
        mgr.save_epoch(2, global_step=30, metrics={"acc": 0.7})
        mgr.wait(30)
    assert folders(tmp_path) == ["best_model", "checkpoint-epoch-0", "checkpoint-epoch-2"]
    best = read_manifest(tmp_path / "best_model")
    assert (best["epoch"], best["metrics"]["acc"]) == (2, 0.7)


def test_staging_buffers_are_reused_across_saves(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters())
    train_step(model, opt)
    with new_mgr(tmp_path, save_every_n_steps=2) as mgr:
        mgr.register(model=model, optimizer=opt)
        mgr.save(1)
        mgr.wait(30)
        buffers = mgr._arena._buffers
        ptrs = {name: buf.data_ptr() for name, buf in buffers.items()}
        assert set(ptrs) >= {"model.safetensors", "optimizer.safetensors"}
        for g in range(2, 7):
            train_step(model, opt)
            mgr.step(g)
            mgr.wait(30)
        assert {name: buf.data_ptr() for name, buf in mgr._arena._buffers.items()} == ptrs


def test_unserialisable_state_surfaces_from_step_naming_the_key(tmp_path):
    custom = Custom({"ok": 1, "callback": lambda: 0})
    with new_mgr(tmp_path, save_every_n_steps=2) as mgr:
        mgr.register(model=make_model(), custom=custom)
        assert mgr.step(1) is False  # the background prefault must not swallow or raise it either
        with pytest.raises(StateNotSerializable, match=r"'custom\.callback'"):
            mgr.step(2)
        assert mgr.wait(30)
        assert not mgr._arena.lock.locked()
        custom.state = {"ok": 1}
        assert mgr.step(4) is True
    assert folders(tmp_path) == ["checkpoint-step-4"]


def test_unserialisable_optimizer_param_group_surfaces_from_step(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["schedule"] = object()
    with new_mgr(tmp_path, save_every_n_steps=1) as mgr:
        mgr.register(model=model, optimizer=opt)
        with pytest.raises(StateNotSerializable, match=r"'optimizer\.param_groups\.0\.schedule'"):
            mgr.step(1)


# ---- lifecycle and registration ------------------------------------------------------------------------------------


def test_closed_manager_refuses_work(tmp_path):
    mgr = new_mgr(tmp_path)
    mgr.register(model=make_model())
    mgr.close()
    mgr.close()  # twice is fine
    for call in (
        lambda: mgr.step(500),
        lambda: mgr.save(1),
        lambda: mgr.save_epoch(0, global_step=1),
        lambda: mgr.resume(),
    ):
        with pytest.raises(SyncCkptError, match="closed"):
            call()
    assert folders(tmp_path) == []


def test_context_manager_commits_pending_saves_on_exit(tmp_path):
    with new_mgr(tmp_path, save_every_n_steps=1) as mgr:
        mgr.register(model=make_model())
        mgr.step(1)
    assert folders(tmp_path) == ["checkpoint-step-1"]
    local_mod.verify(tmp_path / "checkpoint-step-1")


def test_failed_upload_at_interpreter_exit_is_logged_not_an_atexit_traceback(tmp_path):
    """A script that never calls close(), with on_upload_error="raise" and a mirror that cannot succeed (the
    remote holds a plain file where the checkpoint folder goes): the exit hook flushes, then logs the upload
    error instead of letting it escape as "Exception ignored in atexit callback"."""
    import subprocess
    import sys

    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "checkpoint-step-1").write_text("in the way")
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from syncckpt import CheckpointManager\n"
        f"m = CheckpointManager({str(tmp_path / 'ck')!r}, remote={(tmp_path / 'remote').as_uri()!r},\n"
        "                      on_upload_error='raise', save_every_n_steps=1, grace_period=5, handle_sigterm=False)\n"
        "m.register(model=torch.nn.Linear(2, 2))\n"
        "m.step(1, batch_idx=0)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERROR:syncckpt:At exit: upload to" in out.stderr and "Not a directory" in out.stderr, out.stderr
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert (tmp_path / "ck" / "checkpoint-step-1" / "manifest.json").exists()  # the local save committed


@pytest.mark.parametrize(
    ("url", "meant"), [("s3:/bucket/run", "s3://bucket/run"), ("gs//bucket/run", "gs://bucket/run")]
)
def test_a_mistyped_store_url_is_refused_not_mirrored_to_a_local_folder(tmp_path, monkeypatch, url, meant):
    """fsspec would read these as local paths: the "mirror" would sit on the disk the user meant to back up."""
    from syncckpt.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
        new_mgr(tmp_path / "ck", remote=url)
    assert not (tmp_path / url.split("/")[0]).exists()


def test_a_checkpoint_directory_that_is_a_file_is_a_config_error(tmp_path):
    from syncckpt.errors import ConfigError

    (tmp_path / "ck").write_text("not a folder")
    with pytest.raises(ConfigError, match="checkpoint directory .*/ck"):
        new_mgr(tmp_path / "ck")


def test_sigterm_without_a_remote_saves_and_says_saved_not_mirrored(tmp_path):
    """A real SIGTERM (the process signals itself) to a local-only run: the next step() saves where the loop is
    and exits 143, and the log does not claim a mirror that does not exist."""
    import subprocess
    import sys

    script = (
        "import logging, os, signal, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from syncckpt import CheckpointManager\n"
        f"m = CheckpointManager({str(tmp_path / 'ck')!r}, save_every_n_steps=100, grace_period=30)\n"
        "m.register(model=torch.nn.Linear(2, 2))\n"
        "for s in range(1, 10):\n"
        "    if s == 3:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    m.step(s, batch_idx=s - 1)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 143, out.stderr
    assert "SIGTERM: checkpoint saved; exiting" in out.stderr, out.stderr
    assert "mirrored" not in out.stderr, out.stderr
    assert folders(tmp_path / "ck") == ["checkpoint-step-3"]


@pytest.mark.parametrize(
    "name", ["../x", "rng", "state", "manifest", "LATEST", "trainer", "", "a/b", "a.b", "1x", "x" * 65, "a b"]
)
def test_register_refuses_bad_names(tmp_path, name):
    with new_mgr(tmp_path) as mgr, pytest.raises(ValueError, match="cannot register"):
        mgr.register(**{name: make_model()})


@pytest.mark.parametrize("obj", [object(), 42, {"state": 1}, types.SimpleNamespace(state_dict=lambda: {})])
def test_register_refuses_objects_without_state_dict(tmp_path, obj):
    with new_mgr(tmp_path) as mgr, pytest.raises(TypeError, match="state_dict"):
        mgr.register(thing=obj)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(save_every_n_steps=0),
        dict(save_every_n_minutes=0),
        dict(keep_last=0),
        dict(keep_epochs=-1),
        dict(mode="avg"),
        dict(on_upload_error="ignore"),
        dict(save_every_n_epochs=0),
    ],
)
def test_invalid_settings_are_refused(tmp_path, kwargs):
    from syncckpt.errors import ConfigError

    with pytest.raises(ConfigError):  # also a ValueError
        new_mgr(tmp_path, **kwargs)


def test_leftovers_are_cleaned_when_a_manager_starts(tmp_path):
    (tmp_path / ".tmp-checkpoint-step-9-abcdef01").mkdir(parents=True)
    with new_mgr(tmp_path):
        pass
    assert folders(tmp_path) == []


def test_status_separates_checkpoints_still_on_the_remote_from_the_upload_history(tmp_path):
    # issue 18: status()["mirrored"] listed checkpoints retention had since deleted from the remote
    remote = (tmp_path / "bucket" / "run").as_uri()
    model = nn.Linear(2, 2)
    with CheckpointManager(tmp_path / "ck", save_every_n_steps=None, keep_last=1, remote=remote) as mgr:
        mgr.register(model=model)
        for step in (1, 2, 3):
            mgr.save(step, batch_idx=step)
            assert mgr.wait(30)
        st = mgr.status()
    assert st["mirrored"] == ["checkpoint-step-3"]
    assert st["mirrored_history"] == ["checkpoint-step-1", "checkpoint-step-2", "checkpoint-step-3"]
    assert sorted(p.name for p in (tmp_path / "bucket" / "run").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-step-3"
    ]


@pytest.mark.parametrize(("keep_local", "left"), [("all", 3), ("newest", 1), ("none", 0)])
def test_keep_local_bounds_the_local_copies_once_mirrored(tmp_path, keep_local, left):
    remote = tmp_path / "bucket" / "run"
    model = nn.Linear(2, 2)
    with CheckpointManager(tmp_path / "ck", save_every_n_steps=None, keep_last=3, remote=str(remote),
                           keep_local=keep_local) as mgr:  # fmt: skip
        mgr.register(model=model)
        for step in (1, 2, 3):
            mgr.save(step, batch_idx=step)
            assert mgr.wait(30)
        mgr.close()
        assert mgr.list_local() == [f"checkpoint-step-{s}" for s in (1, 2, 3)][3 - left :]
    assert sorted(p.name for p in remote.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-step-1",
        "checkpoint-step-2",
        "checkpoint-step-3",
    ]
    resumed = nn.Linear(2, 2)
    with CheckpointManager(tmp_path / "ck", save_every_n_steps=None, keep_last=3, remote=str(remote),
                           keep_local=keep_local) as mgr:  # fmt: skip
        mgr.register(model=resumed)
        assert mgr.resume().global_step == 3
    assert torch.equal(resumed.weight, model.weight)


def test_keep_local_without_a_remote_is_a_config_error(tmp_path):
    from syncckpt.errors import ConfigError

    with pytest.raises(ConfigError, match="keep_local='none' needs a remote"):
        CheckpointManager(tmp_path / "ck", keep_local="none")
    with pytest.raises(ConfigError, match="keep_local must be one of"):
        CheckpointManager(tmp_path / "ck", keep_local="some")


def test_status_line_says_what_is_committed_mirrored_uploading_and_when_the_next_save_is_due(tmp_path):
    model = nn.Linear(2, 2)
    with CheckpointManager(tmp_path / "ck", save_every_n_steps=5, remote=str(tmp_path / "bucket" / "run")) as mgr:
        mgr.register(model=model)
        assert mgr.status_line().startswith("syncckpt: committed none yet | mirrored none yet | uploading none")
        mgr.step(5, batch_idx=4)
        assert mgr.wait(30)
        line = mgr.status_line()
    assert line == (
        "syncckpt: committed checkpoint-step-5 | mirrored checkpoint-step-5 | uploading none | next save step 10"
    )
    assert len(line) <= 120 and "\n" not in line


def test_resume_from_a_remote_url_uses_the_storage_options_without_a_remote(
    tmp_path: Path, s3_storage_options: dict[str, Any], s3_remote_url: str
) -> None:
    """A fresh session resuming someone's checkpoint URL with no remote of its own: the endpoint in
    storage_options must reach the store (it used to be dropped, so s3fs asked s3.amazonaws.com)."""
    model = make_model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, opt)
    with new_mgr(tmp_path / "a", remote=s3_remote_url, storage_options=s3_storage_options) as mgr:
        mgr.register(model=model, optimizer=opt)
        mgr.save(3, epoch=0, batch_idx=2)
        assert mgr.wait()
    saved = state_copy(model)
    fresh = make_model(2)
    with new_mgr(tmp_path / "b", storage_options=s3_storage_options) as mgr:
        mgr.register(model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1))
        info = mgr.resume(f"{s3_remote_url}/checkpoint-step-3")
    assert info is not None and info.global_step == 3
    assert_state_equal(fresh, saved)


def test_sigterm_during_an_outage_names_the_checkpoint_only_the_local_folder_has(
    tmp_path, fault_proxy, fault_s3_storage_options, s3_remote_url
):
    """The loop came back to step() at once and saved; then the mirror could not flush within the grace period.
    The watchdog used to fire at half the grace period anyway, saying that training "did not come back to step()",
    and exit before finish() could say what was saved. After that line the process took another 5-14 s: the exit
    hook joined the uploader thread, still in an upload's retries, for 5 s, then retried the lease's release."""
    import json
    import subprocess
    import sys

    script = (
        "import json, logging, os, signal, sys, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from syncckpt import CheckpointManager\n"
        f"m = CheckpointManager({str(tmp_path / 'ck')!r}, save_every_n_steps=100, grace_period=6,\n"
        f"                      remote={s3_remote_url!r}, storage_options=json.loads(sys.argv[1]))\n"
        "m.register(model=torch.nn.Linear(2, 2))\n"
        "m.save(1, batch_idx=0)\n"
        "assert m.wait()\n"
        "print('MIRRORED', flush=True)\n"
        "sys.stdin.readline()  # the parent took the store down\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "for s in range(2, 10):\n"
        "    m.step(s, batch_idx=s - 1)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(fault_s3_storage_options)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "MIRRORED"
        fault_proxy.down()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        proc.kill()
        fault_proxy.up()
    assert proc.returncode == 143, err
    assert "SIGTERM: checkpoint-step-2 saved locally; flush incomplete: not mirrored yet" in err, err
    # then it exits: the exit hook neither waits for the upload's retries nor retries the lease's release
    assert took < 6 + 5, (took, err)
    assert "did not come back to step()" not in err, err
    # (beside the upload's staging link of step 2, which the next session's mirror takes up)
    assert [n for n in folders(tmp_path / "ck") if not n.startswith(".")] == ["checkpoint-step-2"]


@pytest.mark.parametrize("ending", ["crash", "falls off the end"])
def test_a_checkpoint_pending_when_the_script_ends_is_mirrored_by_the_exit_flush(tmp_path, ending):
    """A script that raises (or just ends, never closing the manager) right after a save: the exit flush mirrors
    the pending checkpoint. It used to run after concurrent.futures stopped taking work, so every upload attempt
    failed with "cannot schedule new futures after interpreter shutdown" and nothing was mirrored."""
    import subprocess
    import sys

    remote = tmp_path / "remote"
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from syncckpt import CheckpointManager\n"
        f"m = CheckpointManager({str(tmp_path / 'ck')!r}, remote={remote.as_uri()!r}, save_every_n_steps=1,\n"
        "                      grace_period=30)\n"
        "m.register(model=torch.nn.Linear(64, 64))\n"
        "m.step(1, epoch=0, batch_idx=0)\n"
        + ("raise RuntimeError('crash right after a save')\n" if ending == "crash" else "")
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == (1 if ending == "crash" else 0), out.stderr
    assert "cannot schedule new futures" not in out.stderr, out.stderr
    assert "Mirrored checkpoint-step-1" in out.stderr, out.stderr
    assert sorted(p.name for p in remote.iterdir()) == ["LATEST", "checkpoint-step-1"]
    fresh = torch.nn.Linear(64, 64)
    with new_mgr(tmp_path / "fresh", remote=remote.as_uri()) as mgr:  # a wiped disk resumes from the mirror
        mgr.register(model=fresh)
        info = mgr.resume()
    assert info is not None and info.global_step == 1


def test_a_second_session_refused_by_the_lease_leaves_the_live_sessions_folder_alone(
    tmp_path, fault_proxy, fault_s3_storage_options, s3_remote_url
):
    """Started on the same folder and run, it used to clean the folder's temporary folders before the lease
    refused it, deleting the live session's upload staging copy (its upload then failed: 'missing ... listed in
    the manifest')."""
    from syncckpt.errors import LeaseHeld

    model = make_model(1)
    with new_mgr(tmp_path / "ck", remote=s3_remote_url, storage_options=fault_s3_storage_options) as live:
        live.register(model=model)
        fault_proxy.down()  # the upload cannot finish: its staging copy stays in the folder
        live.save(1, batch_idx=0)
        live._writer.wait()  # committed locally (the upload, with its staging copy, is under way)
        staging = [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".upload-checkpoint-step-1")]
        assert len(staging) == 1
        fault_proxy.up()
        with pytest.raises(LeaseHeld):
            new_mgr(tmp_path / "ck", remote=s3_remote_url, storage_options=fault_s3_storage_options)
        assert live.wait() and live.status()["mirrored"] == ["checkpoint-step-1"]
