"""Which local folders may be a mirror on Kaggle and Colab, and what the log says about a local-folder mirror
(issue 18: a remote without a scheme, a folder that dies with the session, a read-only Kaggle Dataset).

The platform is faked the way syncckpt detects it (syncckpt.env.detect_platform): an environment variable, with
``/kaggle/working`` pointed at a folder that does not exist so the machine running the tests is neither.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from syncckpt import CheckpointManager, env
from syncckpt.env import mirror_problem
from syncckpt.errors import ConfigError


@pytest.fixture
def platform(monkeypatch):
    """Make this process look like ``"kaggle"``, ``"colab"`` or neither (None)."""
    monkeypatch.setattr(env, "KAGGLE_WORKING", Path("/nonexistent-kaggle/working"))
    monkeypatch.setattr(env, "_colab_importable", lambda: False)

    def be(name: str | None) -> None:
        for var in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG"):
            monkeypatch.delenv(var, raising=False)
        if name == "kaggle":
            monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
        elif name == "colab":
            monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20250101")
        assert env.detect_platform() == name

    return be


def test_a_kaggle_working_mirror_is_refused_with_advice_that_can_work():
    problem = mirror_problem("/kaggle/working/mirror", "kaggle", "/kaggle/working")
    assert problem.startswith("remote '/kaggle/working/mirror' is under /kaggle/working, which is deleted")
    assert "use a bucket (s3://, gs://) or the Hub (hf://)" in problem
    # an attached Dataset is read-only: named as a place to resume from, never as a mirror to write to
    assert "Kaggle Dataset is read-only" in problem and "never a mirror" in problem
    assert "or an attached Kaggle Dataset" not in problem


def test_colab_refuses_a_mirror_under_content_outside_the_mounted_drive(tmp_path, platform):
    platform("colab")
    for url in ("/content/mirror", "file:///content/runs/nli-1"):
        with pytest.raises(ConfigError) as err:
            CheckpointManager(tmp_path / "ck", remote=url, deadline="off", handle_sigterm=False)
        message = str(err.value)
        assert f"remote {url!r} is under /content but not in the mounted Drive (/content/drive)" in message
        assert "deleted with the Colab session" in message and "use a Drive folder, a bucket or the Hub" in message
    assert not Path("/content/mirror").exists() and not Path("/content/runs").exists()
    # the mounted Drive is a mirror on Colab; the same folder is not refused elsewhere (it outlives nothing there,
    # but nothing says it dies either)
    assert mirror_problem("/content/drive/MyDrive/runs/nli-1", "colab", "/content") is None
    assert mirror_problem("/content/mirror", None, "/content") is None


@pytest.mark.parametrize("as_url", [False, True])
def test_an_absolute_local_mirror_is_named_in_the_log(tmp_path, platform, caplog, as_url):
    platform(None)
    folder = tmp_path / "mirror" / "run"
    remote = folder.as_uri() if as_url else str(folder)
    caplog.set_level(logging.INFO, logger="syncckpt")
    with CheckpointManager(tmp_path / "ck", remote=remote, deadline="off", handle_sigterm=False) as mgr:
        mgr.register(model=torch.nn.Linear(2, 2))
        mgr.save(1)
        assert mgr.wait(30)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Mirroring to the local folder")]
    assert said == [f"Mirroring to the local folder {folder}"], said
    assert (folder / "checkpoint-step-1" / "manifest.json").is_file()  # that folder is where the mirror went


def _fs_type(path: Path) -> str:
    """The type of the file system ``path`` is on (the longest mount point above it in /proc/self/mounts)."""
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype, *_ = line.split()
        if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, fstype
    return kind


def _storage_reads() -> int:
    """Bytes this process made the kernel fetch from storage (not from the page cache): /proc/self/io."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


def test_a_local_mirror_is_read_back_from_the_file_system_not_from_the_page_cache(tmp_path):
    """A Drive mount acknowledges writes it does not hold yet; a read-back served by the page cache the copy just
    filled would prove nothing. The cached pages are dropped first, so the read reaches the file system: here a
    disk, where /proc/self/io counts what came from storage."""
    import os

    from syncckpt.local import hash_file, write_file
    from syncckpt.manifest import Manifest
    from syncckpt.remote.localfs import read_back

    if _fs_type(tmp_path) in ("tmpfs", "ramfs") or not Path("/proc/self/io").exists():
        pytest.skip(f"{tmp_path} is kept in memory: no storage read to observe")
    entry = write_file(tmp_path, "model.safetensors", [os.urandom(8 << 20)])  # written and fsynced
    before = _storage_reads()
    hash_file(tmp_path, entry.path)
    cached = _storage_reads() - before
    read_back(str(tmp_path), Manifest("checkpoint-step-1", "step", 1, 0, 0, files=[entry]), "mirror")
    from_storage = _storage_reads() - before - cached
    assert from_storage >= entry.size, (
        f"read_back fetched {from_storage} bytes from storage (a plain read before it: {cached}), the file has "
        f"{entry.size}"
    )
