"""HubRemote against an in-memory Hub (tests/hub_server.py) speaking the endpoints huggingface_hub 2.4 calls.

The ``hub`` fixture (conftest.py) points huggingface_hub at the local server; ``endpoint`` is also passed explicitly
through storage_options, which is what HubRemote actually uses.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import huggingface_hub.constants as hf_constants  # noqa: E402
from hub_server import TOKEN, USER, HubServer  # noqa: E402

from syncckpt.errors import CheckpointCorrupt, ConfigError, RemoteConflict, RemoteError, UnsafeCheckpoint  # noqa: E402
from syncckpt.manifest import FileEntry, Latest, Manifest, sha256_hex  # noqa: E402
from syncckpt.remote import open_remote  # noqa: E402
from syncckpt.remote.hub import HubRemote  # noqa: E402
from syncckpt.remote.retry import RetryPolicy  # noqa: E402

# huggingface_hub's own LFS upload passes a file object as `data=`, which httpx2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

FAST = RetryPolicy(attempts=3, initial_wait=0.01, max_wait=0.02, max_total=30)


@pytest.fixture
def repo_id():
    return f"{USER}/run-{uuid.uuid4().hex[:10]}"


def make_remote(server: HubServer, url: str, **kw) -> HubRemote:
    options = {"endpoint": server.url, **kw.pop("storage_options", {})}
    remote = HubRemote(url, options, min_commit_interval=kw.pop("min_commit_interval", 0), **kw)
    remote.retry_policy = FAST
    return remote


def make_checkpoint(root: Path, step: int, size: int = 20_000) -> tuple[str, Path, Manifest, bytes, Latest]:
    """A local checkpoint folder: one LFS-sized safetensors file, one small JSON file, in a sub-folder."""
    name = f"checkpoint-step-{step}"
    folder = root / name
    contents = {
        "model.safetensors": os.urandom(size),
        "state/trainer.json": json.dumps({"step": step}).encode(),
    }
    for rel, data in contents.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    files = [FileEntry(rel, len(data), sha256_hex(data)) for rel, data in contents.items()]
    manifest = Manifest(name=name, kind="step", global_step=step, epoch=0, batch_idx=step, files=files)
    data = manifest.to_bytes()
    return name, folder, manifest, data, Latest(name, step, sha256_hex(data))


def commit(remote: HubRemote, root: Path, step: int, delete=(), **kw) -> tuple[str, Path, Manifest, bytes]:
    name, folder, manifest, data, latest = make_checkpoint(root, step, **kw)
    remote.commit_checkpoint(name, folder, manifest, data, latest, delete=delete)
    return name, folder, manifest, data


def commit_calls(server: HubServer, repo_id: str):
    return [r for r in server.requests("commit") if f"/{repo_id}/commit/" in r.path]


def test_k_checkpoints_are_k_commits_and_round_trip(hub, repo_id, tmp_path):
    remote = make_remote(hub, f"hf://{repo_id}/runs/nli")
    assert remote.list_checkpoints() == [] and remote.read_latest() is None
    assert not hub.exists(repo_id), "reads must not create the repository"

    commit(remote, tmp_path, 1)
    commit(remote, tmp_path, 2)
    name, folder, manifest, data = commit(remote, tmp_path, 3, delete=["checkpoint-step-1"])

    assert hub.commit_posts(repo_id) == 3
    assert len(hub.history(repo_id)) == 4  # the repository's initial commit + one per checkpoint
    assert hub.is_private(repo_id)
    last_ops = hub.commit_ops(repo_id)[-1]
    assert ("deletedFolder", "runs/nli/checkpoint-step-1/") in last_ops  # retention rode in the same commit
    assert ("lfsFile", "runs/nli/checkpoint-step-3/model.safetensors") in last_ops
    assert ("file", "runs/nli/checkpoint-step-3/state/trainer.json") in last_ops

    assert remote.list_checkpoints() == ["checkpoint-step-2", "checkpoint-step-3"]
    assert remote.read_latest() == Latest(name, 3, sha256_hex(data))
    got, got_bytes = remote.read_manifest(name)
    assert got_bytes == data and got.files == manifest.files
    remote.check_uploaded(name, manifest)
    lfs_entry = manifest.file("model.safetensors")
    assert remote.stat(f"{name}/model.safetensors").checksums == {"sha256": lfs_entry.sha256}

    dest = tmp_path / "restored"
    remote.download_checkpoint(name, manifest, dest)
    for entry in manifest.files:
        assert (dest / entry.path).read_bytes() == (folder / entry.path).read_bytes()


def test_open_remote_routes_hf_urls(hub, repo_id):
    remote = open_remote(f"hf://{repo_id}", {"endpoint": hub.url})
    assert isinstance(remote, HubRemote) and remote.url == f"hf://{repo_id}"


def test_conflicting_writer_raises_and_overwrites_nothing(hub, repo_id, tmp_path):
    a = make_remote(hub, f"hf://{repo_id}/run")
    commit(a, tmp_path / "a", 1)
    b = make_remote(hub, f"hf://{repo_id}/run")
    _, _, _, b_manifest = commit(b, tmp_path / "b", 2)
    before = hub.files(repo_id)

    with pytest.raises(RemoteConflict, match="nothing was overwritten") as info:
        commit(a, tmp_path / "a", 3, delete=["checkpoint-step-1"])

    assert f"hf://{repo_id}/run" in str(info.value)
    assert hub.files(repo_id) == before
    assert a.list_checkpoints() == ["checkpoint-step-1", "checkpoint-step-2"]
    assert a.read_latest().manifest_sha256 == sha256_hex(b_manifest)


def test_commits_outside_the_prefix_are_not_conflicts(hub, repo_id, tmp_path):
    run_a = make_remote(hub, f"hf://{repo_id}/run-a")
    run_b = make_remote(hub, f"hf://{repo_id}/run-b")
    commit(run_a, tmp_path / "a", 1)
    commit(run_b, tmp_path / "b", 1)
    commit(run_a, tmp_path / "a", 2)  # the head moved, but not under run-a: rebased, not refused
    assert run_a.list_checkpoints() == ["checkpoint-step-1", "checkpoint-step-2"]
    assert run_b.list_checkpoints() == ["checkpoint-step-1"]


def test_429_waits_for_retry_after(hub, repo_id, tmp_path):
    remote = make_remote(hub, f"hf://{repo_id}")
    commit(remote, tmp_path, 1)
    hub.inject("commit", 429, headers={"Retry-After": "1"}, message="Too many commits")
    commit(remote, tmp_path, 2)
    refused, accepted = commit_calls(hub, repo_id)[-2:]
    assert (refused.status, accepted.status) == (429, 200)
    assert accepted.t - refused.t >= 1.0
    assert remote.list_checkpoints() == ["checkpoint-step-1", "checkpoint-step-2"]


def test_min_commit_interval_spaces_commits(hub, repo_id, tmp_path):
    remote = make_remote(hub, f"hf://{repo_id}", min_commit_interval=0.4)
    errors = []

    def writer(step: int) -> None:
        try:
            commit(remote, tmp_path / str(step), step)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    first, second = commit_calls(hub, repo_id)
    assert second.t - first.t >= 0.4


def test_retry_after_failed_commit_does_not_reupload(hub, repo_id, tmp_path):
    remote = make_remote(hub, f"hf://{repo_id}/run")
    hub.inject("commit", 500, count=FAST.attempts)
    name, folder, manifest, data, latest = make_checkpoint(tmp_path, 1)
    with pytest.raises(RemoteError):
        remote.commit_checkpoint(name, folder, manifest, data, latest)
    oid = manifest.file("model.safetensors").sha256
    assert hub.lfs_uploads[oid] == 1  # uploaded by the first attempt; the retries were told the Hub has it

    remote.commit_checkpoint(name, folder, manifest, data, latest)
    assert hub.lfs_uploads[oid] == 1
    assert remote.list_checkpoints() == [name]

    # Committing the same files again: preupload reports the paths' current oids, so only LATEST changes.
    newer = Latest(name, 1, sha256_hex(data))
    remote.write_bytes("LATEST", b"placeholder")
    remote.commit_checkpoint(name, folder, manifest, data, newer)
    assert hub.commit_ops(repo_id)[-1] == [("file", "run/LATEST")]
    assert hub.lfs_uploads[oid] == 1


def test_lost_commit_response_is_not_reported_as_conflict(hub, repo_id, tmp_path):
    remote = make_remote(hub, f"hf://{repo_id}/run")
    commit(remote, tmp_path, 1)
    commit(remote, tmp_path, 2)
    hub.drop_next("commit")
    commit(remote, tmp_path, 3, delete=["checkpoint-step-1"])
    assert hub.commit_posts(repo_id) == 3  # the retry found its own commit instead of committing twice
    assert remote.list_checkpoints() == ["checkpoint-step-2", "checkpoint-step-3"]
    commit(remote, tmp_path, 4)  # and the session continues from that commit
    assert hub.commit_posts(repo_id) == 4


@pytest.mark.parametrize("path", ["model.safetensors", "state/trainer.json"])
def test_corrupted_stored_file_is_detected(hub, repo_id, tmp_path, path):
    remote = make_remote(hub, f"hf://{repo_id}/run")
    name, folder, manifest, _ = commit(remote, tmp_path, 1)
    original = (folder / path).read_bytes()
    hub.corrupt(repo_id, f"run/{name}/{path}", bytes([original[0] ^ 0xFF]) + original[1:])
    with pytest.raises(CheckpointCorrupt, match="SHA-256 mismatch"):
        remote.download_checkpoint(name, manifest, tmp_path / "restored")


def test_dropped_download_resumes_with_range(hub, repo_id, tmp_path):
    remote = make_remote(hub, f"hf://{repo_id}")
    name, folder, manifest, _ = commit(remote, tmp_path, 1, size=300_000)
    hub.truncate_next("cdn", keep=100_000)
    remote.download_checkpoint(name, manifest, tmp_path / "restored")
    assert (tmp_path / "restored/model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    oid = manifest.file("model.safetensors").sha256
    # The first answer was cut after 100 kB; the read went on from there with a Range request.
    assert [r.status for r in hub.requests("cdn") if oid in r.path] == [200, 206]


def test_check_uploaded_compares_lfs_sha256(hub, repo_id, tmp_path):
    remote = make_remote(hub, f"hf://{repo_id}")
    name, _, manifest, _ = commit(remote, tmp_path, 1)
    lying = Manifest(
        name=name,
        kind="step",
        global_step=1,
        epoch=0,
        batch_idx=1,
        files=[FileEntry("model.safetensors", manifest.files[0].size, "0" * 64)],
    )
    with pytest.raises(RemoteError, match="SHA-256"):
        remote.check_uploaded(name, lying)


def test_read_bytes_and_missing_objects(hub, repo_id, tmp_path):
    remote = make_remote(hub, f"hf://{repo_id}")
    commit(remote, tmp_path, 1)
    with pytest.raises(UnsafeCheckpoint):
        remote.read_bytes("LATEST", max_size=10)
    with pytest.raises(FileNotFoundError):
        remote.read_bytes("nope.json")
    with pytest.raises(FileNotFoundError):
        remote.stat("checkpoint-step-1/nope.bin")
    remote.delete("nope.json")  # absent: not an error, and no commit
    assert hub.commit_posts(repo_id) == 1
    remote.delete_checkpoint("checkpoint-step-1")
    assert remote.list_checkpoints() == [] and hub.commit_posts(repo_id) == 2


def test_create_exclusive(hub, repo_id):
    remote = make_remote(hub, f"hf://{repo_id}/run")
    assert remote.create_exclusive(".lease", b'{"owner": "a"}') is True
    other = make_remote(hub, f"hf://{repo_id}/run")
    assert other.create_exclusive(".lease", b'{"owner": "b"}') is False
    assert remote.create_exclusive(".lease", b'{"owner": "a"}') is False
    assert remote.read_bytes(".lease") == b'{"owner": "a"}'
    assert hub.commit_posts(repo_id) == 1


def test_lease_takeover_fences_the_old_writer(hub, repo_id, tmp_path):
    from syncckpt.errors import LeaseHeld
    from syncckpt.lease import Lease

    old = make_remote(hub, f"hf://{repo_id}/run")
    Lease(old, heartbeat=None).acquire()
    commit(old, tmp_path / "old", 1)
    new = make_remote(hub, f"hf://{repo_id}/run")
    with pytest.raises(LeaseHeld):
        Lease(new, heartbeat=None).acquire()
    Lease(new, heartbeat=None, takeover=True).acquire()
    with pytest.raises(RemoteConflict):
        commit(old, tmp_path / "old", 2)  # the takeover changed the run's folder: the old session is refused
    commit(new, tmp_path / "new", 2)
    assert new.list_checkpoints() == ["checkpoint-step-1", "checkpoint-step-2"]


def test_branch_and_squash(hub, repo_id, tmp_path):
    remote = make_remote(hub, f"hf://{repo_id}@dev/run", squash_every=2)
    commit(remote, tmp_path, 1)
    commit(remote, tmp_path, 2)
    assert len(hub.history(repo_id, branch="dev")) == 1  # squashed after the second commit
    commit(remote, tmp_path, 3)  # the next commit builds on the squashed head
    assert len(hub.history(repo_id, branch="dev")) == 2
    assert len(hub.history(repo_id, branch="main")) == 1
    assert remote.list_checkpoints() == ["checkpoint-step-1", "checkpoint-step-2", "checkpoint-step-3"]


def test_token_never_logged_or_in_messages(hub, repo_id, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    remote = make_remote(hub, f"hf://{repo_id}", storage_options={"token": TOKEN})
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTokenAlsoSecret999")  # the explicit token wins
    commit(remote, tmp_path, 1)
    hub.inject("commit", 503, count=FAST.attempts)
    with pytest.raises(RemoteError) as failed:
        commit(remote, tmp_path, 2)
    other = make_remote(hub, f"hf://{repo_id}", storage_options={"token": TOKEN})
    other.commit_checkpoint(*make_checkpoint(tmp_path / "b", 3))
    with pytest.raises(RemoteConflict) as conflict:
        commit(remote, tmp_path, 4)
    anonymous = make_remote(hub, f"hf://{repo_id}", storage_options={"token": "hf_wrongTokenAlsoSecret999"})
    with pytest.raises(RemoteError) as denied:
        commit(anonymous, tmp_path / "c", 5)
    texts = [caplog.text, str(failed.value), str(conflict.value), str(denied.value), repr(remote), remote.url]
    for text in texts:
        assert TOKEN not in text and "hf_wrongTokenAlsoSecret999" not in text


def test_token_from_saved_login(hub, repo_id, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "token").write_text(TOKEN)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    remote = make_remote(hub, f"hf://{repo_id}")
    assert remote.create_exclusive(".lease", b"x") and remote.read_bytes(".lease") == b"x"


@pytest.mark.parametrize(
    "url, options",
    [
        ("s3://bucket/run", None),
        ("hf://only-a-name", None),
        ("hf://buckets/user/b", None),
        ("hf://user/repo", {"tokn": "x"}),
        ("hf://datasets/user/repo", {"repo_type": "model"}),
    ],
)
def test_bad_urls_and_options(url, options):
    with pytest.raises(ConfigError):
        HubRemote(url, options)


def test_server_outage_is_retried_then_reported(hub, repo_id, tmp_path):
    remote = make_remote(hub, f"hf://{repo_id}")
    commit(remote, tmp_path, 1)
    hub.stop()
    try:
        with pytest.raises(RemoteError, match="could not open LATEST"):
            remote.read_bytes("LATEST")
    finally:
        hub.start()
    assert remote.read_latest().name == "checkpoint-step-1"


def test_branch_with_slash_keeps_a_round_trippable_url():
    remote = HubRemote("hf://user/repo@feat%2Fx/run")
    assert (remote.revision, remote.prefix) == ("feat/x", "run")
    assert HubRemote(remote.url).revision == "feat/x"


def test_dataset_url():
    remote = HubRemote("hf://datasets/user/repo/runs/a")
    assert (remote.repo_type, remote.repo_id, remote.prefix, remote.url) == (
        "dataset",
        "user/repo",
        "runs/a",
        "hf://datasets/user/repo/runs/a",
    )
