"""Recycling: a retired checkpoint's data files are overwritten in place by the next save (local.retire and
write_file(recycle=...)), never a file another checkpoint or an upload still shares, and nothing is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from syncckpt import CheckpointManager, local
from syncckpt.manifest import Manifest, sha256_hex

BIG = local.RECYCLE_MIN_BYTES


def commit_ckpt(directory: Path, name: str, payload: bytes, *, recycle: Path | None = None) -> Manifest:
    def write(tmp: Path) -> list[local.FileEntry]:
        return [
            local.write_file(tmp, "model.safetensors", [payload], recycle=recycle),
            local.write_file(tmp, "sub/opt.safetensors", [payload[::-1]], recycle=recycle),
            local.write_file(tmp, "state.json", [b"{}"], recycle=recycle),
        ]

    step = int(name.rsplit("-", 1)[1])
    return local.commit(directory, Manifest(name, "step", step, 0, -1, files=[]), write)


def test_retire_keeps_the_large_files_and_the_next_write_overwrites_them_in_place(tmp_path: Path) -> None:
    pool = tmp_path / local.RECYCLE_POOL
    commit_ckpt(tmp_path, "checkpoint-step-1", os.urandom(BIG + 100))
    inode = os.stat(tmp_path / "checkpoint-step-1" / "model.safetensors").st_ino
    local.retire(tmp_path, "checkpoint-step-1")
    assert not (tmp_path / "checkpoint-step-1").exists()
    assert sorted(p.relative_to(pool).as_posix() for p in pool.rglob("*") if p.is_file()) == [
        "model.safetensors",
        "sub/opt.safetensors",  # state.json is under RECYCLE_MIN_BYTES: deleted
    ]

    smaller = os.urandom(BIG + 10)  # shorter than the file it overwrites: the old tail must go
    m = commit_ckpt(tmp_path, "checkpoint-step-2", smaller, recycle=pool)
    path = tmp_path / "checkpoint-step-2" / "model.safetensors"
    assert os.stat(path).st_ino == inode, "the retired file was not reused"
    assert path.read_bytes() == smaller
    assert (tmp_path / "checkpoint-step-2" / "sub" / "opt.safetensors").read_bytes() == smaller[::-1]
    assert {e.path: e.sha256 for e in m.files}["model.safetensors"] == sha256_hex(smaller)
    local.verify(tmp_path / "checkpoint-step-2")
    assert not any(p.is_file() for p in pool.rglob("*")), "the pool's files moved into the new checkpoint"


def test_a_file_another_checkpoint_shares_is_never_recycled(tmp_path: Path) -> None:
    payload = os.urandom(BIG)
    first = commit_ckpt(tmp_path, "checkpoint-step-1", payload)
    src = tmp_path / "checkpoint-step-1"
    local.commit(  # an epoch checkpoint hard-linking the step's files, as the writer makes one
        tmp_path,
        Manifest("checkpoint-epoch-0", "epoch", 1, 0, -1, files=[]),
        lambda tmp: local.link_files(src, tmp, first.files),
    )
    local.retire(tmp_path, "checkpoint-step-1")
    assert not (tmp_path / local.RECYCLE_POOL / "model.safetensors").exists()
    commit_ckpt(tmp_path, "checkpoint-step-2", os.urandom(BIG), recycle=tmp_path / local.RECYCLE_POOL)
    manifest, data = local.verify(tmp_path / "checkpoint-epoch-0")  # untouched by the later write
    assert bytes(data["model.safetensors"]) == payload


def test_the_pool_holds_one_checkpoint_and_cleanup_removes_it(tmp_path: Path) -> None:
    commit_ckpt(tmp_path, "checkpoint-step-1", os.urandom(BIG))
    commit_ckpt(tmp_path, "checkpoint-step-2", os.urandom(BIG))
    local.retire(tmp_path, "checkpoint-step-1")
    newest = os.stat(tmp_path / "checkpoint-step-2" / "model.safetensors").st_ino
    local.retire(tmp_path, "checkpoint-step-2")
    pool = tmp_path / local.RECYCLE_POOL
    assert os.stat(pool / "model.safetensors").st_ino == newest
    assert len([p for p in pool.rglob("*") if p.is_file()]) == 2
    assert local.cleanup_leftovers(tmp_path) == [f"removed leftover {local.RECYCLE_POOL}"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "best", "checkpoint-step-x"])
def test_retire_refuses_non_checkpoint_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(Exception, match="not a checkpoint folder name"):
        local.retire(tmp_path, name)


def test_a_training_run_reuses_the_retired_files_and_close_leaves_only_checkpoints(tmp_path: Path) -> None:
    model = torch.nn.Linear(600, 600)  # 1.4 MB of weights: above RECYCLE_MIN_BYTES
    mgr = CheckpointManager(tmp_path, save_every_n_steps=1, keep_last=2, handle_sigterm=False)
    mgr.register(model=model)
    inodes = []
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        assert mgr.step(step, epoch=0, batch_idx=step)
        assert mgr.wait()
        inodes.append(os.stat(tmp_path / f"checkpoint-step-{step}" / "model.safetensors").st_ino)
    mgr.close()
    assert inodes[3] == inodes[0] and inodes[4] == inodes[1], f"no reuse: {inodes}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-step-4", "checkpoint-step-5"]
    for name in ("checkpoint-step-4", "checkpoint-step-5"):
        local.verify(tmp_path / name)
    restored = torch.nn.Linear(600, 600)
    mgr = CheckpointManager(tmp_path, save_every_n_steps=None, handle_sigterm=False)
    mgr.register(model=restored)
    assert mgr.resume().global_step == 5
    mgr.close()
    assert torch.equal(restored.weight, model.weight)
