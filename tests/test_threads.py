"""Background threads run at a lower CPU priority than the training loop (Linux: per-thread nice values)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from syncckpt import CheckpointManager
from syncckpt._threads import lower_priority
from syncckpt.remote.fsspec import FsspecRemote

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def thread_nice(native_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, native_id)


def _nice_of(name_prefix: str) -> set[int]:
    return {thread_nice(t.native_id) for t in threading.enumerate() if t.name.startswith(name_prefix) and t.native_id}


def _save_and_observe(tmp_path, monkeypatch, **kwargs) -> tuple[set[int], set[int], set[int], int]:
    """Save one mirrored checkpoint; return the nice values of the writer and uploader threads, of the threads
    that uploaded each file, and of the training thread."""
    upload_nice: set[int] = set()
    real_upload = FsspecRemote._upload

    def observed_upload(self, *args, **kw):
        upload_nice.add(thread_nice(threading.get_native_id()))
        return real_upload(self, *args, **kw)

    monkeypatch.setattr(FsspecRemote, "_upload", observed_upload)
    model = torch.nn.Linear(8, 4)
    with CheckpointManager(
        tmp_path / "ckpt", remote=(tmp_path / "mirror").as_uri(), handle_sigterm=False, **kwargs
    ) as mgr:
        mgr.register(model=model)
        mgr.save(1, epoch=0, batch_idx=0)
        assert mgr.wait()
        assert mgr.status()["mirrored"] == ["checkpoint-step-1"]
        writer, uploader = _nice_of("syncckpt-writer"), _nice_of("syncckpt-uploader")
    return writer, uploader, upload_nice, thread_nice(threading.get_native_id())


def test_writer_uploader_and_transfer_threads_run_at_nice_19_by_default(tmp_path, monkeypatch):
    before = thread_nice(threading.get_native_id())
    writer, uploader, transfers, training = _save_and_observe(tmp_path, monkeypatch)
    assert writer == {19} and uploader == {19}
    assert transfers == {19}  # the pools the uploader starts inherit its priority
    assert training == before  # the training thread keeps its own


def test_background_nice_zero_leaves_the_priority_alone(tmp_path, monkeypatch):
    before = thread_nice(threading.get_native_id())
    writer, uploader, transfers, _ = _save_and_observe(tmp_path, monkeypatch, background_nice=0)
    assert writer == uploader == transfers == {before}


def test_lower_priority_never_raises_a_threads_priority():
    seen: list[int] = []

    def run():
        lower_priority(10)
        lower_priority(5)  # already lower than 5: unchanged
        seen.append(thread_nice(threading.get_native_id()))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [max(10, thread_nice(threading.get_native_id()))]


def test_background_nice_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="background_nice"):
        CheckpointManager(tmp_path, background_nice=20, handle_sigterm=False)
