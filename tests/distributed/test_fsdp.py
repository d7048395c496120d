"""FSDP2 (DTensor) state through CheckpointManager under torchrun (2 processes, gloo, CPU): DCP shards written by
every rank, exact resume after the whole job is SIGKILLed, and resharding on resume with world size 2 -> 1."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_ddp import run_job  # noqa: E402  (torchrun launcher that can SIGKILL the whole process group)

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("fsdp_job.py")


def same(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not diff, f"differs: {diff[:8]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp-ref")
    lines, rc = run_job(["--ckpt-dir", str(d / "ck"), "--dump", str(d / "ref.safetensors")], job=JOB)
    assert rc == 0, "\n".join(lines[-30:])
    return d


def test_sharded_checkpoint_layout(reference):
    import json

    manifest = json.loads((reference / "ck" / "checkpoint-step-8" / "manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert {"dcp/index.json", "dcp/shard-00000-of-00002.safetensors", "dcp/shard-00001-of-00002.safetensors"} <= paths
    assert manifest["world_size"] == 2


def test_whole_job_sigkilled_then_resumed_is_bit_identical(tmp_path, reference):
    args = ["--ckpt-dir", str(tmp_path / "ck"), "--dump", str(tmp_path / "out.safetensors")]
    lines, rc = run_job(args, kill_when=lambda ls: ls[-1] == "step 5", job=JOB)
    assert rc == -signal.SIGKILL
    lines, rc = run_job(args, job=JOB)
    assert rc == 0, "\n".join(lines[-30:])
    assert any("Resuming from checkpoint:" in ln for ln in lines)
    same(reference / "ref.safetensors", tmp_path / "out.safetensors")


def test_resume_with_world_size_1_reshards(tmp_path, reference):
    out = tmp_path / "w1.safetensors"
    lines, rc = run_job(["--ckpt-dir", str(reference / "ck"), "--dump-after-resume", str(out)], job=JOB, nproc=1)
    assert rc == 0, "\n".join(lines[-30:])
    assert "resumed at 8" in lines
    same(reference / "ref.safetensors", out)
