"""The Hub flow end to end: train with remote="hf://USER/REPO", lose the session (SIGKILL + wiped disk), resume
in a fresh one from the Hub, bit-identical; one commit per mirrored checkpoint (plus the lease's own commits).

huggingface_hub's real client talks to tests/hub_server.py (no Hub is reachable from here). The subprocesses get
HF_ENDPOINT/HF_TOKEN and HF_HUB_DISABLE_XET=1 (the test server speaks plain LFS, not Xet).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from hub_server import TOKEN, USER, HubServer  # noqa: E402
from procs import assert_same_tensors, run_and_kill, run_to_end  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hub():
    with HubServer(lfs_threshold=4096) as server:
        yield server


@pytest.fixture
def hub_env(hub, monkeypatch):
    for k, v in {
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "0",
    }.items():
        monkeypatch.setenv(k, v)
    return hub


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    run_to_end(["--ckpt-dir", str(d / "ck"), "--out", str(d / "ref.safetensors")])
    return d / "ref.safetensors"


def test_fresh_session_resumes_from_the_hub(tmp_path, hub_env, reference):
    repo = f"{USER}/nli-run"
    ck, out = tmp_path / "ck", tmp_path / "out.safetensors"
    args = [
        "--ckpt-dir",
        str(ck),
        "--out",
        str(out),
        "--remote",
        f"hf://{repo}",
        "--storage-options",
        json.dumps({"endpoint": hub_env.url}),
        "--remote-options",
        json.dumps({"min_commit_interval": 0}),
    ]
    lines, rc = run_and_kill(args, lambda ls: sum("Mirrored checkpoint-step" in ln for ln in ls) >= 2)
    assert rc == -9
    first_commits = hub_env.commit_posts(repo)
    first_mirrored = sum("Mirrored " in ln for ln in lines)
    assert hub_env.is_private(repo)
    # one commit per mirrored checkpoint, plus the lease's create (the killed session never released it)
    assert first_commits <= first_mirrored + 1 + 1, (first_commits, first_mirrored)
    shutil.rmtree(ck)

    text = run_to_end(args + ["--poison-pickle"])
    assert "Pulled checkpoint-step-" in text and "Resuming from checkpoint:" in text
    assert_same_tensors(reference, out)
    files = hub_env.files(repo)
    assert "LATEST" in files and json.loads(files["LATEST"])["name"] == "checkpoint-epoch-2"  # step 18 too
    assert "LEASE" not in files  # released on close
