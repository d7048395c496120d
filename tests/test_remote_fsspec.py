"""FsspecRemote against memory://, local folders, S3 (moto through s3fs) and GCS (fake-gcs-server through gcsfs).

The servers are real processes/threads on 127.0.0.1 started by conftest fixtures; S3 faults come from a
FaultProxy between s3fs and moto.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy

from syncckpt.errors import CheckpointCorrupt, RemoteError, UnsafeCheckpoint
from syncckpt.manifest import FileEntry, Latest, Manifest, sha256_hex
from syncckpt.remote import open_remote
from syncckpt.remote.fsspec import FsspecRemote, safe_url
from syncckpt.remote.retry import RetryPolicy, is_transient

SECRET = "SECRET-DO-NOT-LOG"
# Quick retries: the stores here answer in milliseconds, and outage tests must not wait for minutes.
QUICK = RetryPolicy(attempts=3, initial_wait=0.01, max_wait=0.05, max_total=30)


# ---- fixtures and helpers -------------------------------------------------------------------------------------
@pytest.fixture(params=["memory", "file", "s3", "gcs"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    kind = request.param
    if kind == "memory":
        return f"memory://syncckpt-test-{uuid.uuid4().hex[:12]}/run", {}
    if kind == "file":
        return f"file://{tmp_path}/remote/run", {}
    if kind == "s3":
        return request.getfixturevalue("s3_remote_url"), request.getfixturevalue("s3_storage_options")
    return request.getfixturevalue("gcs_remote_url"), request.getfixturevalue("gcs_storage_options")


@pytest.fixture
def remote(target: tuple[str, dict[str, Any]]) -> FsspecRemote:
    url, options = target
    r = FsspecRemote(url, storage_options=options, retry=QUICK)
    yield r
    r.close()


def make_checkpoint(root: Path, name: str, step: int, *, model_size: int = 50_000) -> tuple[Path, Manifest, bytes]:
    """A small fake checkpoint folder and its manifest (nested path included)."""
    rng = random.Random(f"{name}-{step}-{model_size}")
    files = {
        "model.safetensors": rng.randbytes(model_size),
        "trainer_state.json": json.dumps({"global_step": step}).encode(),
        "rng/rank0.json": json.dumps({"seed": rng.random()}).encode(),
    }
    folder = root / f"local-{name}-{step}-{uuid.uuid4().hex[:6]}"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    kind = "best" if name == "best_model" else "step"
    entries = [FileEntry(rel, len(data), sha256_hex(data)) for rel, data in files.items()]
    manifest = Manifest(name=name, kind=kind, global_step=step, epoch=0, batch_idx=step - 1, files=entries)
    return folder, manifest, manifest.to_bytes()


def commit(remote: FsspecRemote, folder: Path, m: Manifest, mb: bytes, **kwargs: Any) -> None:
    remote.commit_checkpoint(m.name, folder, m, mb, Latest(m.name, m.global_step, sha256_hex(mb)), **kwargs)


def step_checkpoint(root: Path, step: int, **kwargs: Any) -> tuple[Path, Manifest, bytes]:
    return make_checkpoint(root, f"checkpoint-step-{step}", step, **kwargs)


def assert_same_files(a: Path, b: Path, m: Manifest) -> None:
    for entry in m.files:
        assert (a / entry.path).read_bytes() == (b / entry.path).read_bytes(), entry.path


# ---- the round trip, on every backend ----------------------------------------------------------------------
def test_commit_list_read_download(remote: FsspecRemote, target: tuple[str, dict[str, Any]], tmp_path: Path):
    url, options = target
    other = FsspecRemote(url, storage_options=options, retry=QUICK)  # another process looking at the same run
    assert other.list_checkpoints() == [] and other.read_latest() is None

    folder, m, mb = step_checkpoint(tmp_path, 10)
    sent: list[int] = []
    commit(remote, folder, m, mb, progress=sent.append)
    assert sum(sent) == m.total_size and all(n > 0 for n in sent)

    assert other.list_checkpoints() == ["checkpoint-step-10"]  # no stale listing cache
    got, raw = other.read_manifest("checkpoint-step-10")
    assert raw == mb and got.files == m.files
    latest = other.read_latest()
    assert latest is not None and latest.name == m.name and latest.manifest_sha256 == sha256_hex(mb)

    dest = tmp_path / "downloaded"
    received: list[int] = []
    other.download_checkpoint(m.name, got, dest, progress=received.append)
    assert sum(received) == m.total_size
    assert_same_files(folder, dest, m)


def test_commit_deletes_old_checkpoints_manifest_first(remote: FsspecRemote, tmp_path: Path):
    for step in (10, 20):
        commit(remote, *step_checkpoint(tmp_path, step))
    folder, m, mb = step_checkpoint(tmp_path, 30)
    commit(remote, folder, m, mb, delete=["checkpoint-step-10", "checkpoint-step-20"])
    assert remote.list_checkpoints() == ["checkpoint-step-30"]
    assert remote.read_latest().name == "checkpoint-step-30"
    with pytest.raises(FileNotFoundError):
        remote.stat("checkpoint-step-10/model.safetensors")


def test_recommit_same_name_replaces_it(remote: FsspecRemote, tmp_path: Path):
    first = make_checkpoint(tmp_path, "best_model", 10)
    commit(remote, *first)
    remote.write_bytes("best_model/stale.bin", b"left over from an older save")
    folder, m, mb = make_checkpoint(tmp_path, "best_model", 20, model_size=30_000)
    commit(remote, folder, m, mb)
    got, _ = remote.read_manifest("best_model")
    assert got.global_step == 20
    with pytest.raises(FileNotFoundError):
        remote.stat("best_model/stale.bin")
    remote.download_checkpoint("best_model", got, tmp_path / "dl")
    assert_same_files(folder, tmp_path / "dl", m)


def test_delete_checkpoint(remote: FsspecRemote, tmp_path: Path):
    for step in (1, 10):  # checkpoint-step-1 is a string prefix of checkpoint-step-10
        commit(remote, *step_checkpoint(tmp_path, step))
    remote.delete_checkpoint("checkpoint-step-1")
    assert remote.list_checkpoints() == ["checkpoint-step-10"]
    remote.stat("checkpoint-step-10/rng/rank0.json")
    with pytest.raises(FileNotFoundError):
        remote.stat("checkpoint-step-1/rng/rank0.json")
    remote.delete_checkpoint("checkpoint-step-1")  # already gone: fine
    remote.delete("LATEST")
    remote.delete("LATEST")


def test_incomplete_and_foreign_folders_are_not_listed(remote: FsspecRemote, tmp_path: Path):
    commit(remote, *step_checkpoint(tmp_path, 10))
    remote.write_bytes("checkpoint-step-20/model.safetensors", b"upload interrupted before the manifest")
    remote.write_bytes("notes/manifest.json", b"{}")
    remote.write_bytes("checkpoint-step-2e3/manifest.json", b"{}")
    assert remote.list_checkpoints() == ["checkpoint-step-10"]


def test_missing_prefix_lists_nothing(remote: FsspecRemote):
    assert remote.list_checkpoints() == []
    assert remote.read_latest() is None
    with pytest.raises(FileNotFoundError):
        remote.read_bytes("LATEST")
    with pytest.raises(FileNotFoundError):
        remote.open_read("checkpoint-step-1/model.safetensors")


def test_flipped_byte_is_caught(remote: FsspecRemote, tmp_path: Path):
    folder, m, mb = step_checkpoint(tmp_path, 10)
    commit(remote, folder, m, mb)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    remote.write_bytes("checkpoint-step-10/model.safetensors", bytes(data))
    with pytest.raises(CheckpointCorrupt, match="SHA-256 mismatch"):
        remote.download_checkpoint(m.name, remote.read_manifest(m.name)[0], tmp_path / "dl")


def test_truncated_file_is_caught(remote: FsspecRemote, tmp_path: Path):
    folder, m, mb = step_checkpoint(tmp_path, 10)
    commit(remote, folder, m, mb)
    remote.write_bytes("checkpoint-step-10/model.safetensors", (folder / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(CheckpointCorrupt, match="bytes"):
        remote.download_checkpoint(m.name, remote.read_manifest(m.name)[0], tmp_path / "dl")


def test_create_exclusive(remote: FsspecRemote):
    assert remote.create_exclusive("LEASE", b'{"session": "a"}') is True
    assert remote.create_exclusive("LEASE", b'{"session": "b"}') is False
    assert remote.read_bytes("LEASE") == b'{"session": "a"}'
    assert remote.create_exclusive(".lease", b"a") is True  # the root dot-file base.py's layout names
    assert remote.create_exclusive(".lease", b"b") is False


def test_read_bytes_size_limit(remote: FsspecRemote):
    remote.write_bytes("LATEST", b"x" * 1000)
    assert remote.read_bytes("LATEST", max_size=1000) == b"x" * 1000
    with pytest.raises(UnsafeCheckpoint, match="over the 999-byte limit"):
        remote.read_bytes("LATEST", max_size=999)
    assert remote.read_latest() is None  # damaged hint, not an error
    remote.write_bytes("empty", b"")
    assert remote.read_bytes("empty") == b""


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a/../../b", "a//b", "./a", "c:/x", "a\\b", ""])
def test_paths_outside_the_prefix_are_refused(remote: FsspecRemote, bad: str, tmp_path: Path):
    for call in (
        lambda: remote.read_bytes(bad),
        lambda: remote.write_bytes(bad, b"x"),
        lambda: remote.create_exclusive(bad, b"x"),
        lambda: remote.delete(bad),
        lambda: remote.stat(bad),
        lambda: remote.open_read(bad),
    ):
        with pytest.raises(UnsafeCheckpoint):
            call()


def test_checkpoint_names_and_manifest_paths_are_checked(remote: FsspecRemote, tmp_path: Path):
    folder, m, mb = step_checkpoint(tmp_path, 10)
    for name in ("../run2", "checkpoint-step-10/..", "other"):
        with pytest.raises(UnsafeCheckpoint):
            remote.delete_checkpoint(name)
    with pytest.raises(UnsafeCheckpoint):
        commit(remote, folder, m, mb, delete=["../../victim"])
    evil = Manifest(m.name, "step", 10, 0, 9, [FileEntry("../../outside.bin", 1, "0" * 64)])
    with pytest.raises(UnsafeCheckpoint):
        remote.commit_checkpoint(m.name, folder, evil, evil.to_bytes(), None)
    assert remote.list_checkpoints() == []


def test_store_checksums(remote: FsspecRemote, target: tuple[str, dict[str, Any]]):
    data = b"checksum me" * 100
    remote.write_bytes("blob.bin", data)
    st = remote.stat("blob.bin")
    assert st.size == len(data)
    url = target[0]
    if url.startswith("gs://"):
        assert st.checksums["md5"] == hashlib.md5(data).hexdigest()
        assert st.checksums["crc32c"]
    elif url.startswith("s3://"):
        assert st.checksums["etag"] == hashlib.md5(data).hexdigest()  # single-part, unencrypted
    else:
        assert st.checksums == {}


def test_create_exclusive_falls_back_with_a_warning(
    remote: FsspecRemote, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    # A store with no conditional write (an fsspec protocol this module does not know) still gets the semantics,
    # minus atomicity, and says so.
    monkeypatch.setattr(FsspecRemote, "_kind", property(lambda self: "other"))
    assert remote.create_exclusive("LEASE", b"a") is True
    assert remote.create_exclusive("LEASE", b"b") is False
    assert "no conditional create" in caplog.text


# ---- backend specifics -------------------------------------------------------------------------------------
def test_plain_local_path_and_factory(tmp_path: Path):
    r = open_remote(str(tmp_path / "drive" / "run"))  # a mounted Google Drive is just a folder
    assert isinstance(r, FsspecRemote) and r.url == str(tmp_path / "drive" / "run")
    commit(r, *step_checkpoint(tmp_path, 5))
    assert r.list_checkpoints() == ["checkpoint-step-5"]
    assert not [p for p in (tmp_path / "drive" / "run").rglob("*") if ".tmp-" in p.name]  # no temp files left


def test_safe_url_strips_credentials():
    assert safe_url(f"s3://AKIA:{SECRET}@bucket/run/") == "s3://bucket/run"
    assert safe_url(f"gs://bucket/run?token={SECRET}") == "gs://bucket/run"
    assert safe_url("file:///tmp/x/") == "file:///tmp/x"
    r = FsspecRemote(f"memory://user:{SECRET}@host/run")
    assert SECRET not in r.url and SECRET not in repr(r)


def test_store_errors_are_scrubbed_of_secrets(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    r = FsspecRemote(f"memory://scrub-{uuid.uuid4().hex[:8]}/run", {"client_secret": SECRET}, retry=QUICK)
    r.write_bytes("LATEST", b"{}")

    def leaky(*args: Any, **kwargs: Any) -> bytes:
        raise ConnectionResetError(f"reset while sending Authorization: {SECRET}")  # a careless client message

    monkeypatch.setattr(r._filesystem(), "cat_file", leaky)
    with pytest.raises(RemoteError, match=r"gave up after retries: .*\*\*\*") as excinfo:
        r.read_bytes("LATEST")
    assert excinfo.value.__cause__ is None and excinfo.value.__context__ is None  # the original is not attached
    assert SECRET not in "".join(traceback.format_exception(excinfo.value)) + caplog.text
    assert "transient failure" in caplog.text


def test_missing_bucket_fails_fast(s3_storage_options: dict[str, Any], gcs_storage_options, tmp_path: Path):
    folder, m, mb = step_checkpoint(tmp_path, 10)
    for url, options in (
        ("s3://no-such-bucket-syncckpt/run", s3_storage_options),
        ("gs://no-such-bucket-syncckpt/run", gcs_storage_options),
    ):
        r = FsspecRemote(url, storage_options=options, retry=RetryPolicy(attempts=5, initial_wait=1.0))
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match="no-such-bucket-syncckpt.*does not exist") as listed:
            r.list_checkpoints()
        with pytest.raises(RemoteError, match="no-such-bucket-syncckpt") as committed:
            commit(r, folder, m, mb)
        assert time.monotonic() - t0 < 5, "a missing bucket must not be retried"
        for exc in (listed.value, committed.value):
            assert SECRET not in "".join(traceback.format_exception(exc))


def test_fork_child_rebuilds_the_filesystem(s3_remote_url: str, s3_storage_options: dict[str, Any], tmp_path: Path):
    r = FsspecRemote(s3_remote_url, storage_options=s3_storage_options, retry=QUICK)
    commit(r, *step_checkpoint(tmp_path, 10))
    assert r.list_checkpoints() == ["checkpoint-step-10"]  # the parent's instance now owns a loop and a session
    assert r._direct is not None  # and its upload went through obstore, whose runtime started in this process
    pid = os.fork()
    if pid == 0:  # child: report through the exit code, never return into pytest
        code = 3
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # kills the child even while it waits outside Python
            signal.alarm(30)
            # the parent's upload went through obstore, whose runtime threads a fork leaves behind: the child's
            # upload must not wait on them (it goes through s3fs)
            commit(r, *step_checkpoint(tmp_path, 11))
            code = 0 if r.list_checkpoints() == ["checkpoint-step-10", "checkpoint-step-11"] else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert r.list_checkpoints() == ["checkpoint-step-10", "checkpoint-step-11"]  # the parent's instance still works


# ---- transient faults through the proxy --------------------------------------------------------------------
def test_commits_survive_random_faults(
    fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str, tmp_path: Path
):
    r = FsspecRemote(
        s3_remote_url,
        storage_options=fault_s3_storage_options,
        retry=RetryPolicy(attempts=10, initial_wait=0.02, max_wait=0.2, max_total=60),
    )
    fault_proxy.set_rate(0.3)
    previous: list[str] = []
    for step, size in ((10, 50_000), (20, 1_500_000)):  # over 1 MB botocore asks for "Expect: 100-continue"
        folder, m, mb = step_checkpoint(tmp_path, step, model_size=size)
        commit(r, folder, m, mb, delete=previous)
        previous = [m.name]
    assert r.list_checkpoints() == ["checkpoint-step-20"]
    got, _ = r.read_manifest("checkpoint-step-20")
    r.download_checkpoint("checkpoint-step-20", got, tmp_path / "dl")
    assert_same_files(folder, tmp_path / "dl", m)
    assert r.create_exclusive("LEASE", b"session-1") is True
    assert r.create_exclusive("LEASE", b"session-2") is False
    fault_proxy.set_rate(0.0)
    assert r.read_bytes("LEASE") == b"session-1"
    injected = {k: v for k, v in fault_proxy.counts.items() if k != "passed"}
    assert sum(injected.values()) >= 10 and len(injected) >= 4, fault_proxy.counts


@pytest.mark.parametrize("reader", ["ranges", "stream"])
def test_download_under_faults_retries_and_bounds_memory(
    reader: str,
    fault_proxy: FaultProxy,
    fault_s3_storage_options: dict[str, Any],
    s3_remote_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """Object-store downloads, as parallel ranged reads or one streamed GET per object: with faults on 30% of
    requests each range, or each stream from where it broke, is retried, the files come back byte-identical, and
    the bytes held by all readers of the remote (several files download at once) never exceed its read budget and
    all return to it."""
    import syncckpt.remote.streams as streams_mod

    monkeypatch.setattr(streams_mod, "_PREFETCH_PART", 64 << 10)
    monkeypatch.setattr(streams_mod, "CHUNK", 32 << 10)  # streams: many chunks per object
    monkeypatch.setattr(streams_mod, "STREAM_MAX", 0 if reader == "ranges" else 1 << 30)
    monkeypatch.setattr(streams_mod, "_READ_BYTES_IN_FLIGHT", 256 << 10)  # 4 ranges for all files together
    opened: set[type] = set()
    open_read = FsspecRemote.open_read

    def spy(self, *args, **kwargs):
        f = open_read(self, *args, **kwargs)
        opened.add(type(f))
        return f

    monkeypatch.setattr(FsspecRemote, "open_read", spy)
    r = FsspecRemote(
        s3_remote_url,
        storage_options=fault_s3_storage_options,
        retry=RetryPolicy(attempts=10, initial_wait=0.02, max_wait=0.2, max_total=60),
    )
    folder, m, mb = make_checkpoint(tmp_path, "checkpoint-step-10", 10, model_size=1_000_000)
    big = folder / "rng" / "big.bin"
    big.write_bytes(random.Random(7).randbytes(700_000))  # a second multi-range file downloading at once
    m = Manifest(
        name=m.name,
        kind="step",
        global_step=10,
        epoch=0,
        batch_idx=9,
        files=[*m.files, FileEntry("rng/big.bin", 700_000, sha256_hex(big.read_bytes()))],
    )
    mb = m.to_bytes()
    commit(r, folder, m, mb)

    budget = r._read_budget
    peak = 0
    acquire, try_acquire = budget.acquire, budget.try_acquire

    def track(fn):
        def wrapped(n: int):
            nonlocal peak
            out = fn(n)
            peak = max(peak, budget.in_use)
            return out

        return wrapped

    monkeypatch.setattr(budget, "acquire", track(acquire))
    monkeypatch.setattr(budget, "try_acquire", track(try_acquire))
    fault_proxy.set_rate(0.3)
    r.download_checkpoint(m.name, m, tmp_path / "dl")
    fault_proxy.set_rate(0.0)
    assert_same_files(folder, tmp_path / "dl", m)
    injected = {k: v for k, v in fault_proxy.counts.items() if k != "passed"}
    assert sum(injected.values()) >= (5 if reader == "ranges" else 2), fault_proxy.counts  # streams: fewer GETs
    assert 64 << 10 <= peak <= 256 << 10, peak  # read ahead, within the budget
    assert budget.in_use == 0
    want = streams_mod.PrefetchReader if reader == "ranges" else streams_mod.StreamReader
    assert opened == {want}, opened


@pytest.mark.parametrize("reader", ["ranges", "stream"])
def test_read_without_a_size_returns_every_byte_to_the_end_like_a_file(
    reader: str, s3_remote_url: str, s3_storage_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
):
    """``read()`` is a file's: the rest of the object, not the chunk or range at hand (a streamed GET hands over
    what has arrived, so a 40 kB object could come back as its first 32 kB)."""
    import syncckpt.remote.streams as streams_mod

    monkeypatch.setattr(streams_mod, "_PREFETCH_PART", 16 << 10)
    monkeypatch.setattr(streams_mod, "CHUNK", 16 << 10)
    monkeypatch.setattr(streams_mod, "STREAM_MAX", 0 if reader == "ranges" else 1 << 30)
    r = FsspecRemote(s3_remote_url, storage_options=s3_storage_options, retry=QUICK)
    data = random.Random(5).randbytes(100_000)
    r.write_bytes("obj.bin", data)
    with r.open_read("obj.bin", len(data)) as f:
        assert type(f) is (streams_mod.PrefetchReader if reader == "ranges" else streams_mod.StreamReader)
        assert bytes(f.read(10)) == data[:10]
        assert bytes(f.read()) == data[10:]
        assert bytes(f.read()) == b""
    r.close()


def test_requester_pays_travels_with_the_listing_the_head_and_the_stream_syncckpt_sends_itself(
    fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str
):
    """The requests syncckpt makes through s3fs's client directly (one ListObjectsV2 of a checkpoint, one HEAD,
    one streamed GET) carry ``x-amz-request-payer`` as s3fs's own do: s3fs before 2026.9 does not add it there."""
    r = FsspecRemote(s3_remote_url, storage_options={**fault_s3_storage_options, "requester_pays": True}, retry=QUICK)
    r.write_bytes("checkpoint-step-1/model.safetensors", b"weights")
    fault_proxy.requests.clear()
    assert r.clear_uncommitted("checkpoint-step-1")  # a listing, then the leftover's DELETE
    assert not r.exists("checkpoint-step-1/model.safetensors")
    r.write_bytes("obj.bin", b"0123456789")
    assert r.exists("obj.bin")
    with r.open_read("obj.bin", 10) as f:
        assert bytes(f.read()) == b"0123456789"
    r.close()
    seen = [(m, headers.get("x-amz-request-payer")) for m, _, headers in fault_proxy.requests]
    assert {m for m, _ in seen} >= {"GET", "HEAD", "DELETE", "PUT"}, seen
    assert all(payer == "requester" for _, payer in seen), seen


def test_an_empty_object_is_told_by_the_416_code_whatever_message_the_store_sends() -> None:
    """``_range_refused`` reads botocore's error code under s3fs's OSError, not only the message moto sends."""
    from botocore.exceptions import ClientError

    from syncckpt.remote.fsspec import _range_refused

    def raised(response: dict[str, Any]) -> OSError:
        try:
            try:
                raise ClientError(response, "GetObject")
            except ClientError as e:
                raise OSError(22, "An error occurred (InvalidRange) when calling GetObject: Unknown") from e
        except OSError as e:
            return e

    assert _range_refused(raised({"Error": {"Code": "InvalidRange"}}))
    assert _range_refused(raised({"Error": {}, "ResponseMetadata": {"HTTPStatusCode": 416}}))
    assert not _range_refused(raised({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}))


def test_a_stream_cut_mid_object_carries_on_from_the_byte_reached(
    fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str, monkeypatch
):
    """A streamed GET broken halfway (half the body, then silence past the client's read timeout, then a reset) is
    reopened as a ranged GET at the byte the caller reached (answered 206), not from the start, and the caller
    reads every byte once, in order."""
    import syncckpt.remote.streams as streams_mod

    monkeypatch.setattr(streams_mod, "CHUNK", 16 << 10)
    r = FsspecRemote(s3_remote_url, storage_options=fault_s3_storage_options, retry=QUICK)
    data = random.Random(3).randbytes(1 << 20)
    r.write_bytes("big.bin", data)
    opened_at: list[int] = []
    open_at = streams_mod.StreamReader._open
    monkeypatch.setattr(streams_mod.StreamReader, "_open", lambda self: opened_at.append(self._pos) or open_at(self))
    fault_proxy.answered.clear()
    fault_proxy.inject("cut")
    with r.open_read("big.bin", len(data)) as f:
        assert isinstance(f, streams_mod.StreamReader)
        got = b"".join(bytes(c) for c in iter(lambda: f.read(10_000), b""))
    assert got == data
    assert opened_at == [0, len(data) // 2]  # the cut relayed half the body, all of which the caller read
    gets = [status for method, _, status in fault_proxy.answered if method == "GET"]
    assert gets == [206], fault_proxy.answered  # the cut answer is not listed: it never completed


def test_a_stream_broken_after_its_last_byte_ends_without_another_request(
    fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str
):
    """Every promised byte was read and the connection then broke before the end was seen: a ranged GET from the
    size would be answered 416 and fail the download, so the reader just ends. (The break is made by dropping the
    reader's stream by hand: no proxy fault lands exactly there.)"""
    import syncckpt.remote.streams as streams_mod

    r = FsspecRemote(s3_remote_url, storage_options=fault_s3_storage_options, retry=QUICK)
    r.write_bytes("small.bin", b"0123456789")
    with r.open_read("small.bin", 10) as f:
        assert isinstance(f, streams_mod.StreamReader)
        assert bytes(f.read(10)) == b"0123456789"
        f._discard()  # the connection broke here
        fault_proxy.answered.clear()
        assert bytes(f.read(1)) == b"" and bytes(f.read()) == b""
    assert fault_proxy.answered == []


def test_lost_reply_to_a_conditional_create_still_counts_as_ours(
    fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str
):
    r = FsspecRemote(s3_remote_url, storage_options=fault_s3_storage_options, retry=QUICK)
    # The PUT lands in moto but its reply is cut; the retry is answered 412 and the object is read back.
    fault_proxy.inject("truncate")
    assert r.create_exclusive("LEASE", b"session-1") is True
    assert fault_proxy.counts["truncate"] == 1
    fault_proxy.inject("stall", "503", "reset")
    assert r.create_exclusive("LEASE", b"session-2") is False
    assert r.read_bytes("LEASE") == b"session-1"


def test_access_denied_is_not_retried(
    fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str
):
    r = FsspecRemote(s3_remote_url, storage_options=fault_s3_storage_options, retry=QUICK)
    r.write_bytes("LATEST", b"{}")
    fault_proxy.inject("403", "403", "403")
    with pytest.raises(RemoteError, match="access denied") as excinfo:
        r.read_bytes("LATEST")
    assert fault_proxy.counts["403"] == 1, "a 403 must not be retried"
    assert s3_remote_url in str(excinfo.value) and SECRET not in str(excinfo.value)


def test_short_outage_is_ridden_out(
    fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str, tmp_path: Path
):
    patient = RetryPolicy(attempts=10, initial_wait=0.01, max_wait=0.05, max_total=30)
    r = FsspecRemote(s3_remote_url, storage_options=fault_s3_storage_options, retry=patient)
    fault_proxy.down(count=6)  # the next 6 connections are reset, then the store is back
    folder, m, mb = step_checkpoint(tmp_path, 10)
    commit(r, folder, m, mb)
    assert fault_proxy.counts["down"] == 6
    assert r.list_checkpoints() == ["checkpoint-step-10"]


def test_server_restart(s3_server, s3_storage_options: dict[str, Any], s3_remote_url: str, tmp_path: Path):
    fast = s3_server.options(fast=True)
    r = FsspecRemote(s3_remote_url, storage_options=fast, retry=QUICK)
    commit(r, *step_checkpoint(tmp_path, 10))
    s3_server.stop()
    try:
        with pytest.raises(RemoteError, match="gave up after retries"):
            r.list_checkpoints()
    finally:
        s3_server.start()
    assert r.list_checkpoints() == ["checkpoint-step-10"]  # moto keeps its buckets across a restart


def test_long_outage_gives_up_within_bounds_without_leaking_secrets(
    fault_proxy: FaultProxy,
    fault_s3_storage_options: dict[str, Any],
    s3_remote_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.DEBUG)
    r = FsspecRemote(s3_remote_url, storage_options=fault_s3_storage_options, retry=QUICK)
    fault_proxy.down()
    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="gave up after retries") as excinfo:
        commit(r, *step_checkpoint(tmp_path, 10))
    assert time.monotonic() - t0 < 20
    assert s3_remote_url in str(excinfo.value)
    assert "transient failure" in caplog.text  # each retry is logged
    fault_proxy.up()
    assert r.list_checkpoints() == []
    everything = "".join(traceback.format_exception(excinfo.value)) + caplog.text + repr(r) + r.url
    assert SECRET not in everything


# ---- the retry classifier ----------------------------------------------------------------------------------
def test_is_transient_classifies_store_errors():
    import aiohttp
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
    from gcsfs.retry import HttpError
    from s3fs.errors import translate_boto_error

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
        )

    assert is_transient(translate_boto_error(client_error("SlowDown", 503)))
    assert is_transient(translate_boto_error(client_error("InternalError", 500)))
    assert is_transient(client_error("ThrottlingException", 400))
    assert is_transient(client_error("ConditionalRequestConflict", 409))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert is_transient(HttpError({"code": 503, "message": "backend error"}))
    assert is_transient(HttpError({"code": 429, "message": "rate limit"}))
    assert is_transient(aiohttp.ServerDisconnectedError())
    assert is_transient(ConnectionResetError(104, "reset"))
    assert not is_transient(translate_boto_error(client_error("AccessDenied", 403)))
    assert not is_transient(translate_boto_error(client_error("NoSuchBucket", 404)))
    assert not is_transient(translate_boto_error(client_error("InvalidArgument", 400)))
    assert not is_transient(HttpError({"code": 400, "message": "bad"}))
    assert not is_transient(CheckpointCorrupt("digest mismatch"))
    assert not is_transient(ValueError("bug"))
