"""KeptFile: a download written to disk with O_DIRECT from anonymous memory the caller keeps and loads, and
pull's choice between that and reading the file back."""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest
import torch

from syncckpt import CheckpointManager, _memory, local, pull
from syncckpt.errors import CheckpointCorrupt

SIZES = [0, 1, 4095, 4096, 4097, (8 << 20) + 3, (16 << 20) + 4096]


def fill(f: local.KeptFile, data: bytes, piece: int) -> None:
    for i in range(0, len(data), piece):
        f.write(memoryview(data)[i : i + piece])


@pytest.mark.parametrize("size", SIZES)
def test_the_file_and_the_kept_buffer_hold_exactly_the_bytes_written(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    f = local.KeptFile(tmp_path / "f.bin", size)
    fill(f, data, 1_000_003)  # pieces that never line up with a block
    buf = f.close()
    assert len(buf) == size and bytes(buf) == data
    assert os.path.getsize(tmp_path / "f.bin") == size
    assert (tmp_path / "f.bin").read_bytes() == data


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm (no O_DIRECT there)")
def test_a_file_system_without_o_direct_gets_the_same_bytes_through_the_page_cache() -> None:
    data = random.Random(7).randbytes((8 << 20) + 10)
    path = Path("/dev/shm") / f"syncckpt-kept-{os.getpid()}.bin"
    try:
        f = local.KeptFile(path, len(data))
        fill(f, data, 3 << 20)
        assert bytes(f.close()) == data and path.read_bytes() == data
    finally:
        path.unlink(missing_ok=True)


def test_more_bytes_than_announced_are_refused(tmp_path: Path) -> None:
    f = local.KeptFile(tmp_path / "f.bin", 10)
    f.write(b"x" * 10)
    with pytest.raises(CheckpointCorrupt, match="more than the manifest's 10 bytes"):
        f.write(b"y")
    f.abort()


def resume_from_store(tmp_path: Path) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Save a 2 MB model to a file:// store, then resume it in a fresh folder; returns both and what pull gave."""
    store = (tmp_path / "bucket" / "run").as_uri()
    model = torch.nn.Linear(700, 700)
    mgr = CheckpointManager(tmp_path / "a", save_every_n_steps=1, remote=store, handle_sigterm=False)
    mgr.register(model=model)
    assert mgr.step(1, epoch=0, batch_idx=1)
    assert mgr.wait()
    mgr.close()
    seen: dict = {}
    real_pull = pull.pull

    def spy(*args, **kwargs):
        out = real_pull(*args, **kwargs)
        seen.update(out[1])
        return out

    real_read = local.read_file

    def read_spy(path):
        seen.setdefault("read back", []).append(Path(path).name)
        return real_read(path)

    pull.pull, local.read_file = spy, read_spy
    try:
        restored = torch.nn.Linear(700, 700)
        fresh = CheckpointManager(tmp_path / "b", save_every_n_steps=None, remote=store, handle_sigterm=False)
        fresh.register(model=restored)
        assert fresh.resume().global_step == 1
        fresh.close()
    finally:
        pull.pull, local.read_file = real_pull, real_read
    return model, restored, seen


def test_a_resume_from_the_store_loads_the_kept_download_and_leaves_a_verified_copy(tmp_path: Path) -> None:
    model, restored, files = resume_from_store(tmp_path)
    assert torch.equal(model.weight, restored.weight)
    assert isinstance(files["model.safetensors"], mmap.mmap)  # the kept buffer, not a mapping of the file
    assert isinstance(files["state.json"], bytearray)
    assert "read back" not in files, files.get("read back")
    local.verify(tmp_path / "b" / "checkpoint-step-1")  # the local copy written with O_DIRECT verifies


def test_with_too_little_memory_the_download_is_read_back_from_the_file(tmp_path: Path, monkeypatch) -> None:
    # Memory pressure cannot be arranged here: the kernel's estimate is replaced (only the estimate).
    monkeypatch.setattr(pull, "available_memory", lambda: 1 << 20)
    model, restored, files = resume_from_store(tmp_path)
    assert torch.equal(model.weight, restored.weight)
    assert "model.safetensors" in files["read back"]
    assert _memory.holds_in_memory(2_000_000, 1 << 20) is False
    local.verify(tmp_path / "b" / "checkpoint-step-1")
