"""After an upload the store's own checksum vouches for it without a download: the manifest carries the CRC32C
computed while the file was written, and GCS (fake-gcs-server, through gcsfs) reports its CRC32C per object."""

from __future__ import annotations

import dataclasses
import io

import google_crc32c
import pytest

from syncckpt.errors import RemoteError
from syncckpt.local import write_file
from syncckpt.manifest import HashingWriter, Latest, Manifest, sha256_hex
from syncckpt.remote import open_remote


def test_hashing_writer_computes_the_crc32c_gcs_reports():
    w = HashingWriter(io.BytesIO())
    w.write(b"hello ")
    w.write(memoryview(b"world"))
    assert w.crc32c() == google_crc32c.Checksum(b"hello world").digest().hex()


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "checkpoint-step-3"
    folder.mkdir()
    entry = write_file(folder, "model.safetensors", [b"x" * 5000])
    manifest = Manifest("checkpoint-step-3", "step", 3, 0, 2, [entry])
    return folder, manifest


def test_gcs_upload_checked_against_the_store_crc32c(checkpoint, gcs_remote_url, gcs_storage_options):
    folder, manifest = checkpoint
    assert manifest.files[0].crc32c is not None
    remote = open_remote(gcs_remote_url, gcs_storage_options)
    data = manifest.to_bytes()
    remote.commit_checkpoint(manifest.name, folder, manifest, data, Latest(manifest.name, 3, sha256_hex(data)))
    assert remote.stat(f"{manifest.name}/model.safetensors").checksums.get("crc32c")
    remote.check_uploaded(manifest.name, manifest)  # sizes and CRC32C agree


def test_gcs_upload_with_a_different_crc32c_is_refused_before_the_manifest(
    checkpoint, gcs_remote_url, gcs_storage_options
):
    folder, manifest = checkpoint
    wrong = dataclasses.replace(manifest, files=[dataclasses.replace(manifest.files[0], crc32c="00000000")])
    remote = open_remote(gcs_remote_url, gcs_storage_options)
    data = wrong.to_bytes()
    with pytest.raises(RemoteError, match="CRC32C"):
        remote.commit_checkpoint(wrong.name, folder, wrong, data, Latest(wrong.name, 3, sha256_hex(data)))
    assert remote.list_checkpoints() == []  # no manifest was written: the checkpoint never looks complete
