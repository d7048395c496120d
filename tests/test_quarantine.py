"""Quarantine records: a local folder moved aside with its reason, and the remote index keyed by manifest digest."""

from __future__ import annotations

import json

import pytest

from syncckpt import local, quarantine
from syncckpt.errors import UnsafeCheckpoint
from syncckpt.remote import open_remote


def test_a_quarantined_folder_leaves_every_listing_and_keeps_its_files(tmp_path):
    (tmp_path / "checkpoint-step-15").mkdir()
    (tmp_path / "checkpoint-step-15" / "model.safetensors").write_bytes(b"damaged")
    q = quarantine.quarantine_local(tmp_path, "checkpoint-step-15", "model.safetensors: SHA-256 mismatch")
    assert q is not None and not (tmp_path / "checkpoint-step-15").exists()
    assert (tmp_path / q.where.split("/")[-1] / "model.safetensors").read_bytes() == b"damaged"
    assert local.list_checkpoints(tmp_path) == []
    assert local.cleanup_leftovers(tmp_path) == []  # leftover cleanup never removes a quarantined folder
    [listed] = quarantine.list_local(tmp_path)
    assert (listed.name, listed.reason, listed.location) == ("checkpoint-step-15", q.reason, "local")


def test_the_same_step_quarantined_twice_keeps_both_copies(tmp_path):
    for _ in range(2):
        (tmp_path / "checkpoint-step-15").mkdir()
        assert quarantine.quarantine_local(tmp_path, "checkpoint-step-15", "bad") is not None
    assert len(quarantine.list_local(tmp_path)) == 2
    assert len(quarantine.delete_local(tmp_path, "checkpoint-step-15")) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_folder_renamed_without_its_reason_is_still_listed(tmp_path):
    # A kill between the rename and writing QUARANTINE.json.
    (tmp_path / ".quarantine-checkpoint-step-7-20261201T000000").mkdir()
    [q] = quarantine.list_local(tmp_path)
    assert q.name == "checkpoint-step-7" and "interrupted" in q.reason


def test_quarantine_refuses_names_that_are_not_checkpoints(tmp_path):
    with pytest.raises(UnsafeCheckpoint):
        quarantine.quarantine_local(tmp_path, "../etc", "x")
    assert quarantine.quarantine_local(tmp_path, "checkpoint-step-1", "gone already") is None


def test_the_remote_index_is_keyed_by_manifest_digest(tmp_path):
    remote = open_remote((tmp_path / "run").as_uri())
    quarantine.quarantine_remote(remote, "checkpoint-step-15", "a" * 64, "flipped byte")
    index = quarantine.read_index(remote)
    assert quarantine.is_quarantined(index, "checkpoint-step-15", "a" * 64)
    assert not quarantine.is_quarantined(index, "checkpoint-step-15", "b" * 64)  # committed anew: not quarantined
    listed = quarantine.list_remote(index, remote.url, {"checkpoint-step-15": "a" * 64})
    assert [(q.name, q.reason) for q in listed] == [("checkpoint-step-15", "flipped byte")]
    assert quarantine.list_remote(index, remote.url, {"checkpoint-step-15": "b" * 64}) == []
    quarantine.unmark_remote(remote, "checkpoint-step-15")
    assert quarantine.read_index(remote) == {}
    assert not (tmp_path / "run" / quarantine.INDEX_NAME).exists()  # an empty index is deleted


def test_a_damaged_index_hides_nothing(tmp_path, caplog):
    remote = open_remote((tmp_path / "run").as_uri())
    remote.write_bytes(quarantine.INDEX_NAME, b"{not json")
    assert quarantine.read_index(remote) == {}
    assert "QUARANTINE.json is damaged" in caplog.text
    remote.write_bytes(quarantine.INDEX_NAME, json.dumps({"../x": {"manifest_sha256": "a"}, "x": 1}).encode())
    assert quarantine.read_index(remote) == {}  # names that are not checkpoints and malformed entries are dropped
