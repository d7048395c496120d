"""The disk-budget check counts what keep_local keeps (issue 18), through CheckpointManager.

At the first commit the writer (syncckpt/writer.py) checks whether the checkpoints kept locally fit the disk:
retention's count with keep_local="all", the newest plus one still uploading with "newest", one with "none". The
limit is Kaggle's 20 GB when the folder is under /kaggle/working; nothing else gives one (the check does not look
at the disk's free space, so there is no shutil.disk_usage to fake). These tests therefore monkeypatch
``syncckpt.env.KAGGLE_WORKING`` to a temporary folder and ``syncckpt.env.KAGGLE_WORKING_LIMIT`` to a few
checkpoints' worth of bytes: a small Kaggle disk, with everything else real (the manager, writer, uploader and a
local-folder mirror). The fake /kaggle/working also makes the platform Kaggle, as on the real one.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from syncckpt import CheckpointManager, env, local


def checkpoint_size(tmp_path) -> int:
    """Bytes of this test's first checkpoint (a manager outside the fake /kaggle/working checks nothing)."""
    with CheckpointManager(tmp_path / "measure", deadline="off", handle_sigterm=False) as mgr:
        mgr.register(model=model())
        mgr.save(1)
        assert mgr.wait(30)
    return next(c.manifest.total_size for c in local.list_checkpoints(tmp_path / "measure"))


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 64)  # about 16 KB of weights: the size, not the unit, matters here


@pytest.fixture
def small_kaggle_disk(tmp_path, monkeypatch):
    """A fake /kaggle/working; returns a function that sets its limit in checkpoints and runs a first save."""
    size = checkpoint_size(tmp_path)
    working = tmp_path / "kaggle" / "working"
    working.mkdir(parents=True)
    monkeypatch.setattr(env, "KAGGLE_WORKING", working)

    def first_save(keep_local: str, limit_in_checkpoints: float, caplog) -> list[str]:
        monkeypatch.setattr(env, "KAGGLE_WORKING_LIMIT", int(limit_in_checkpoints * size))
        name = f"{keep_local}-{limit_in_checkpoints}"
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with CheckpointManager(
                working / name,
                remote=str(tmp_path / "bucket" / name),  # a mirror outside /kaggle/working
                keep_local=keep_local,
                deadline="off",
                handle_sigterm=False,
            ) as mgr:  # defaults: keep_last 1 + keep_epochs 3, no best_model: retention keeps 4
                mgr.register(model=model())
                mgr.save(1)
                assert mgr.wait(30)
        budget = [str(w.message) for w in caught if issubclass(w.category, env.DiskBudgetWarning)]
        logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "limit;" in r.getMessage()]
        assert budget == logged, (budget, logged)  # one warning, also in the log a notebook shows
        return budget

    return first_save


def test_keep_local_all_counts_retention_and_names_the_setting_that_fits(small_kaggle_disk, caplog):
    caplog.set_level(logging.INFO, logger="syncckpt")
    # all: 4 kept + 1 being written = 5 checkpoints on a disk of 4.5
    [warning] = small_kaggle_disk("all", 4.5, caplog)
    assert "keeping 4 checkpoints of " in warning and "(keep + 1 while saving)" in warning, warning
    assert warning.endswith("lower keep_last/keep_epochs to 3, or mirror to a remote with keep_local='newest'")
    # the setting named fits: newest + one uploading + one being written = 3 of 4.5
    assert small_kaggle_disk("newest", 4.5, caplog) == []


def test_keep_local_newest_is_bounded_at_two_and_a_smaller_disk_names_none(small_kaggle_disk, caplog):
    caplog.set_level(logging.INFO, logger="syncckpt")
    # newest: 2 kept (the newest, and the previous one until it is mirrored) + 1 being written on a disk of 2.5
    [warning] = small_kaggle_disk("newest", 2.5, caplog)
    assert "keeping 2 checkpoints of " in warning and "keep_local='none'" in warning, warning
    assert small_kaggle_disk("none", 2.5, caplog) == []  # the one being written + the one uploading: 2 of 2.5
    # below two checkpoints even "none" cannot fit: the warning says so rather than naming a setting
    [warning] = small_kaggle_disk("none", 1.5, caplog)
    assert "keeping 1 checkpoint of " in warning and warning.endswith("checkpoint to a larger disk"), warning
