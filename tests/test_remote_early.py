"""EarlyPut: a checkpoint's data sent while it is written, committed only through the remote's one sequence.

Real stores: a local folder (``file://``, whose check also reads every byte back) and S3 (moto through s3fs,
whose check is by size); the order the store saw is read from the FaultProxy's log of answered requests. No
sleeps: every wait is on ``EarlyPut.wait()``, ``Uploader.wait()`` or ``CheckpointManager.wait()``.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from faultproxy import FaultProxy

from syncckpt import CheckpointManager, local
from syncckpt.errors import RemoteError
from syncckpt.manifest import LATEST_NAME, MANIFEST_NAME, Latest, Manifest, sha256_hex
from syncckpt.remote import open_remote
from syncckpt.remote.early import EarlyPut

NAME = "checkpoint-step-7"


@pytest.fixture(params=["file", "s3"])
def remote(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "file":
        r = open_remote((tmp_path / "bucket" / "run").as_uri())
    else:
        r = open_remote(request.getfixturevalue("s3_remote_url"), request.getfixturevalue("s3_storage_options"))
    yield r
    r.close()


def written(tmp: Path, files: dict[str, bytes]) -> list[local.FileEntry]:
    tmp.mkdir(parents=True, exist_ok=True)
    return [local.write_file(tmp, rel, [data]) for rel, data in files.items()]


def files_of(seed: str) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"model.safetensors": rng.randbytes(40_000), "state.json": b'{"seed": "%s"}' % seed.encode()}


def manifest(entries: list[local.FileEntry], name: str = NAME) -> Manifest:
    return Manifest(name=name, kind="step", global_step=7, epoch=0, batch_idx=6, files=entries)


def commit(r, folder: Path, m: Manifest, put: EarlyPut | None = None) -> None:
    data = m.to_bytes()
    r.commit_checkpoint(m.name, folder, m, data, Latest(m.name, m.global_step, sha256_hex(data)), put=put)


def stored(r, name: str, rel: str) -> bytes:
    with r.open_read(f"{name}/{rel}") as f:
        return f.read()


def test_data_sent_while_written_is_no_checkpoint_until_the_commit_writes_its_manifest_then_latest(remote, tmp_path):
    entries = written(tmp_path / "tmp", files_of("a"))
    put = EarlyPut(remote, NAME, tmp_path / "staging")
    (tmp_path / "staging").mkdir()
    for e in entries:
        put.send(tmp_path / "tmp", e)
    assert put.wait()
    assert stored(remote, NAME, "model.safetensors") == files_of("a")["model.safetensors"]  # the bytes are there
    assert remote.list_checkpoints() == [] and remote.read_latest() is None  # but no reader sees a checkpoint
    commit(remote, tmp_path / "staging", manifest(entries), put)
    put.close()
    assert remote.list_checkpoints() == [NAME] and remote.read_latest().name == NAME
    assert put.early_bytes == sum(e.size for e in entries)  # nothing was sent twice


def test_a_file_failing_its_check_in_the_store_fails_the_commit_before_manifest_and_latest(remote, tmp_path):
    old = written(tmp_path / "old", files_of("old"))
    commit(remote, tmp_path / "old", manifest(old, "checkpoint-step-5"))
    entries = written(tmp_path / "tmp", files_of("a"))
    (tmp_path / "staging").mkdir()
    put = EarlyPut(remote, NAME, tmp_path / "staging")
    for e in entries:
        put.send(tmp_path / "tmp", e)
    assert put.wait()
    remote.write_bytes(f"{NAME}/model.safetensors", b"damaged on the way")  # the store holds other bytes now
    with pytest.raises(RemoteError, match="model.safetensors"):
        commit(remote, tmp_path / "staging", manifest(entries), put)
    put.close()
    assert remote.list_checkpoints() == ["checkpoint-step-5"]
    assert remote.read_latest().name == "checkpoint-step-5"
    commit(remote, tmp_path / "staging", manifest(entries))  # the uploader's retry: the usual way
    assert stored(remote, NAME, "model.safetensors") == files_of("a")["model.safetensors"]


def test_a_committed_checkpoint_of_the_same_name_is_not_touched_before_the_commit(remote, tmp_path):
    old = written(tmp_path / "old", files_of("old"))
    commit(remote, tmp_path / "old", manifest(old))
    entries = written(tmp_path / "tmp", files_of("new"))
    (tmp_path / "staging").mkdir()
    put = EarlyPut(remote, NAME, tmp_path / "staging")
    for e in entries:
        put.send(tmp_path / "tmp", e)
    assert not put.wait()  # nothing went early
    assert stored(remote, NAME, "model.safetensors") == files_of("old")["model.safetensors"]
    assert remote.read_manifest(NAME)[0].files == old
    commit(remote, tmp_path / "staging", manifest(entries), put)  # falls back to delete, then send
    put.close()
    assert remote.read_manifest(NAME)[0].files == entries and put.early_bytes == 0
    assert stored(remote, NAME, "model.safetensors") == files_of("new")["model.safetensors"]


def test_leftovers_of_a_killed_attempt_are_removed_and_an_abandoned_put_removes_what_it_sent(remote, tmp_path):
    remote.write_bytes(f"{NAME}/stray.bin", b"from an attempt killed before its manifest")
    entries = written(tmp_path / "tmp", files_of("a"))
    (tmp_path / "staging").mkdir()
    put = EarlyPut(remote, NAME, tmp_path / "staging")
    for e in entries:
        put.send(tmp_path / "tmp", e)
    assert put.wait()
    with pytest.raises(FileNotFoundError):
        remote.stat(f"{NAME}/stray.bin")
    put.abandon()  # the local commit failed: no commit follows
    for e in entries:
        with pytest.raises(FileNotFoundError):
            remote.stat(f"{NAME}/{e.path}")
    assert not (tmp_path / "staging").exists()


def test_an_abandoned_put_leaves_the_name_alone_once_another_session_took_the_run_over(remote, tmp_path):
    """Session A's data of NAME went early; session B took the run over and committed NAME itself; A's local
    commit then fails. A's abandon() must not delete B's checkpoint: it checks its lease before deleting."""
    from syncckpt.lease import Lease

    a = Lease(remote, heartbeat=None)
    a.acquire()
    entries = written(tmp_path / "tmp", files_of("a"))
    (tmp_path / "staging").mkdir()
    put = EarlyPut(remote, NAME, tmp_path / "staging", before=a.check)
    for e in entries:
        put.send(tmp_path / "tmp", e)
    assert put.wait()
    b = Lease(remote, takeover=True, heartbeat=None)
    b.acquire()
    theirs = written(tmp_path / "b", files_of("b"))
    commit(remote, tmp_path / "b", manifest(theirs))
    put.abandon()
    assert remote.list_checkpoints() == [NAME]
    assert stored(remote, NAME, "model.safetensors") == files_of("b")["model.safetensors"]
    b.release()


def test_before_the_first_byte_one_listing_tells_a_new_name_from_a_committed_one_and_clears_leftovers(
    fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str, tmp_path: Path
):
    """What the store is asked before a save's data goes (S3 through the proxy's log): one listing of NAME/, not a
    HEAD of its manifest, a DELETE of it and a listing; a leftover of a killed attempt costs its DELETE only, and
    a committed checkpoint of that name is left as it is."""
    r = open_remote(s3_remote_url, fault_s3_storage_options)

    def asked(name: str) -> list[str]:
        fault_proxy.answered.clear()
        (tmp_path / name).mkdir()
        put = EarlyPut(r, name, tmp_path / name)
        put.wait()
        put.close()
        return [m for m, _, _ in fault_proxy.answered]

    try:
        assert asked("checkpoint-step-1") == ["GET"]  # ListObjectsV2 of checkpoint-step-1/: nothing there
        r.write_bytes("checkpoint-step-2/model.safetensors", b"from an attempt killed before its manifest")
        assert asked("checkpoint-step-2") == ["GET", "DELETE"]
        assert not r.exists("checkpoint-step-2/model.safetensors")
        entries = written(tmp_path / "old", files_of("old"))
        commit(r, tmp_path / "old", manifest(entries))
        assert asked(NAME) == ["GET"]
        assert (
            r.list_checkpoints() == [NAME]
            and stored(r, NAME, "model.safetensors") == files_of("old")["model.safetensors"]
        )
    finally:
        r.close()


def test_a_steady_state_save_to_s3_asks_the_store_21_times_each_request_once(
    fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str, tmp_path: Path
):
    """Every request a save costs, from the proxy's log (keep_last 3, so each save also deletes one): per data
    file a PUT and a HEAD (its size, checked in the store); the lease read twice (before the first byte and before
    the commit), the quarantine index, the run's listing, a HEAD per older checkpoint retention weighs (none for
    the new one: whether the run's listing showed its folder yet depended on how far its early data had gone, so
    the count was 21 or 22), one listing of the new name and one of the old, the manifest, LATEST and the old
    checkpoint's objects. It was 32 while every small read was a HEAD and then a GET, and a missing key a HEAD and a
    listing."""
    model = torch.nn.Sequential(*(torch.nn.Linear(128, 128) for _ in range(2)))
    prefix = s3_remote_url.split("://", 1)[1]
    costs = []
    with CheckpointManager(
        tmp_path / "ck", remote=s3_remote_url, storage_options=fault_s3_storage_options, keep_last=3,
        handle_sigterm=False,
    ) as mgr:  # fmt: skip
        mgr.register(model=model)
        for step in range(1, 7):
            fault_proxy.answered.clear()
            mgr.save(step, epoch=0, batch_idx=step)
            assert mgr.wait()
            asked = [(m, t) for m, t, _ in fault_proxy.answered if not (m == "PUT" and t.endswith("/LEASE"))]
            costs.append(len(asked))
            if step > 4:  # steady state: three kept, one deleted per save
                lease = ("GET", f"/{prefix}/LEASE")
                assert asked.count(lease) == 2, asked  # before the first byte, and again before the commit
                rest = [a for a in asked if a != lease]
                assert len(rest) == len(set(rest)) == 19, sorted(rest)  # nothing else asked twice
                assert ("HEAD", f"/{prefix}/checkpoint-step-{step}/manifest.json") not in rest
                deleted = f"/{prefix}/checkpoint-step-{step - 3}/"
                assert sum(m == "DELETE" and t.startswith(deleted) for m, t in asked) == 4, asked
    assert costs[-1] == costs[-2] == 21, costs


def test_the_store_sees_every_data_file_then_the_manifest_then_latest_and_the_data_went_while_written(
    fault_proxy: FaultProxy,
    fault_s3_storage_options: dict[str, Any],
    s3_remote_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    prefix = s3_remote_url.split("://", 1)[1]
    with caplog.at_level(logging.INFO, logger="syncckpt"):
        with CheckpointManager(
            tmp_path / "ck", remote=s3_remote_url, storage_options=fault_s3_storage_options, handle_sigterm=False
        ) as mgr:
            mgr.register(model=model)
            for step in (1, 2):
                mgr.save(step, epoch=0, batch_idx=step)
                assert mgr.wait()
    mirrored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Mirrored ")]
    assert len(mirrored) == 2
    for line in mirrored:  # every data byte left before the commit: "N bytes of data, N of them while written"
        data, early = re.search(r"for (\d+) bytes of data, (\d+) of them while it was written", line).groups()
        assert data == early
    writes = [
        (i, t.split("?")[0])
        for i, (method, t, status) in enumerate(fault_proxy.answered)
        if method in ("PUT", "POST") and status < 300
    ]
    for step in (1, 2):
        folder = f"/{prefix}/checkpoint-step-{step}/"
        data = [i for i, t in writes if t.startswith(folder) and not t.endswith(MANIFEST_NAME)]
        (manifest_at,) = [i for i, t in writes if t == folder + MANIFEST_NAME]
        latest_at = min(i for i, t in writes if t == f"/{prefix}/{LATEST_NAME}" and i > manifest_at)
        assert data and max(data) < manifest_at < latest_at
