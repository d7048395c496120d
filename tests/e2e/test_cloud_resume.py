"""Fresh-session resume from a remote: train, SIGKILL once checkpoints reached the bucket, wipe the local
directory (the Kaggle VM is gone), start again: the run resumes from the remote, bit-identical."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procs import assert_same_tensors, run_and_kill, run_to_end  # noqa: E402

from syncckpt.local import list_checkpoints  # noqa: E402
from syncckpt.remote import open_remote  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    run_to_end(["--ckpt-dir", str(d / "ck"), "--out", str(d / "ref.safetensors")])
    return d / "ref.safetensors"


@pytest.fixture(params=["file", "s3", "gcs"])
def remote(request, tmp_path):
    if request.param == "file":
        return (tmp_path / "bucket" / "run").as_uri(), None
    url = request.getfixturevalue(f"{request.param}_remote_url")
    return url, request.getfixturevalue(f"{request.param}_storage_options")


def mirrored(lines: list[str]) -> list[str]:
    return [ln.split("Mirrored ", 1)[1].split(" ", 1)[0] for ln in lines if "Mirrored " in ln]


def test_fresh_session_resumes_from_remote_bit_identical(tmp_path, reference, remote):
    url, options = remote
    ck, out = tmp_path / "ck", tmp_path / "out.safetensors"
    # Steps take 50 ms (a stand-in for accelerator time) so the uploads keep up and the kill lands mid-training.
    args = ["--ckpt-dir", str(ck), "--out", str(out), "--remote", url, "--step-sleep", "0.05"]
    if options:
        args += ["--storage-options", json.dumps(options)]
    lines, rc = run_and_kill(args, lambda ls: len([m for m in mirrored(ls) if "step" in m]) >= 3)
    assert rc == -9, lines[-10:]
    last_mirrored = [m for m in mirrored(lines) if m.startswith("checkpoint-step-")][-1]
    shutil.rmtree(ck)  # the session's disk is gone

    out_text = run_to_end(args + ["--poison-pickle"])
    resumed = [ln for ln in out_text.splitlines() if "Resuming from global step" in ln]
    assert resumed, out_text[-2000:]
    assert int(resumed[0].rsplit(" ", 1)[1]) >= int(last_mirrored.rsplit("-", 1)[1])
    assert "Pulled " in out_text
    assert_same_tensors(reference, out)

    # Nothing local that matters is missing remotely: the queue may skip a step checkpoint that a newer one
    # overtook while it waited (steps here are 100 ms apart), never an epoch checkpoint or the newest step one.
    # Remote retention left exactly what its rule keeps.
    r = open_remote(url, options)
    remote_names = set(r.list_checkpoints())
    local_names = {c.name for c in list_checkpoints(ck)}
    steps = sorted((n for n in local_names if n.startswith("checkpoint-step-")), key=lambda n: int(n.rsplit("-", 1)[1]))
    assert (local_names - set(steps)) | {steps[-1]} <= remote_names
    assert remote_names == {"checkpoint-step-16", "checkpoint-step-18", "checkpoint-epoch-1", "checkpoint-epoch-2"} or (
        len([n for n in remote_names if "step" in n]) == 2 and len([n for n in remote_names if "epoch" in n]) == 2
    )
    assert r.read_latest().name == "checkpoint-epoch-2"  # same global step as step-18; taken after it


def test_remote_holds_exactly_what_local_retention_keeps(tmp_path, s3_remote_url, s3_storage_options):
    ck = tmp_path / "ck"
    run_to_end(
        [
            "--ckpt-dir",
            str(ck),
            "--out",
            str(tmp_path / "o.safetensors"),
            "--remote",
            s3_remote_url,
            "--storage-options",
            json.dumps(s3_storage_options),
            "--keep-last",
            "1",
        ]
    )
    r = open_remote(s3_remote_url, s3_storage_options)
    local_names = sorted(c.name for c in list_checkpoints(ck))
    assert local_names == ["checkpoint-epoch-1", "checkpoint-epoch-2", "checkpoint-step-18"]
    assert sorted(r.list_checkpoints()) == local_names
    assert r.read_latest().name == "checkpoint-epoch-2"  # same global step as step-18; taken after it
