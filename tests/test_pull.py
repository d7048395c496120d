"""Remote -> local: listing a run (LATEST only a hint), and pulling one checkpoint, verified while it streams,
into a hidden ``.pull-*`` folder that becomes visible by rename only once everything checked out.

Runs are file:// folders (so a test can damage an object the way a broken disk or a hostile writer would), an
incremental run written by the real uploader, and S3 (moto) behind the fault proxy where a request must stall
or the store must be unreachable.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy

from syncckpt import local, quarantine
from syncckpt.errors import CheckpointCorrupt, RemoteError, UnsafeCheckpoint
from syncckpt.manifest import LATEST_NAME, Latest, Manifest, parse_checkpoint_name, sha256_hex
from syncckpt.pull import pull, pull_or_reuse, remote_candidates, remote_listing, split_checkpoint_url
from syncckpt.remote import open_remote
from syncckpt.remote.base import Remote
from syncckpt.remote.retry import RetryPolicy
from syncckpt.uploader import Uploader

QUICK = RetryPolicy(attempts=3, initial_wait=0.01, max_wait=0.05, max_total=30)


def files_for(name: str) -> dict[str, bytes]:
    rng = random.Random(name)
    return {
        "model.safetensors": rng.randbytes(40_000),
        "optimizer.safetensors": rng.randbytes(20_000),
        "state.json": b'{"name": "%s"}' % name.encode(),
    }


def commit_local(directory: Path, name: str) -> Manifest:
    kind, number = parse_checkpoint_name(name)
    step = number if kind == "step" else 50

    def write(tmp: Path) -> list[local.FileEntry]:
        return [local.write_file(tmp, rel, [data]) for rel, data in files_for(name).items()]

    return local.commit(directory, Manifest(name, kind, step, 0, -1, files=[]), write)


def publish(remote: Remote, source: Path, name: str, *, latest: bool = True) -> bytes:
    """Commit ``name`` locally under ``source``, then to the remote (LATEST naming it); its manifest bytes."""
    m = commit_local(source, name)
    mb = (source / name / "manifest.json").read_bytes()
    hint = Latest(name, m.global_step, sha256_hex(mb)) if latest else None
    remote.commit_checkpoint(name, source / name, m, mb, hint)
    return mb


@pytest.fixture
def run(tmp_path: Path) -> Remote:
    r = open_remote((tmp_path / "bucket" / "run").as_uri(), retry=QUICK)
    yield r
    r.close()


def warnings_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def eventually(predicate, timeout: float) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.005)
    return True


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def flip_byte(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


# ---- remote_listing / remote_candidates ------------------------------------------------------------------------
def test_the_listing_names_every_checkpoint_with_its_manifest_digest(run: Remote, tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING, logger="syncckpt")
    digests = {
        n: sha256_hex(publish(run, tmp_path / "src", n))
        for n in ("checkpoint-step-10", "checkpoint-epoch-0", "checkpoint-step-20")
    }
    listing = remote_listing(run)
    assert listing.listed
    assert {c.name: c.manifest_sha256 for c in listing.candidates} == digests
    assert all(c.location == "remote" and c.healthy for c in listing.candidates)
    step20 = next(c for c in listing.candidates if c.name == "checkpoint-step-20")
    assert (step20.kind, step20.global_step) == ("step", 20)
    assert sorted(listing.manifests) == sorted(digests)
    assert listing.unreadable == {} and listing.quarantined == []
    assert warnings_text(caplog) == ""  # LATEST names step-20 with the right digest

    candidates, manifests = remote_candidates(run)
    assert candidates == listing.candidates and manifests == listing.manifests


def test_an_empty_run_lists_nothing_and_warns_about_nothing(run: Remote, caplog):
    caplog.set_level(logging.WARNING, logger="syncckpt")
    listing = remote_listing(run)
    assert listing.listed and listing.candidates == [] and listing.manifests == {}
    assert warnings_text(caplog) == ""


def test_a_missing_latest_is_warned_about_and_the_listing_wins(run: Remote, tmp_path: Path, caplog):
    publish(run, tmp_path / "src", "checkpoint-step-10", latest=False)
    caplog.set_level(logging.WARNING, logger="syncckpt")
    listing = remote_listing(run)
    assert [c.name for c in listing.candidates] == ["checkpoint-step-10"]
    assert f"{run.url}/LATEST is missing or damaged; found checkpoints by listing" in warnings_text(caplog)


def test_a_damaged_latest_reads_as_missing(run: Remote, tmp_path: Path, caplog):
    publish(run, tmp_path / "src", "checkpoint-step-10")
    run.write_bytes(LATEST_NAME, b"\x00garbage")
    caplog.set_level(logging.WARNING, logger="syncckpt")
    assert [c.name for c in remote_listing(run).candidates] == ["checkpoint-step-10"]
    assert "LATEST is missing or damaged" in warnings_text(caplog)


def test_a_stale_latest_naming_an_absent_checkpoint_is_warned_about(run: Remote, tmp_path: Path, caplog):
    publish(run, tmp_path / "src", "checkpoint-step-10")
    run.write_bytes(LATEST_NAME, Latest("checkpoint-step-30", 30, "0" * 64).to_bytes())
    caplog.set_level(logging.WARNING, logger="syncckpt")
    assert [c.name for c in remote_listing(run).candidates] == ["checkpoint-step-10"]
    assert "LATEST points at checkpoint-step-30, which is missing or incomplete" in warnings_text(caplog)


def test_a_latest_with_the_wrong_digest_is_warned_about_and_the_manifest_trusted(run: Remote, tmp_path: Path, caplog):
    mb = publish(run, tmp_path / "src", "checkpoint-step-10")
    run.write_bytes(LATEST_NAME, Latest("checkpoint-step-10", 10, "f" * 64).to_bytes())
    caplog.set_level(logging.WARNING, logger="syncckpt")
    [c] = remote_listing(run).candidates
    assert c.manifest_sha256 == sha256_hex(mb)
    assert "LATEST does not match the manifest of checkpoint-step-10 (wrong digest)" in warnings_text(caplog)


def test_a_checkpoint_whose_manifest_does_not_parse_is_unreadable_not_a_candidate(run: Remote, tmp_path: Path, caplog):
    publish(run, tmp_path / "src", "checkpoint-step-10")
    publish(run, tmp_path / "src", "checkpoint-step-20")
    run.write_bytes("checkpoint-step-20/manifest.json", b'{"format": "syncckpt", "truncat')
    caplog.set_level(logging.WARNING, logger="syncckpt")
    listing = remote_listing(run)
    assert [c.name for c in listing.candidates] == ["checkpoint-step-10"]
    digest, reason = listing.unreadable["checkpoint-step-20"]
    assert digest == sha256_hex(b'{"format": "syncckpt", "truncat') and "not valid JSON" in reason
    assert "Skipping remote checkpoint" in warnings_text(caplog)


def test_a_manifest_describing_another_checkpoint_is_not_a_candidate(run: Remote, tmp_path: Path):
    mb = publish(run, tmp_path / "src", "checkpoint-step-10")
    publish(run, tmp_path / "src", "checkpoint-step-20")
    run.write_bytes("checkpoint-step-20/manifest.json", mb)  # a copied manifest: it names step-10
    listing = remote_listing(run)
    assert [c.name for c in listing.candidates] == ["checkpoint-step-10"]
    assert "describes 'checkpoint-step-10'" in listing.unreadable["checkpoint-step-20"][1]


def test_quarantined_checkpoints_are_listed_aside_until_committed_anew(run: Remote, tmp_path: Path, caplog):
    mb = publish(run, tmp_path / "src", "checkpoint-step-10")
    publish(run, tmp_path / "src", "checkpoint-step-20")
    quarantine.quarantine_remote(
        run,
        "checkpoint-step-20",
        sha256_hex(run.read_manifest("checkpoint-step-20")[1]),
        "model.safetensors: SHA-256 mismatch",
    )
    run.write_bytes(LATEST_NAME, Latest("checkpoint-step-10", 10, sha256_hex(mb)).to_bytes())
    caplog.set_level(logging.WARNING, logger="syncckpt")
    listing = remote_listing(run)
    assert [c.name for c in listing.candidates] == ["checkpoint-step-10"]
    assert [(q.name, q.reason) for q in listing.quarantined] == [
        ("checkpoint-step-20", "model.safetensors: SHA-256 mismatch")
    ]
    assert "checkpoint-step-20" in listing.index and "checkpoint-step-20" not in listing.manifests
    assert warnings_text(caplog) == ""

    # The same name committed again with another manifest: the index entry is stale, the checkpoint is back.
    other = tmp_path / "other"
    m = commit_local(other, "checkpoint-step-20")
    m.extra["retrained"] = True
    run.commit_checkpoint(m.name, other / m.name, m, m.to_bytes(), None)
    assert sorted(c.name for c in remote_listing(run).candidates) == ["checkpoint-step-10", "checkpoint-step-20"]


def test_a_store_that_cannot_be_listed_reads_as_not_listed_unless_strict(
    fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str, caplog
):
    r = open_remote(s3_remote_url, fault_s3_storage_options, retry=RetryPolicy(attempts=2, initial_wait=0.01))
    fault_proxy.down()
    try:
        caplog.set_level(logging.WARNING, logger="syncckpt")
        listing = remote_listing(r)
        assert listing.listed is False and listing.candidates == []
        assert "resuming from local checkpoints only" in warnings_text(caplog)
        with pytest.raises(RemoteError, match="gave up after retries"):
            remote_listing(r, strict=True)
    finally:
        fault_proxy.up()
    assert remote_listing(r).listed


# ---- pull ------------------------------------------------------------------------------------------------------
def test_pull_places_a_verified_copy_and_returns_its_bytes(run: Remote, tmp_path: Path):
    publish(run, tmp_path / "src", "checkpoint-step-10")
    dest = tmp_path / "dest"
    manifest, files, path = pull(run, "checkpoint-step-10", dest, progress=False)
    assert path == dest / "checkpoint-step-10" and visible(dest) == ["checkpoint-step-10"]
    assert files == files_for("checkpoint-step-10")
    on_disk, verified = local.verify(path)
    assert on_disk == manifest and verified == files
    assert [c.name for c in local.list_checkpoints(dest)] == ["checkpoint-step-10"]


def test_pull_uses_a_manifest_it_is_given_from_the_listing(run: Remote, tmp_path: Path):
    publish(run, tmp_path / "src", "checkpoint-step-10")
    listing = remote_listing(run)
    manifest, files, _ = pull(
        run, "checkpoint-step-10", tmp_path / "dest", manifest=listing.manifests["checkpoint-step-10"], progress=False
    )
    assert manifest.files == listing.manifests["checkpoint-step-10"].files
    assert files == files_for("checkpoint-step-10")


def test_pull_replaces_an_older_local_copy_of_the_same_name(run: Remote, tmp_path: Path):
    publish(run, tmp_path / "src", "best_model")
    dest = tmp_path / "dest"
    (dest / "best_model").mkdir(parents=True)
    (dest / "best_model" / "stale.bin").write_bytes(b"old best")
    _, files, path = pull(run, "best_model", dest, progress=False)
    assert visible(dest) == ["best_model"]  # no .old-* or .pull-* left behind
    assert sorted(p.name for p in path.iterdir()) == sorted([*files, "manifest.json"])
    local.verify(path)


def test_pull_or_reuse_downloads_only_what_is_not_already_there_and_verified(run: Remote, tmp_path: Path):
    publish(run, tmp_path / "src", "checkpoint-step-10")
    manifest = remote_listing(run).manifests["checkpoint-step-10"]
    dest = tmp_path / "dest"
    downloads = []
    real = run.download_checkpoint
    run.download_checkpoint = lambda *a, **kw: downloads.append(a[0]) or real(*a, **kw)  # counts; the real call
    first = pull_or_reuse(run, "checkpoint-step-10", dest, manifest)
    again = pull_or_reuse(run, "checkpoint-step-10", dest, manifest)
    assert (first[3], again[3], downloads) == (True, False, ["checkpoint-step-10"])
    assert again[1] == files_for("checkpoint-step-10") and again[2] == dest / "checkpoint-step-10"
    flip_byte = dest / "checkpoint-step-10" / "model.safetensors"
    data = bytearray(flip_byte.read_bytes())
    data[100] ^= 1
    flip_byte.write_bytes(bytes(data))
    _, files, path, downloaded = pull_or_reuse(run, "checkpoint-step-10", dest, manifest)  # damaged: pulled anew
    assert downloaded and len(downloads) == 2 and files == files_for("checkpoint-step-10")
    local.verify(path)


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated", "longer", "missing"])
def test_a_damaged_file_is_refused_and_leaves_no_folder_behind(run: Remote, tmp_path: Path, damage: str):
    publish(run, tmp_path / "src", "checkpoint-step-10")
    rel = "checkpoint-step-10/optimizer.safetensors"
    data = run.read_bytes(rel, max_size=1 << 20)
    if damage == "missing":
        run.delete(rel)
    else:
        run.write_bytes(rel, {"flipped-byte": flip_byte(data), "truncated": data[:-1], "longer": data + b"\0"}[damage])
    dest = tmp_path / "dest"
    with pytest.raises(CheckpointCorrupt) as excinfo:
        pull(run, "checkpoint-step-10", dest, progress=False)
    assert "optimizer.safetensors" in str(excinfo.value) or damage == "missing"
    assert run.url in str(excinfo.value)
    assert visible(dest) == []  # neither the checkpoint nor its hidden download folder


def test_a_failed_pull_leaves_an_existing_local_copy_untouched(run: Remote, tmp_path: Path):
    publish(run, tmp_path / "src", "checkpoint-step-10")
    dest = tmp_path / "dest"
    pull(run, "checkpoint-step-10", dest, progress=False)
    rel = "checkpoint-step-10/model.safetensors"
    run.write_bytes(rel, flip_byte(run.read_bytes(rel, max_size=1 << 20)))
    with pytest.raises(CheckpointCorrupt, match="model.safetensors"):
        pull(run, "checkpoint-step-10", dest, progress=False)
    assert visible(dest) == ["checkpoint-step-10"]
    local.verify(dest / "checkpoint-step-10")


def test_a_manifest_with_a_path_outside_the_checkpoint_is_refused_before_any_download(run: Remote, tmp_path: Path):
    publish(run, tmp_path / "src", "checkpoint-step-10")
    m, _ = run.read_manifest("checkpoint-step-10")
    hostile = Manifest(
        m.name,
        m.kind,
        m.global_step,
        m.epoch,
        m.batch_idx,
        files=[*m.files, local.FileEntry("../../outside.txt", 1, "0" * 64)],
    )
    with pytest.raises(UnsafeCheckpoint):
        pull(run, "checkpoint-step-10", tmp_path / "dest", manifest=hostile, progress=False)
    assert not (tmp_path / "outside.txt").exists()
    assert visible(tmp_path / "dest") == []


def test_an_incremental_run_is_pulled_as_plain_files(tmp_path: Path):
    url = (tmp_path / "bucket" / "run").as_uri()
    src = tmp_path / "src"
    m = commit_local(src, "checkpoint-step-10")
    uploader = Uploader(url, incremental=True)
    try:
        uploader.submit(src, m)
        assert uploader.wait(30)
    finally:
        uploader.close()
    r = open_remote(url)
    stored, _ = r.read_manifest("checkpoint-step-10")
    assert all(e.parts for e in stored.files) and r.list_blobs()  # the store holds parts, not files
    manifest, files, path = pull(r, "checkpoint-step-10", tmp_path / "dest", progress=False)
    assert files == files_for("checkpoint-step-10")
    assert all(e.parts is None for e in manifest.files)  # the local manifest describes plain files
    assert local.verify(path)[0] == manifest


def test_while_a_pull_is_in_flight_only_a_hidden_folder_exists(
    fault_proxy: FaultProxy, fault_s3_storage_options: dict[str, Any], s3_remote_url: str, tmp_path: Path
):
    r = open_remote(s3_remote_url, fault_s3_storage_options, max_workers=1, retry=QUICK)
    publish(r, tmp_path / "src", "checkpoint-step-10")
    manifest, _ = r.read_manifest("checkpoint-step-10")
    dest = tmp_path / "dest"
    # Let three requests through, then stall one (longer than the client's read timeout: it is retried).
    fault_proxy.inject("pass", "pass", "pass", "stall")
    result: dict[str, Any] = {}

    def run_pull() -> None:
        try:
            result["out"] = pull(r, "checkpoint-step-10", dest, manifest=manifest, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            result["error"] = e

    t = threading.Thread(target=run_pull)
    t.start()
    stalled = eventually(lambda: fault_proxy.counts["stall"] == 1, timeout=30)  # the proxy offers no event
    seen = visible(dest)
    t.join(60)
    assert stalled and not t.is_alive() and "error" not in result, result
    assert len(seen) == 1 and seen[0].startswith(".pull-checkpoint-step-10-"), seen
    assert visible(dest) == ["checkpoint-step-10"]
    assert result["out"][1] == files_for("checkpoint-step-10")


# ---- split_checkpoint_url --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url, expected",
    [
        ("s3://b/run/checkpoint-step-5", ("s3://b/run", "checkpoint-step-5")),
        ("s3://b/run/checkpoint-step-5/", ("s3://b/run", "checkpoint-step-5")),
        ("gs://b/runs/x/best_model", ("gs://b/runs/x", "best_model")),
        ("hf://user/repo/checkpoint-epoch-2", ("hf://user/repo", "checkpoint-epoch-2")),
        ("s3://b/run", ("s3://b/run", None)),
        ("s3://b/run/", ("s3://b/run", None)),
        ("s3://b/run/checkpoint-step-x", ("s3://b/run/checkpoint-step-x", None)),
    ],
)
def test_a_checkpoint_url_splits_into_its_run_and_name(url: str, expected: tuple[str, str | None]):
    assert split_checkpoint_url(url) == expected
