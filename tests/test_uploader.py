"""The uploader: one background thread mirroring committed checkpoints, its coalescing queue, wait()/status(),
retries through an outage, close() with uploads left, and mirroring a resumed-from checkpoint the remote lacks.

Outages are real: S3 (moto) behind the fault proxy, which resets every connection while ``down()``. Backend
retries are cut to one attempt so a failed upload is reported at once; the uploader's own pause between
retries (about a second) is what those tests wait for. Synchronisation is on ``wait()``, never on sleeps.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from faultproxy import FaultProxy

from syncckpt import local, quarantine
from syncckpt.errors import LeaseHeld, RemoteError
from syncckpt.manifest import Manifest, parse_checkpoint_name, sha256_hex
from syncckpt.pull import pull
from syncckpt.remote import open_remote
from syncckpt.remote.retry import RetryPolicy
from syncckpt.retention import plan_deletions
from syncckpt.uploader import Uploader

SECRET = "SECRET-DO-NOT-LOG"
ONE_TRY = {"retry": RetryPolicy(attempts=1)}  # a failed request fails the upload at once


def payload(name: str, salt: str = "") -> dict[str, bytes]:
    rng = random.Random(name + salt)
    return {"model.safetensors": rng.randbytes(30_000), "state.json": b'{"salt": "%s"}' % salt.encode()}


def commit_local(directory: Path, name: str, files: dict[str, bytes] | None = None, step: int = 100) -> Manifest:
    """A committed local checkpoint; a step checkpoint's global step is in its name, others take ``step``."""
    kind, number = parse_checkpoint_name(name)
    step = number if kind == "step" else step
    files = files if files is not None else payload(name)

    def write(tmp: Path) -> list[local.FileEntry]:
        return [local.write_file(tmp, rel, [data]) for rel, data in files.items()]

    return local.commit(directory, Manifest(name, kind, step, 0, -1, files=[]), write)


def remote_files(url: str, options: dict[str, Any] | None, name: str, tmp_path: Path) -> dict[str, bytes]:
    """The files of ``name`` as the store holds them, pulled and verified (a large tensor file comes back mapped)."""
    r = open_remote(url, options)
    try:
        files = pull(r, name, tmp_path / f"pulled-{uuid.uuid4().hex[:6]}", progress=False)[1]
        return {rel: bytes(data) for rel, data in files.items()}
    finally:
        r.close()


def remote_names(url: str, options: dict[str, Any] | None = None) -> list[str]:
    r = open_remote(url, options)
    try:
        return sorted(r.list_checkpoints())
    finally:
        r.close()


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= level)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return (tmp_path / "bucket" / "run").as_uri()


@pytest.fixture
def s3(fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str):
    """(url, storage_options, proxy): S3 through the fault proxy, which injects nothing until told to."""
    return s3_remote_url, fault_s3_storage_options, fault_proxy


# ---- mirroring -------------------------------------------------------------------------------------------------
def test_a_submitted_checkpoint_is_mirrored_with_latest_and_its_staging_copy_removed(url: str, tmp_path: Path):
    d = tmp_path / "ck"
    m = commit_local(d, "checkpoint-step-10")
    u = Uploader(url)
    try:
        idle = {
            "remote": u.url,
            "mirrored": [],
            "pending": [],
            "uploading": None,
            "skipped": [],
            "upload_failures": 0,
            "last_upload_error": None,
            "mirroring_stopped": None,
        }
        assert {k: u.status()[k] for k in idle} == idle
        u.submit(d, m)
        assert u.wait(30)
        st = u.status()
        assert st["mirrored"] == ["checkpoint-step-10"] and st["pending"] == [] and st["uploading"] is None
        assert u.bytes_uploaded >= m.total_size
    finally:
        u.close()
    r = open_remote(url)
    assert r.list_checkpoints() == ["checkpoint-step-10"]
    stored, stored_bytes = r.read_manifest("checkpoint-step-10")
    assert stored_bytes == (d / "checkpoint-step-10" / "manifest.json").read_bytes()
    latest = r.read_latest()
    assert latest is not None and latest.name == "checkpoint-step-10"
    assert latest.manifest_sha256 == sha256_hex(stored_bytes)
    assert remote_files(url, None, "checkpoint-step-10", tmp_path) == payload("checkpoint-step-10")
    assert hidden(d) == []  # the .upload-* staging copy is gone
    local.verify(d / "checkpoint-step-10")  # the local checkpoint is untouched


def test_close_releases_the_lease_and_a_second_uploader_meanwhile_is_refused(url: str):
    first = Uploader(url)
    try:
        with pytest.raises(LeaseHeld, match="takeover=True"):
            Uploader(url)
    finally:
        first.close()
    Uploader(url).close()  # the lease was released


@pytest.mark.parametrize("store", ["file", "s3"])
def test_a_checkpoint_sent_early_then_superseded_before_its_upload_leaves_nothing_under_its_name(
    store: str, url: str, request: pytest.FixtureRequest, tmp_path: Path
):
    """Step 1's data went while it was written; step 2 was committed before the uploader's thread took step 1 up,
    so step 1 is skipped. Its folder goes from the store too: a folder store (a mounted Drive) keeps no
    checkpoint-step-1/ that holds nothing, an object store no objects under it."""
    options = None
    if store == "s3":
        url, options, _ = request.getfixturevalue("s3")
    d = tmp_path / "ck"
    d.mkdir()
    u = Uploader(url, options)
    try:
        put = u.begin_early(d, "checkpoint-step-1")
        assert put is not None
        m1 = commit_local(d, "checkpoint-step-1")
        for e in m1.files:
            put.send(d / m1.name, e)
        assert put.wait()
        r = open_remote(url, options)
        fs, folder = r._filesystem(), r._path("checkpoint-step-1")
        assert fs.exists(folder)  # its data is in the store, no manifest yet
        # Holding the uploader's condition keeps its thread from taking step 1 up until step 2 is queued (the
        # race CI hit, made certain): the thread waits on that condition, and submit() re-enters it.
        with u._cond:
            u.submit(d, m1)
            u.submit(d, commit_local(d, "checkpoint-step-2"))
        assert u.wait(60)
        assert u.status()["skipped"] == ["checkpoint-step-1"]
    finally:
        u.close()
    assert remote_names(url, options) == ["checkpoint-step-2"]
    fs.invalidate_cache()
    assert not fs.exists(folder), fs.find(folder)
    r.close()


def test_checkpoints_submitted_in_a_burst_all_reach_the_remote_or_are_skipped_as_superseded(url: str, tmp_path: Path):
    d = tmp_path / "ck"
    names = [
        "checkpoint-step-10",
        "checkpoint-step-20",
        "checkpoint-epoch-0",
        "checkpoint-step-30",
        "best_model",
        "checkpoint-step-40",
        "checkpoint-step-50",
    ]
    u = Uploader(url)
    try:
        for n in names:
            u.submit(d, commit_local(d, n))
        assert u.wait(60)
        st = u.status()
    finally:
        u.close()
    mirrored, skipped = st["mirrored"], st["skipped"]
    assert {"checkpoint-epoch-0", "best_model", "checkpoint-step-50"} <= set(mirrored)  # never skipped
    assert set(skipped) <= {"checkpoint-step-10", "checkpoint-step-20", "checkpoint-step-30", "checkpoint-step-40"}
    assert sorted(mirrored + skipped) == sorted(names)
    assert mirrored == [n for n in names if n in mirrored]  # in submission order
    assert remote_names(url) == sorted(mirrored)
    assert hidden(d) == []


def test_while_the_remote_is_down_newer_step_checkpoints_supersede_queued_ones_but_epoch_and_best_wait(s3, tmp_path):
    url, options, proxy = s3
    d = tmp_path / "ck"
    order = [
        "checkpoint-step-10",
        "checkpoint-step-20",
        "checkpoint-epoch-0",
        "best_model",
        "checkpoint-step-30",
        "best_model",
        "checkpoint-step-40",
    ]
    # Committed up front, so that each submit below follows the previous failure within milliseconds: the thread
    # then still waits out its pause (half a second at least) and every newer job finds the older one queued.
    manifests = {n: commit_local(d, n, payload(n)) for n in order if n != "best_model"}
    u = Uploader(url, options, remote_options=ONE_TRY, max_pause=1.0)
    try:
        proxy.down()
        bests = iter(["old", "new"])
        for name in order:
            # best_model again: a newer one replaces the local folder (the queued job keeps its hard links)
            m = manifests.get(name) or commit_local(d, name, payload(name, next(bests)))
            u.submit(d, m)
            # Each submit wakes the thread, which tries the head of the queue again and fails.
            assert u.wait(30, stop_on_failure=True) is False
        st = u.status()
        assert st["pending"] == ["checkpoint-epoch-0", "best_model", "checkpoint-step-40"]
        assert st["skipped"] == ["checkpoint-step-10", "checkpoint-step-20", "best_model", "checkpoint-step-30"]
        assert st["mirrored"] == [] and st["upload_failures"] >= len(order)
        proxy.up()
        assert u.wait(30)
        assert u.status()["mirrored"] == ["checkpoint-epoch-0", "best_model", "checkpoint-step-40"]
    finally:
        proxy.up()
        u.close()
    assert remote_names(url, options) == ["best_model", "checkpoint-epoch-0", "checkpoint-step-40"]
    assert remote_files(url, options, "best_model", tmp_path) == payload("best_model", "new")
    assert [p for p in hidden(d) if p.startswith(".upload-")] == []  # skipped jobs' staging copies removed too


def test_a_failing_remote_is_retried_and_mirroring_resumes_by_itself(s3, tmp_path, caplog):
    url, options, proxy = s3
    caplog.set_level(logging.INFO, logger="syncckpt")
    d = tmp_path / "ck"
    u = Uploader(url, options, remote_options=ONE_TRY, max_pause=1.0)
    try:
        proxy.down()
        u.submit(d, commit_local(d, "checkpoint-epoch-3"))
        assert u.wait(30, stop_on_failure=True) is False  # failed once, kept for a retry
        assert u.wait(0.2) is False  # still not mirrored: a timeout
        st = u.status()
        assert "checkpoint-epoch-3" in [*st["pending"], st["uploading"]]
        assert st["upload_failures"] >= 1 and st["mirrored"] == []
        assert st["last_upload_error"].startswith("checkpoint-epoch-3: ") and url in st["last_upload_error"]
        assert SECRET not in st["last_upload_error"]
        u.raise_if_failed()  # on_error="warn": nothing to raise
        # Local retention may delete the checkpoint meanwhile: the upload reads its hard-linked staging copy.
        local.delete(d, "checkpoint-epoch-3")
        proxy.up()
        assert u.wait(30)
        assert u.status()["mirrored"] == ["checkpoint-epoch-3"]
    finally:
        proxy.up()
        u.close()
    assert f"Upload of checkpoint-epoch-3 to {url} failed" in messages(caplog, logging.WARNING)
    assert "(training continues)" in messages(caplog, logging.WARNING)
    assert SECRET not in messages(caplog)
    assert remote_files(url, options, "checkpoint-epoch-3", tmp_path) == payload("checkpoint-epoch-3")
    assert hidden(d) == []


def test_with_on_error_raise_a_failed_upload_is_raised_once_by_raise_if_failed(s3, tmp_path):
    url, options, proxy = s3
    d = tmp_path / "ck"
    u = Uploader(url, options, remote_options=ONE_TRY, on_error="raise", max_pause=1.0)
    try:
        proxy.down()
        u.submit(d, commit_local(d, "checkpoint-step-10"))
        assert u.wait(30)  # returns so that the caller can raise_if_failed()
        with pytest.raises(RemoteError, match=f"upload to {url} failed") as excinfo:
            u.raise_if_failed()
        assert SECRET not in str(excinfo.value)
        u.raise_if_failed()  # reported once
    finally:
        proxy.up()
        u.close(timeout=0)


# ---- close -----------------------------------------------------------------------------------------------------
def test_close_with_an_unreachable_remote_leaves_the_upload_local_for_the_next_session(s3, tmp_path, caplog):
    url, options, proxy = s3
    caplog.set_level(logging.WARNING, logger="syncckpt")
    d = tmp_path / "ck"
    m = commit_local(d, "checkpoint-step-10")
    u = Uploader(url, options, remote_options=ONE_TRY, max_pause=1.0)
    try:
        proxy.down()
        u.submit(d, m)
        assert u.wait(30, stop_on_failure=True) is False
        t0 = time.monotonic()
        u.close(timeout=60)  # a dead remote must not hang the end of training: returns once the retry failed
        assert time.monotonic() - t0 < 30
    finally:
        proxy.up()
    warned = messages(caplog, logging.WARNING)
    assert f"Closing with uploads to {url} not finished: ['checkpoint-step-10']" in warned
    assert u.status()["pending"] == ["checkpoint-step-10"]
    assert remote_names(url, options) == []
    local.verify(d / "checkpoint-step-10")  # it stays in the local folder

    # The next session resumes from it. Its lease is still in the store (releasing it failed too); a new process
    # takes it over because this pid is gone, which this same process has to ask for with takeover=True.
    nxt = Uploader(url, options, takeover=True)
    try:
        nxt.ensure_mirrored(d, m)
        assert nxt.wait(30) and nxt.status()["mirrored"] == ["checkpoint-step-10"]
    finally:
        nxt.close()
    assert remote_files(url, options, "checkpoint-step-10", tmp_path) == payload("checkpoint-step-10")


def test_close_after_an_upload_failed_for_good_tries_the_lease_release_once_not_a_second_retry_run(
    s3, tmp_path, caplog
):
    """close() at the end of a notebook while offline: it used to wait out the upload's retries and then the
    lease release's own, as long again. Once an upload failed for good the store is taken as gone: the release is
    tried once and the lease left to its TTL."""
    url, options, proxy = s3
    caplog.set_level(logging.WARNING, logger="syncckpt")
    d = tmp_path / "ck"
    m = commit_local(d, "checkpoint-step-10")
    u = Uploader(url, options, remote_options={"retry": RetryPolicy(attempts=3, initial_wait=0.2)}, max_pause=1.0)
    try:
        proxy.down()
        u.submit(d, m)
        u.close()
    finally:
        proxy.up()
    lines = [r.getMessage() for r in caplog.records]
    failed = next(i for i, line in enumerate(lines) if "Upload of checkpoint-step-10" in line and "failed" in line)
    after = lines[failed + 1 :]
    assert not [line for line in after if "transient failure" in line], after  # no retry once it failed for good
    assert any("Could not release the lease" in line for line in after), after


def test_close_flushes_what_is_queued_when_the_remote_works(url: str, tmp_path: Path):
    d = tmp_path / "ck"
    u = Uploader(url)
    for n in ("checkpoint-epoch-0", "checkpoint-epoch-1", "best_model"):
        u.submit(d, commit_local(d, n))
    u.close()
    assert u.status()["pending"] == [] and u.status()["uploading"] is None
    assert remote_names(url) == ["best_model", "checkpoint-epoch-0", "checkpoint-epoch-1"]


# ---- ensure_mirrored -------------------------------------------------------------------------------------------
def test_ensure_mirrored_skips_a_checkpoint_the_remote_holds_identically(url: str, tmp_path: Path, caplog):
    d = tmp_path / "ck"
    m = commit_local(d, "checkpoint-step-10")
    first = Uploader(url)
    first.submit(d, m)
    assert first.wait(30)
    first.close()
    caplog.set_level(logging.INFO, logger="syncckpt")
    u = Uploader(url)
    try:
        u.ensure_mirrored(d, m)
        assert u.wait(30)
        st = u.status()
        assert st["mirrored"] == [] and st["pending"] == [] and st["skipped"] == []
    finally:
        u.close()
    assert "is not on" not in messages(caplog)


@pytest.mark.parametrize("remote_state", ["absent", "other-content", "damaged-manifest", "quarantined"])
def test_ensure_mirrored_uploads_what_the_remote_lacks_or_holds_differently(
    url: str, tmp_path: Path, caplog, remote_state: str
):
    d = tmp_path / "ck"
    r = open_remote(url)
    if remote_state != "absent":
        other = tmp_path / "other"
        om = commit_local(other, "checkpoint-step-10", payload("checkpoint-step-10", "elsewhere"))
        r.commit_checkpoint(om.name, other / om.name, om, om.to_bytes(), None)
        if remote_state == "damaged-manifest":
            r.write_bytes("checkpoint-step-10/manifest.json", b"{damaged")
    m = commit_local(d, "checkpoint-step-10")
    if remote_state == "quarantined":  # the remote copy matches, but resume found it damaged earlier
        m2 = commit_local(tmp_path / "same", "checkpoint-step-10")
        r.commit_checkpoint(m2.name, tmp_path / "same" / m2.name, m2, m2.to_bytes(), None)
        quarantine.quarantine_remote(r, m.name, sha256_hex(r.read_manifest(m.name)[1]), "SHA-256 mismatch")
    caplog.set_level(logging.INFO, logger="syncckpt")
    u = Uploader(url)
    try:
        u.ensure_mirrored(d, m)
        assert u.wait(30)
        assert u.status()["mirrored"] == ["checkpoint-step-10"]
    finally:
        u.close()
    assert f"Checkpoint checkpoint-step-10 is not on {u.url} yet; mirroring it" in messages(caplog)
    assert remote_files(url, None, "checkpoint-step-10", tmp_path) == payload("checkpoint-step-10")
    if remote_state == "quarantined":
        assert "checkpoint-step-10" not in quarantine.read_index(r)  # a verified copy replaced it


# ---- takeover, remote retention, incremental --------------------------------------------------------------------
def test_after_a_takeover_the_old_session_stops_mirroring_and_keeps_its_checkpoints_local(url: str, tmp_path: Path):
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old = Uploader(url)
    new = Uploader(url, takeover=True)
    try:
        new.submit(new_dir, commit_local(new_dir, "checkpoint-step-20"))
        assert new.wait(30)
        old.submit(old_dir, commit_local(old_dir, "checkpoint-step-30"))
        assert old.wait(30)
        st = old.status()
        assert st["mirroring_stopped"] and "took over" in st["mirroring_stopped"]
        assert st["mirrored"] == [] and st["pending"] == []
        old.submit(old_dir, commit_local(old_dir, "checkpoint-step-40"))  # refused at once from now on
        assert old.status()["pending"] == []
    finally:
        old.close()
        new.close()
    assert remote_names(url) == ["checkpoint-step-20"]
    assert open_remote(url).read_latest().name == "checkpoint-step-20"
    assert [c.name for c in local.list_checkpoints(old_dir)] == ["checkpoint-step-30", "checkpoint-step-40"]


def test_remote_retention_deletes_old_checkpoints_after_the_new_one_is_committed(url: str, tmp_path: Path):
    d = tmp_path / "ck"
    keep_one = lambda refs: plan_deletions(refs, keep_last=1, keep_epochs=1)  # noqa: E731
    u = Uploader(url, retention=keep_one)
    try:
        for n in ("checkpoint-step-10", "checkpoint-epoch-0", "checkpoint-step-20", "checkpoint-step-30"):
            u.submit(d, commit_local(d, n, step=15))
            assert u.wait(30)
    finally:
        u.close()
    assert remote_names(url) == ["checkpoint-epoch-0", "checkpoint-step-30"]
    assert open_remote(url).read_latest().name == "checkpoint-step-30"


def test_remote_retention_leaves_quarantined_checkpoints_alone_and_gives_them_no_slot(url: str, tmp_path: Path):
    d = tmp_path / "ck"
    r = open_remote(url)
    keep_one = lambda refs: plan_deletions(refs, keep_last=1, keep_epochs=0)  # noqa: E731
    u = Uploader(url, retention=keep_one)
    try:
        u.submit(d, commit_local(d, "checkpoint-step-10"))
        assert u.wait(30)
        quarantine.quarantine_remote(
            r,
            "checkpoint-step-10",
            sha256_hex(r.read_manifest("checkpoint-step-10")[1]),
            "model.safetensors: SHA-256 mismatch",
        )
        for n in ("checkpoint-step-20", "checkpoint-step-30"):
            u.submit(d, commit_local(d, n))
            assert u.wait(30)
    finally:
        u.close()
    assert remote_names(url) == ["checkpoint-step-10", "checkpoint-step-30"]  # step-20 made room for step-30


def model_bytes(head: float) -> bytes:
    torch.manual_seed(0)
    return safetensors.torch.save({"backbone": torch.randn(400_000), "head": torch.full((64,), head)})


def test_incremental_mirroring_sends_only_the_parts_that_changed_and_collects_unused_ones(url: str, tmp_path: Path):
    d = tmp_path / "ck"
    keep_one = lambda refs: plan_deletions(refs, keep_last=1, keep_epochs=0)  # noqa: E731
    u = Uploader(url, incremental=True, retention=keep_one)
    try:
        u.submit(d, commit_local(d, "checkpoint-step-10", {"model.safetensors": model_bytes(0.0)}))
        assert u.wait(30)
        first = u.bytes_uploaded
        assert first > 1_600_000
        u.submit(d, commit_local(d, "checkpoint-step-20", {"model.safetensors": model_bytes(1.0)}))  # head trained
        assert u.wait(30)
        assert u.bytes_uploaded - first < 20_000  # the 1.6 MB backbone did not travel again
    finally:
        u.close()
    r = open_remote(url)
    assert r.list_checkpoints() == ["checkpoint-step-20"]
    stored, _ = r.read_manifest("checkpoint-step-20")
    referenced = {digest for e in stored.files for _, digest in e.parts}
    assert set(r.list_blobs()) == referenced  # step-10's old head part was deleted with it
    assert remote_files(url, None, "checkpoint-step-20", tmp_path) == {"model.safetensors": model_bytes(1.0)}


def test_a_failed_upload_superseded_while_in_flight_is_reported_as_skipped(s3, tmp_path, caplog):
    url, options, proxy = s3
    d = tmp_path / "ck"
    first, second = commit_local(d, "checkpoint-step-10"), commit_local(d, "checkpoint-step-20")
    u = Uploader(url, options, remote_options=ONE_TRY, max_pause=1.0)
    try:
        # The next request (checkpoint-step-10's first) hangs past the client's read timeout, long enough for the
        # newer checkpoint to be queued behind it; the client's own retries of it are reset, so the upload fails.
        proxy.inject("stall", *["reset"] * 12)
        u.submit(d, first)
        deadline = time.monotonic() + 30
        while u.status()["uploading"] != "checkpoint-step-10":
            assert time.monotonic() < deadline, u.status()
            time.sleep(0.01)
        u.submit(d, second)
        assert u.wait(60)
        st = u.status()
    finally:
        u.close()
    assert st["mirrored"] == ["checkpoint-step-20"] and st["skipped"] == ["checkpoint-step-10"], st
    assert "not retried: superseded by checkpoint-step-20" in messages(caplog, logging.WARNING)


def test_a_drive_like_mirror_is_not_reported_mirrored_before_its_files_read_back(tmp_path: Path, monkeypatch):
    """A mounted Drive acknowledges a write before it holds the bytes (colabtools #2869). The Drive FUSE mount
    cannot run here, so the copy is replaced by one whose writes land late: until the test lets them through,
    the file the mount shows holds zeros of the right size (the size check alone passes)."""
    import threading

    from syncckpt.remote import localfs

    landed = threading.Event()
    real_copy = localfs.copy_durable

    def lagging_copy(src: Path, dst: str, counter: Any) -> None:
        real_copy(src, dst, counter)
        if not landed.is_set():
            with open(dst, "r+b") as f:
                f.write(b"\0" * Path(dst).stat().st_size)

    monkeypatch.setattr(localfs, "copy_durable", lagging_copy)
    d, drive = tmp_path / "ck", tmp_path / "drive" / "MyDrive" / "run"
    m = commit_local(d, "checkpoint-step-10")
    u = Uploader(str(drive))
    try:
        u.submit(d, m)
        assert not u.wait(30, stop_on_failure=True)  # the read-back failed: not mirrored
        st = u.status()
        assert st["mirrored"] == [] and st["upload_failures"] >= 1, st
        assert "read back after the copy" in st["last_upload_error"] and "SHA-256 mismatch" in st["last_upload_error"]
        assert not (drive / "checkpoint-step-10" / "manifest.json").exists()  # nothing vouches for the zeros
        landed.set()  # the mount catches up; the uploader's retry copies again and the read-back passes
        assert u.wait(30)
        assert u.status()["mirrored"] == ["checkpoint-step-10"]
        assert local.verify(drive / "checkpoint-step-10")[0].name == "checkpoint-step-10"
    finally:
        u.close()
