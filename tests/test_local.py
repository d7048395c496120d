"""The local folder: atomic commit, leftover repair, listing, verification, deletion, hashing foreign folders."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from syncckpt import local
from syncckpt.errors import CheckpointCorrupt, UnsafeCheckpoint
from syncckpt.manifest import Manifest, parse_checkpoint_name, sha256_hex


def commit_ckpt(directory: Path, name: str, payload: bytes = b"payload", step: int | None = None) -> Manifest:
    """Commit a small checkpoint with two data files (one in a subfolder)."""
    kind, number = parse_checkpoint_name(name)
    if step is None:
        step = number if kind == "step" else 0

    def write(tmp: Path) -> list[local.FileEntry]:
        return [
            local.write_file(tmp, "model.safetensors", [payload[:3], memoryview(payload[3:])]),
            local.write_file(tmp, "sub/state.json", [b'{"x": 1}']),
        ]

    return local.commit(directory, Manifest(name, kind, step, 0, -1, files=[]), write)


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def edit_manifest(ckpt: Path, change) -> None:
    raw = json.loads((ckpt / "manifest.json").read_bytes())
    change(raw)
    (ckpt / "manifest.json").write_text(json.dumps(raw))


# ---- commit ------------------------------------------------------------------------------------------------------


def test_commit_writes_files_and_manifest_last(tmp_path):
    m = commit_ckpt(tmp_path, "checkpoint-step-1")
    assert visible(tmp_path) == ["checkpoint-step-1"]
    assert [f.path for f in m.files] == ["model.safetensors", "sub/state.json"]
    assert m.file("model.safetensors").sha256 == sha256_hex(b"payload")
    on_disk = Manifest.from_bytes((tmp_path / "checkpoint-step-1" / "manifest.json").read_bytes())
    assert on_disk == m
    manifest, files = local.verify(tmp_path / "checkpoint-step-1")
    assert files == {"model.safetensors": b"payload", "sub/state.json": b'{"x": 1}'}


def test_failed_write_leaves_no_partial_folder(tmp_path):
    commit_ckpt(tmp_path, "checkpoint-step-1")

    def write(tmp: Path) -> list[local.FileEntry]:
        local.write_file(tmp, "model.safetensors", [b"half"])
        raise RuntimeError("boom midway")

    with pytest.raises(RuntimeError, match="boom midway"):
        local.commit(tmp_path, Manifest("checkpoint-step-2", "step", 2, 0, -1, files=[]), write)
    assert visible(tmp_path) == ["checkpoint-step-1"]
    local.verify(tmp_path / "checkpoint-step-1")


def test_failed_replace_keeps_the_old_folder(tmp_path):
    commit_ckpt(tmp_path, "best_model", b"old best")

    def write(tmp: Path) -> list[local.FileEntry]:
        local.write_file(tmp, "model.safetensors", [b"new"])
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        local.commit(tmp_path, Manifest("best_model", "best", 9, 0, -1, files=[]), write)
    assert visible(tmp_path) == ["best_model"]
    assert local.verify(tmp_path / "best_model")[1]["model.safetensors"] == b"old best"


def test_replace_swaps_contents_and_leaves_nothing_hidden(tmp_path):
    commit_ckpt(tmp_path, "best_model", b"old best")
    commit_ckpt(tmp_path, "best_model", b"new best")
    assert visible(tmp_path) == ["best_model"]
    assert local.verify(tmp_path / "best_model")[1]["model.safetensors"] == b"new best"


def test_write_file_refuses_escaping_paths(tmp_path):
    with pytest.raises(UnsafeCheckpoint):
        local.write_file(tmp_path, "../evil", [b"x"])
    assert not (tmp_path.parent / "evil").exists()


# ---- leftovers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [".tmp-", ".del-", ".upload-", ".pull-"])
def test_cleanup_removes_hidden_leftovers(tmp_path, prefix):
    commit_ckpt(tmp_path, "checkpoint-step-1")
    leftover = tmp_path / f"{prefix}checkpoint-step-2-1a2b3c4d"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "model.safetensors").write_bytes(b"partial")
    done = local.cleanup_leftovers(tmp_path)
    assert done == [f"removed leftover {leftover.name}"]
    assert visible(tmp_path) == ["checkpoint-step-1"]


def test_cleanup_restores_old_folder_when_the_replace_was_interrupted(tmp_path):
    # A crash between the two renames of a replace: NAME was moved aside to .old-NAME-xxxx, the new one never
    # took its place (its .tmp- folder is still there). The old checkpoint is the only copy: it must come back.
    commit_ckpt(tmp_path, "best_model", b"old best", step=5)
    os.rename(tmp_path / "best_model", tmp_path / ".old-best_model-deadbeef")
    (tmp_path / ".tmp-best_model-0badf00d").mkdir()
    done = local.cleanup_leftovers(tmp_path)
    assert "restored best_model from an interrupted replace" in done
    assert visible(tmp_path) == ["best_model"]
    assert local.verify(tmp_path / "best_model")[1]["model.safetensors"] == b"old best"


def test_cleanup_restores_an_old_step_folder(tmp_path):
    commit_ckpt(tmp_path, "checkpoint-step-5", b"old step")
    os.rename(tmp_path / "checkpoint-step-5", tmp_path / ".old-checkpoint-step-5-12345678")
    local.cleanup_leftovers(tmp_path)
    assert [c.name for c in local.list_checkpoints(tmp_path)] == ["checkpoint-step-5"]


def test_cleanup_removes_old_folder_when_the_replace_finished(tmp_path):
    commit_ckpt(tmp_path, "best_model", b"old best")
    os.rename(tmp_path / "best_model", tmp_path / ".old-best_model-deadbeef")
    commit_ckpt(tmp_path, "best_model", b"new best")
    done = local.cleanup_leftovers(tmp_path)
    assert done == ["removed leftover .old-best_model-deadbeef"]
    assert visible(tmp_path) == ["best_model"]
    assert local.verify(tmp_path / "best_model")[1]["model.safetensors"] == b"new best"


def test_cleanup_leaves_ordinary_files_and_folders_alone(tmp_path):
    commit_ckpt(tmp_path, "checkpoint-step-1")
    (tmp_path / "data").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".gitignore").write_text("*")
    assert local.cleanup_leftovers(tmp_path) == []
    assert visible(tmp_path) == [".gitignore", "checkpoint-step-1", "data", "notes.txt"]


def test_cleanup_of_a_missing_folder_does_nothing(tmp_path):
    assert local.cleanup_leftovers(tmp_path / "nope") == []


# ---- listing -----------------------------------------------------------------------------------------------------


def test_list_checkpoints_skips_incomplete_corrupt_and_foreign_folders(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="syncckpt")
    commit_ckpt(tmp_path, "checkpoint-step-1")
    commit_ckpt(tmp_path, "checkpoint-epoch-0")
    (tmp_path / "checkpoint-step-7").mkdir()  # no manifest: a save that never committed
    (tmp_path / "checkpoint-step-8").mkdir()
    (tmp_path / "checkpoint-step-8" / "manifest.json").write_text("{garbage")
    commit_ckpt(tmp_path, "checkpoint-step-9")
    os.rename(tmp_path / "checkpoint-step-9", tmp_path / "checkpoint-step-10")  # manifest names another folder
    for foreign in ("data", "checkpoint-step-x", "checkpoint-step-", "Checkpoint-step-3", ".tmp-checkpoint-step-4-ab"):
        (tmp_path / foreign).mkdir()
        (tmp_path / foreign / "manifest.json").write_text("{}")
    (tmp_path / "checkpoint-step-11").write_text("a file, not a folder")
    found = local.list_checkpoints(tmp_path)
    assert [c.name for c in found] == ["checkpoint-epoch-0", "checkpoint-step-1"]
    assert found[1].manifest.global_step == 1
    assert found[1].manifest_sha256 == sha256_hex((tmp_path / "checkpoint-step-1" / "manifest.json").read_bytes())
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for name in ("checkpoint-step-7", "checkpoint-step-8", "checkpoint-step-10"):
        assert name in warned
    for name in ("data", "checkpoint-step-x"):
        assert f"{name}:" not in warned and f"/{name} " not in warned


def test_list_checkpoints_of_a_missing_folder_is_empty(tmp_path):
    assert local.list_checkpoints(tmp_path / "nope") == []


# ---- verification ------------------------------------------------------------------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,expect",
    [
        (lambda c: _flip(c / "model.safetensors"), r"checkpoint-step-3/model\.safetensors: SHA-256 mismatch"),
        (lambda c: (c / "model.safetensors").write_bytes(b"pay"), r"checkpoint-step-3/model\.safetensors: size 3"),
        (lambda c: (c / "sub" / "state.json").unlink(), r"checkpoint-step-3/sub/state\.json: missing"),
        (
            lambda c: edit_manifest(c, lambda raw: raw["files"][0].update(sha256="0" * 64)),
            r"checkpoint-step-3/model\.safetensors: SHA-256 mismatch",
        ),
        (
            lambda c: edit_manifest(c, lambda raw: raw["files"][0].update(size=8)),
            r"checkpoint-step-3/model\.safetensors: size 7 bytes, manifest says 8",
        ),
        (lambda c: edit_manifest(c, lambda raw: raw.update(global_step=4)), r"checkpoint-step-3/manifest\.json"),
        (
            lambda c: edit_manifest(c, lambda raw: raw.update(name="checkpoint-step-4", global_step=4)),
            r"checkpoint-step-3/manifest\.json: describes 'checkpoint-step-4'",
        ),
        (
            lambda c: (c / "manifest.json").write_bytes((c / "manifest.json").read_bytes()[:-20]),
            r"checkpoint-step-3/manifest\.json: not valid JSON",
        ),
        (lambda c: (c / "manifest.json").unlink(), r"checkpoint-step-3/manifest\.json: missing"),
    ],
    ids=[
        "flipped-byte",
        "truncated",
        "missing-file",
        "manifest-digest",
        "manifest-size",
        "manifest-step",
        "manifest-name",
        "manifest-truncated",
        "manifest-missing",
    ],
)
def test_verify_detects_damage_naming_the_file(tmp_path, damage, expect):
    commit_ckpt(tmp_path, "checkpoint-step-3")
    local.verify(tmp_path / "checkpoint-step-3")
    damage(tmp_path / "checkpoint-step-3")
    with pytest.raises(CheckpointCorrupt, match=expect):
        local.verify(tmp_path / "checkpoint-step-3")


def test_verify_reports_an_unopenable_listed_path_as_corrupt(tmp_path):
    # A (hostile or damaged) manifest may list a name the file system cannot even stat (ENAMETOOLONG): that is a
    # bad checkpoint, so resume must be able to catch it as CheckpointCorrupt and fall back, not crash on OSError.
    commit_ckpt(tmp_path, "checkpoint-step-3")
    edit_manifest(tmp_path / "checkpoint-step-3", lambda raw: raw["files"][0].update(path="a" * 300))
    with pytest.raises(CheckpointCorrupt, match="a" * 300):
        local.verify(tmp_path / "checkpoint-step-3")


def test_verify_refuses_a_symlink_out_of_the_folder(tmp_path):
    commit_ckpt(tmp_path, "checkpoint-step-3")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"payload")
    target = tmp_path / "checkpoint-step-3" / "model.safetensors"
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(UnsafeCheckpoint, match="outside the checkpoint folder"):
        local.verify(tmp_path / "checkpoint-step-3")


# ---- deletion ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["..", ".", "", "data", "/", "checkpoint-step-1/..", "../checkpoint-step-1", ".tmp-checkpoint-step-1-ab"]
)
def test_delete_refuses_non_checkpoint_names(tmp_path, name):
    commit_ckpt(tmp_path, "checkpoint-step-1")
    (tmp_path / "data").mkdir()
    with pytest.raises(UnsafeCheckpoint, match="refusing to delete"):
        local.delete(tmp_path, name)
    assert visible(tmp_path) == ["checkpoint-step-1", "data"]


def test_delete_removes_a_checkpoint_and_ignores_a_missing_one(tmp_path):
    commit_ckpt(tmp_path, "checkpoint-step-1")
    commit_ckpt(tmp_path, "checkpoint-step-2")
    local.delete(tmp_path, "checkpoint-step-1")
    local.delete(tmp_path, "checkpoint-step-99")
    assert visible(tmp_path) == ["checkpoint-step-2"]


# ---- foreign folders ---------------------------------------------------------------------------------------------


def test_manifest_for_folder_hashes_the_folder_and_writes_the_manifest(tmp_path):
    folder = tmp_path / "checkpoint-500"
    (folder / "nested").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "trainer_state.json").write_text('{"global_step": 500}')
    (folder / "nested" / "rng_state.bin").write_bytes(b"\x01" * 100)
    (folder / "empty.txt").write_bytes(b"")
    m = local.manifest_for_folder(folder, epoch=2, metrics={"loss": 0.5})
    assert (m.name, m.kind, m.global_step, m.epoch, m.batch_idx) == ("checkpoint-500", "step", 500, 2, -1)
    assert [(f.path, f.size) for f in m.files] == [
        ("empty.txt", 0),
        ("model.safetensors", 7),
        ("nested/rng_state.bin", 100),
        ("trainer_state.json", 20),
    ]
    assert m.file("model.safetensors").sha256 == sha256_hex(b"weights")
    assert Manifest.from_bytes((folder / "manifest.json").read_bytes()) == m
    assert local.verify(folder)[0] == m
    assert [c.name for c in local.list_checkpoints(tmp_path)] == ["checkpoint-500"]
    # running it again does not list the manifest as one of the files
    again = local.manifest_for_folder(folder, epoch=2, metrics={"loss": 0.5})
    assert [f.path for f in again.files] == [f.path for f in m.files]


def test_manifest_for_folder_refuses_a_non_checkpoint_name(tmp_path):
    (tmp_path / "my-run").mkdir()
    with pytest.raises(ValueError, match="my-run"):
        local.manifest_for_folder(tmp_path / "my-run")
    assert not (tmp_path / "my-run" / "manifest.json").exists()


def test_a_folder_without_its_manifest_is_warned_about_once_not_at_every_save(tmp_path: Path, caplog) -> None:
    """Every save scans the folder (retention); a stray checkpoint-named folder used to log its warning each time:
    37 lines in a 300-step run."""
    import torch

    from syncckpt import CheckpointManager

    (tmp_path / "checkpoint-step-200").mkdir()
    (tmp_path / "checkpoint-step-200" / "model.safetensors").write_bytes(b"x")
    model = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="syncckpt"):
        with CheckpointManager(tmp_path, save_every_n_steps=1, keep_last=1, handle_sigterm=False) as mgr:
            mgr.register(model=model)
            for step in range(1, 6):
                mgr.step(step, epoch=0, batch_idx=step - 1)
                assert mgr.wait()
    ignoring = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Ignoring ")]
    assert len(ignoring) == 1 and "checkpoint-step-200" in ignoring[0] and "manifest.json: missing" in ignoring[0]


def test_write_file_hashes_large_chunks_beside_the_write_and_a_reused_buffer_still_hashes_right(tmp_path: Path):
    """Chunks of a MiB or more are hashed on a helper thread while they are written: the digest is the file's,
    also when the caller refills one buffer for every chunk, and no helper thread outlives the file."""
    import hashlib
    import random
    import threading

    data = random.Random(1).randbytes(5 << 20)
    buf = bytearray(1 << 20)

    def refilled():  # one buffer, refilled after each chunk is handed over
        for start in range(0, len(data), len(buf)):
            buf[:] = data[start : start + len(buf)]
            yield memoryview(buf)
        yield b"tail"

    entry = local.write_file(tmp_path, "f.bin", refilled())
    assert entry.size == len(data) + 4
    assert entry.sha256 == hashlib.sha256(data + b"tail").hexdigest() == sha256_hex((tmp_path / "f.bin").read_bytes())
    assert not [t for t in threading.enumerate() if t.name.startswith("syncckpt-hash")]


def test_a_chunk_that_fails_to_write_stops_the_hash_thread_and_raises(tmp_path: Path):
    import threading

    def chunks():
        yield bytes(2 << 20)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        local.write_file(tmp_path, "f.bin", chunks())
    assert not [t for t in threading.enumerate() if t.name.startswith("syncckpt-hash")]
