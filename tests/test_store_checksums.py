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
    w = HashingWriter(io.BytesIO(), crc32c=True)
    w.write(b"hello ")
    w.write(memoryview(b"world"))
    assert w.crc32c() == google_crc32c.Checksum(b"hello world").digest().hex()


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "checkpoint-step-3"
    folder.mkdir()
    entry = write_file(folder, "model.safetensors", [b"x" * 5000], crc32c=True)
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


def _save_one(directory, remote, options):
    import torch

    from syncckpt import CheckpointManager

    model = torch.nn.Linear(4, 2)
    with CheckpointManager(directory, remote=remote, storage_options=options, handle_sigterm=False) as mgr:
        mgr.register(model=model)
        mgr.save(1, epoch=0, batch_idx=0)
        assert mgr.wait()
    return Manifest.from_bytes((directory / "checkpoint-step-1" / "manifest.json").read_bytes())


def test_manager_records_crc32c_only_for_a_store_that_checks_it(
    tmp_path, gcs_remote_url, gcs_storage_options, s3_remote_url, s3_storage_options
):
    gcs = _save_one(tmp_path / "gcs", gcs_remote_url, gcs_storage_options)
    assert all(f.crc32c for f in gcs.files)
    remote = open_remote(gcs_remote_url, gcs_storage_options)
    assert remote.keeps_crc32c
    remote.check_uploaded(gcs.name, gcs)  # the store's CRC32C agrees with every file's
    s3 = _save_one(tmp_path / "s3", s3_remote_url, s3_storage_options)
    assert not open_remote(s3_remote_url, s3_storage_options).keeps_crc32c
    assert [f.crc32c for f in s3.files] == [None] * len(s3.files)  # no copy of every byte for a CRC S3 never checks
    assert [f.crc32c for f in _save_one(tmp_path / "local", None, None).files] == [None] * len(s3.files)
