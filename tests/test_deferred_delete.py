"""Retention's deletions: a dropped checkpoint leaves the view at once and its files are unlinked when the next
save starts writing (so that save fills the page-cache pages they free); nothing is ever overwritten in place, so
a reader that mapped a dropped checkpoint's file keeps the bytes it loaded."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from syncckpt import CheckpointManager, local


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_dropped_checkpoint_is_hidden_at_once_and_gone_when_the_next_save_writes(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 64)
    mgr = CheckpointManager(tmp_path, save_every_n_steps=1, keep_last=1, handle_sigterm=False)
    mgr.register(model=model)
    try:
        for step in (1, 2):
            assert mgr.step(step, epoch=0, batch_idx=step)
            assert mgr.wait()
        names = entries(tmp_path)
        assert [n for n in names if not n.startswith(".")] == ["checkpoint-step-2"]
        assert [c.name for c in local.list_checkpoints(tmp_path)] == ["checkpoint-step-2"]
        assert [n for n in names if n.startswith(".del-checkpoint-step-1-")], names  # waiting for the next write
        assert mgr.status()["local"] == ["checkpoint-step-2"]

        assert mgr.step(3, epoch=0, batch_idx=3)
        assert mgr.wait()
        names = entries(tmp_path)
        assert not [n for n in names if n.startswith(".del-checkpoint-step-1-")], names
        assert [n for n in names if not n.startswith(".")] == ["checkpoint-step-3"]
    finally:
        mgr.close()
    assert entries(tmp_path) == ["checkpoint-step-3"], "close() leaves nothing hidden behind"


def test_a_crash_before_the_next_save_leaves_a_folder_the_next_start_removes(tmp_path: Path) -> None:
    model = torch.nn.Linear(8, 8)
    mgr = CheckpointManager(tmp_path, save_every_n_steps=1, keep_last=1, handle_sigterm=False)
    mgr.register(model=model)
    for step in (1, 2):
        assert mgr.step(step, epoch=0, batch_idx=step)
        assert mgr.wait()
    hidden = [n for n in entries(tmp_path) if n.startswith(".del-")]
    assert hidden
    # what a SIGKILL here leaves (the manager is not closed): the next session's start-up removes it
    fresh = CheckpointManager(tmp_path, save_every_n_steps=None, handle_sigterm=False)
    try:
        assert entries(tmp_path) == ["checkpoint-step-2"]
    finally:
        fresh.close()
        mgr.close()


def test_a_reader_that_mapped_a_dropped_checkpoint_keeps_its_bytes(tmp_path: Path) -> None:
    model = torch.nn.Linear(512, 512)  # 1 MB of weights: read_file and safetensors both map a file this size
    mgr = CheckpointManager(tmp_path, save_every_n_steps=1, keep_last=1, handle_sigterm=False)
    mgr.register(model=model)
    try:
        assert mgr.step(1, epoch=0, batch_idx=1)
        assert mgr.wait()
        saved = model.weight.detach().clone()
        path = tmp_path / "checkpoint-step-1" / "model.safetensors"
        by_safetensors = load_file(str(path))  # views of a mapping of the file
        by_syncckpt = local.read_file(path)  # a copy-on-write mapping
        before = bytes(by_syncckpt)
        for step in range(2, 5):  # step 1 is dropped, later saves write new files
            with torch.no_grad():
                model.weight.add_(1.0)
            assert mgr.step(step, epoch=0, batch_idx=step)
            assert mgr.wait()
        assert not path.exists()
        weight = next(v for k, v in by_safetensors.items() if k.endswith("weight"))
        assert torch.equal(weight, saved), "a dropped checkpoint's bytes changed under a reader"
        assert bytes(by_syncckpt) == before
    finally:
        mgr.close()
