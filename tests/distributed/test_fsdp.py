"""FSDP2 (DTensor) state through CheckpointManager under torchrun (2 processes, gloo, CPU): DCP shards written by
every rank and mirrored to moto S3, exact resume after the whole job is SIGKILLed, and a fresh session on an empty
disk resuming from the bucket: resharding with world size 2 -> 1, and (heavy) world size 2 after a SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_ddp import after_a_commit, run_job  # noqa: E402  (torchrun launcher that can SIGKILL the whole job)

from syncckpt.remote import open_remote  # noqa: E402

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("fsdp_job.py")
HEAVY = os.environ.get("SYNCCKPT_HEAVY") == "1"


def _remote_args(url: str, options: dict) -> list[str]:
    return ["--remote", url, "--storage-options", json.dumps(options)]


def same(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not diff, f"differs: {diff[:8]}"


@pytest.fixture(scope="module")
def bucket(s3_server) -> tuple[str, dict]:
    """The URL and storage options of a moto S3 run of this module's own: the reference run mirrors there."""
    name = f"fsdp-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return f"s3://{name}/run", s3_server.options()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bucket):
    d = tmp_path_factory.mktemp("fsdp-ref")
    args = ["--ckpt-dir", str(d / "ck"), "--dump", str(d / "ref.safetensors"), *_remote_args(*bucket)]
    lines, rc = run_job(args, job=JOB)
    assert rc == 0, "\n".join(lines[-300:])
    return d


def test_sharded_checkpoint_layout_locally_and_in_the_bucket(reference, bucket):
    manifest = json.loads((reference / "ck" / "checkpoint-step-8" / "manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert {"dcp/index.json", "dcp/shard-00000-of-00002.safetensors", "dcp/shard-00001-of-00002.safetensors"} <= paths
    assert manifest["world_size"] == 2
    store = open_remote(*bucket)
    assert store.read_latest().name == "checkpoint-step-8"
    mirrored, _ = store.read_manifest("checkpoint-step-8")
    assert {(f.path, f.sha256) for f in mirrored.files} == {(f["path"], f["sha256"]) for f in manifest["files"]}


def test_whole_job_sigkilled_then_resumed_is_bit_identical(tmp_path, reference):
    args = ["--ckpt-dir", str(tmp_path / "ck"), "--dump", str(tmp_path / "out.safetensors")]
    lines, rc = run_job(args, kill_when=after_a_commit, job=JOB)
    assert rc == -signal.SIGKILL
    lines, rc = run_job(args, job=JOB)
    assert rc == 0, "\n".join(lines[-300:])
    assert any("Resuming from checkpoint:" in ln for ln in lines)
    same(reference / "ref.safetensors", tmp_path / "out.safetensors")


def test_fresh_session_with_world_size_1_reshards_the_checkpoint_pulled_from_the_bucket(tmp_path, reference, bucket):
    out = tmp_path / "w1.safetensors"
    args = ["--ckpt-dir", str(tmp_path / "ck"), "--dump-after-resume", str(out), *_remote_args(*bucket)]
    lines, rc = run_job(args, job=JOB, nproc=1)  # an empty local directory: the bucket is all there is
    assert rc == 0, "\n".join(lines[-300:])
    assert any("Pulled checkpoint-step-8" in ln for ln in lines), "\n".join(lines[-300:])
    assert "resumed at 8" in lines
    same(reference / "ref.safetensors", out)


@pytest.mark.skipif(not HEAVY, reason="two more torchrun launches; SYNCCKPT_HEAVY=1 runs it")
def test_fresh_session_after_sigkill_resumes_bit_identical_from_the_bucket(
    tmp_path, reference, s3_remote_url, s3_storage_options
):
    ck = tmp_path / "ck"
    args = ["--ckpt-dir", str(ck), "--dump", str(tmp_path / "out.safetensors"), "--sync-saves"]
    args += _remote_args(s3_remote_url, s3_storage_options)
    # step 4 is mirrored before "step 4" is printed, and the job holds after "step 5" (step 6 would be saved)
    lines, rc = run_job([*args, "--hold-at", "5"], kill_when=lambda ls: ls[-1] == "step 5", job=JOB)
    assert rc == -signal.SIGKILL
    assert open_remote(s3_remote_url, s3_storage_options).read_latest().name == "checkpoint-step-4"
    shutil.rmtree(ck)  # a new VM: the local directory is gone
    lines, rc = run_job(args, job=JOB)
    assert rc == 0, "\n".join(lines[-300:])
    assert any("Pulled checkpoint-step-4" in ln for ln in lines), "\n".join(lines[-300:])
    same(reference / "ref.safetensors", tmp_path / "out.safetensors")
