"""S3 data files through obstore (syncckpt/remote/s3_direct.py), against moto behind the FaultProxy, whose log
of requests (with their headers) says which client sent what: obstore's User-Agent names ``object_store``.

Real parts only: moto's server, s3fs, obstore; a failure of the direct path is a real HTTP error the proxy
answers to obstore's requests.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from servers import S3_KEY, S3_SECRET, MotoS3Server, self_signed_cert

from syncckpt import local
from syncckpt.manifest import Latest, Manifest
from syncckpt.remote import open_remote

NAME = "checkpoint-step-3"
OBSTORE = "object_store"


def data_puts(proxy: FaultProxy, part: str) -> list[tuple[str, str, dict[str, str]]]:
    return [r for r in proxy.requests if r[0] in ("PUT", "POST") and part in r[1]]


def commit(remote: Any, folder: Path, files: dict[str, bytes], name: str = NAME) -> Manifest:
    entries = [local.write_file(folder, rel, [data]) for rel, data in files.items()]
    m = Manifest(name=name, kind="step", global_step=3, epoch=0, batch_idx=2, files=entries)
    remote.commit_checkpoint(name, folder, m, m.to_bytes(), Latest(name, 3, ""))
    return m


@pytest.fixture
def proxied(s3_server, s3_storage_options, fault_proxy) -> dict[str, Any]:
    options = s3_server.options()
    options["client_kwargs"]["endpoint_url"] = fault_proxy.url
    return options


def test_data_files_go_through_obstore_with_a_checked_sha256_and_arrive_exact(
    proxied, fault_proxy, s3_remote_url, tmp_path
):
    files = {"model.safetensors": os.urandom(70 << 20), "small.bin": os.urandom(1000), "empty.bin": b""}
    remote = open_remote(s3_remote_url, proxied)
    try:
        m = commit(remote, tmp_path / "src", files)
        got = remote.download_checkpoint(NAME, m, tmp_path / "down")
        assert got == {}
        for rel, data in files.items():
            assert (tmp_path / "down" / rel).read_bytes() == data
    finally:
        remote.close()
    model = data_puts(fault_proxy, "/model.safetensors")
    assert model and all(OBSTORE in h.get("user-agent", "") for _, _, h in model), model
    assert sum(1 for method, target, _ in model if method == "PUT" and "partNumber=" in target) == 3  # 32+32+6 MiB
    small = data_puts(fault_proxy, "/small.bin")
    assert len(small) == 1 and OBSTORE in small[0][2]["user-agent"]
    # plain http: no TLS, so each request carries the SHA-256 of its bytes for the store to check
    want = base64.b64encode(hashlib.sha256(files["small.bin"]).digest()).decode()
    assert small[0][2].get("x-amz-checksum-sha256") == want
    # everything but the data files stays with s3fs: the manifest and LATEST among them
    manifest = data_puts(fault_proxy, "/manifest.json")
    assert manifest and all(OBSTORE not in h.get("user-agent", "") for _, _, h in manifest)


def test_a_direct_path_that_fails_where_s3fs_succeeds_is_dropped_with_one_warning(
    proxied, fault_proxy, s3_remote_url, tmp_path, caplog
):
    fault_proxy.fail_agent(OBSTORE, "403")  # this store refuses obstore's requests and takes s3fs's
    files = {"model.safetensors": os.urandom(3 << 20), "optimizer.safetensors": os.urandom(2 << 20)}
    remote = open_remote(s3_remote_url, proxied)
    try:
        with caplog.at_level(logging.INFO, logger="syncckpt"):
            m = commit(remote, tmp_path / "src", files)
            remote.download_checkpoint(NAME, m, tmp_path / "down")
            assert any(OBSTORE in h.get("user-agent", "") for _, _, h in fault_proxy.requests)
            fault_proxy.requests.clear()
            commit(remote, tmp_path / "src2", files, name="checkpoint-step-4")  # the next save: s3fs only
    finally:
        remote.close()
    for rel, data in files.items():
        assert (tmp_path / "down" / rel).read_bytes() == data
    warnings = [r.getMessage() for r in caplog.records if "go through s3fs from now on" in r.getMessage()]
    assert len(warnings) == 1, caplog.text  # files sent side by side failed together: still one warning
    assert "403" in warnings[0] and S3_SECRET not in caplog.text
    assert data_puts(fault_proxy, "/checkpoint-step-4/")
    assert not any(OBSTORE in h.get("user-agent", "") for _, _, h in fault_proxy.requests)


@pytest.mark.parametrize("how", ["s3_additional_kwargs", "environment"])
def test_options_the_direct_path_does_not_translate_keep_every_upload_on_s3fs(
    how, proxied, fault_proxy, s3_remote_url, tmp_path, monkeypatch
):
    if how == "environment":
        monkeypatch.setenv("SYNCCKPT_S3_TRANSFER", "s3fs")
    else:
        proxied["s3_additional_kwargs"] = {"ServerSideEncryption": "AES256"}
    files = {"model.safetensors": os.urandom(1 << 20)}
    remote = open_remote(s3_remote_url, proxied)
    try:
        m = commit(remote, tmp_path / "src", files)
        remote.download_checkpoint(NAME, m, tmp_path / "down")
    finally:
        remote.close()
    assert (tmp_path / "down" / "model.safetensors").read_bytes() == files["model.safetensors"]
    puts = data_puts(fault_proxy, "/model.safetensors")
    assert puts and not any(OBSTORE in h.get("user-agent", "") for _, _, h in puts)
    if how == "s3_additional_kwargs":
        assert all(h.get("x-amz-server-side-encryption") == "AES256" for _, _, h in puts)


@pytest.mark.parametrize("where", ["options", "client_kwargs", "environment"])
def test_obstore_signs_with_the_credentials_s3fs_would_use(
    where, proxied, fault_proxy, s3_remote_url, tmp_path, monkeypatch
):
    # moto takes any signature, so what is checked is the key id each obstore request was signed with
    key = {"options": S3_KEY, "client_kwargs": "AKIACLIENTKWARGS", "environment": "AKIAFROMENVIRONMENT"}[where]
    proxied.pop("key"), proxied.pop("secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTTHISONE")  # what the environment holds when it must not win
    if where == "options":
        proxied |= {"key": S3_KEY, "secret": S3_SECRET}
    elif where == "client_kwargs":
        proxied["client_kwargs"] |= {"aws_access_key_id": key, "aws_secret_access_key": "client-secret"}
    else:  # botocore's chain: here the environment (a profile or an instance role resolve the same way)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    remote = open_remote(s3_remote_url, proxied)
    try:
        m = commit(remote, tmp_path / "src", {"model.safetensors": os.urandom(1 << 20)})
        remote.download_checkpoint(NAME, m, tmp_path / "down")
    finally:
        remote.close()
    signed = [h.get("authorization", "") for _, _, h in data_puts(fault_proxy, "/model.safetensors")]
    assert signed and all(OBSTORE in h.get("user-agent", "") for _, _, h in data_puts(fault_proxy, "/model.s"))
    assert all(f"Credential={key}/" in auth for auth in signed), signed


@pytest.mark.parametrize("verify", ["ca", False])
def test_over_https_with_a_private_ca_or_no_check_obstore_sends_without_a_second_hash(
    verify, s3_storage_options, tmp_path, caplog
):
    # moto over TLS with a self-signed certificate, as a MinIO with its own CA; the proxy speaks plain http only,
    # so here the remote itself says which path its uploads took
    server = MotoS3Server(tls=self_signed_cert(tmp_path / "tls")).start()
    try:
        server.create_bucket("tls-bucket")
        options = server.options()
        if verify is False:
            options["client_kwargs"]["verify"] = False
        files = {"model.safetensors": os.urandom(3 << 20)}
        remote = open_remote("s3://tls-bucket/run", options)
        try:
            with caplog.at_level(logging.INFO, logger="syncckpt"):
                m = commit(remote, tmp_path / "src", files)
                remote.download_checkpoint(NAME, m, tmp_path / "down")
            assert remote._direct is not None, caplog.text  # not dropped for s3fs
            assert "checksum_algorithm" not in remote._direct._store.config  # TLS protects the bytes
        finally:
            remote.close()
    finally:
        server.stop()
    assert (tmp_path / "down" / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert "go through s3fs" not in caplog.text


def test_a_store_that_fails_obstores_requests_for_a_while_is_retried_on_the_direct_path(
    proxied, fault_proxy, s3_remote_url, tmp_path, caplog
):
    # 503s through all of obstore's own tries (5: botocore's legacy default of 4 retries), so the upload fails:
    # the store's passing trouble, which syncckpt's retry policy retries on the same path; no reason to give
    # that path up
    fault_proxy.fail_agent(OBSTORE, "503", count=5)
    files = {"model.safetensors": os.urandom(1 << 20)}
    remote = open_remote(s3_remote_url, proxied)
    try:
        with caplog.at_level(logging.INFO, logger="syncckpt"):
            m = commit(remote, tmp_path / "src", files)
            remote.download_checkpoint(NAME, m, tmp_path / "down")
        assert remote._direct is not None
    finally:
        remote.close()
    assert (tmp_path / "down" / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert "go through s3fs" not in caplog.text, caplog.text
    puts = data_puts(fault_proxy, "/model.safetensors")
    assert len(puts) == 6 and all(OBSTORE in h.get("user-agent", "") for _, _, h in puts), puts
    assert "upload" in caplog.text and "503" in caplog.text  # the policy's retry, logged as one


def test_a_push_someone_watches_reports_progress_as_obstore_takes_the_bytes_not_at_the_files_end(
    proxied, fault_proxy, s3_remote_url, tmp_path
):
    """``syncckpt push`` shows a byte bar: with the direct path a 70 MiB file (three 32 MiB parts) is reported
    8 MiB at a time as obstore takes it, the first report before any part is answered, and the total is the
    data's size, once. Without a watcher (the background mirror) nothing changes: it goes from a mapping."""
    files = {"model.safetensors": os.urandom(70 << 20), "state.json": b"{}"}
    remote = open_remote(s3_remote_url, proxied)
    reports: list[tuple[int, int]] = []  # (bytes reported, model parts answered by then)

    def progress(n: int) -> None:
        answered = [t for m, t, s in fault_proxy.answered if m == "PUT" and "/model.safetensors?" in t]
        reports.append((n, len(answered)))

    try:
        entries = [local.write_file(tmp_path / "src", rel, [data]) for rel, data in files.items()]
        m = Manifest(name=NAME, kind="step", global_step=3, epoch=0, batch_idx=2, files=entries)
        remote.commit_checkpoint(NAME, tmp_path / "src", m, m.to_bytes(), Latest(NAME, 3, ""), progress=progress)
        got = remote.download_checkpoint(NAME, m, tmp_path / "down")
        assert got == {} and (tmp_path / "down" / "model.safetensors").read_bytes() == files["model.safetensors"]
    finally:
        remote.close()
    model = data_puts(fault_proxy, "/model.safetensors")
    assert all(OBSTORE in h.get("user-agent", "") for _, _, h in model), model
    assert sum(n for n, _ in reports) == m.total_size
    assert len(reports) >= 9 and max(n for n, _ in reports) <= 8 << 20, reports
    assert reports[0][1] == 0, reports  # the bar moved before the first part was answered
