"""A crash after a checkpoint's data went to the store early (while it was written), before its manifest.

Each session is a real process. The first saves step 1 and mirrors it. The second resumes, saves step 2 with the
mirror idle, so its data goes early, and kills itself at the ``remote-early-data`` failpoint once the first file is
in the store: the local commit may or may not have happened, no manifest was written. The store must then list
only step 1, verified, with LATEST naming it, while step 2's objects sit there unlisted; the third session must
mirror step 2, verified, over those leftovers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from storage_checks import audit_local, audit_remote

from syncckpt._failpoints import EARLY_NAMES
from syncckpt.remote import open_remote

HEAVY = os.environ.get("SYNCCKPT_HEAVY", "") not in ("", "0")
ROOT = Path(__file__).resolve().parents[2]

JOB = """
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from syncckpt import CheckpointManager
ck, url, options, step = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(step)
model = torch.nn.Linear(256, 256)
with CheckpointManager(ck, remote=url, storage_options=options, save_every_n_steps=None, handle_sigterm=False) as m:
    m.register(model=model)
    m.resume()
    if not any(c == f"checkpoint-step-{step}" for c in m.status()["local"]):
        m.save(step, epoch=0, batch_idx=step - 1)
    assert m.wait(), m.status()
"""


def session(ck: Path, url: str, options: dict | None, step: int, failpoint: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SYNCCKPT_FAILPOINT"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if failpoint:
        env["SYNCCKPT_FAILPOINT"] = failpoint
    argv = [sys.executable, "-c", JOB, str(ck), url, json.dumps(options or {}), str(step)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize(
    "store",
    [
        "file",
        pytest.param("s3", marks=pytest.mark.skipif(not HEAVY, reason="SYNCCKPT_HEAVY=1: the same on S3 (moto)")),
    ],
    indirect=True,
)
def test_a_crash_after_data_went_early_leaves_the_store_at_the_previous_checkpoint_and_the_next_session_mirrors_it(
    store, tmp_path: Path
):
    kind, url, options = store
    (failpoint,) = EARLY_NAMES
    ck = tmp_path / "ck"
    remote = open_remote(url, options)
    try:
        first = session(ck, url, options, 1)
        assert first.returncode == 0 and "Mirrored checkpoint-step-1" in first.stdout, first.stdout + first.stderr

        crashed = session(ck, url, options, 2, failpoint=f"{failpoint}:1")
        assert crashed.returncode == -9, crashed.stdout + crashed.stderr  # killed itself at the failpoint
        after = audit_remote(remote, tmp_path / "scratch")
        assert not after.problems and not audit_local(ck).problems
        assert sorted(after.valid) == ["checkpoint-step-1"] and after.latest == "checkpoint-step-1"
        leftovers = [
            e
            for e in ("model.safetensors", "rng.safetensors", "state.json")
            if exists(remote, f"checkpoint-step-2/{e}")
        ]
        assert leftovers  # step 2's data went before its commit, and no reader lists it

        last = session(ck, url, options, 2)
        assert last.returncode == 0 and "Mirrored checkpoint-step-2" in last.stdout, last.stdout + last.stderr
        final = audit_remote(remote, tmp_path / "scratch")
        assert not final.problems and final.latest == "checkpoint-step-2" and "checkpoint-step-2" in final.valid
    finally:
        remote.close()


def exists(remote, rel: str) -> bool:
    try:
        remote.stat(rel)
        return True
    except FileNotFoundError:
        return False
