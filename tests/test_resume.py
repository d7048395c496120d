"""A damaged checkpoint never wins: after a fallback, retention, ``resume(path)`` and a fresh start are not steered
by a checkpoint that failed verification (issue "A damaged checkpoint never wins").

Each walkthrough is the one a user hit on main: a run saves, one byte of its newest checkpoint flips, and the
following sessions must keep their new checkpoints and resume from the newest valid one. Stores: a local folder
alone, and mirrored to file://, moto S3 (through s3fs) and the Hub test server (huggingface_hub's real client).
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch
from hub_server import USER

from syncckpt import CheckpointManager, NoValidCheckpoint, local, quarantine, resume
from syncckpt.errors import SyncCkptError
from syncckpt.manifest import LATEST_NAME, Latest
from syncckpt.remote import open_remote

STORES = ["file", "s3", "hub"]

# huggingface_hub's own LFS upload passes a file object as `data=`, which httpx2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def store(request, tmp_path):
    """(remote URL, storage_options, remote_options) for the parametrized store."""
    kind = request.param
    if kind == "file":
        return (tmp_path / "bucket" / "run").as_uri(), None, None
    if kind == "s3":
        request.getfixturevalue("s3_storage_options")
        return request.getfixturevalue("s3_remote_url"), request.getfixturevalue("s3_storage_options"), None
    hub = request.getfixturevalue("hub")
    return f"hf://{USER}/run-{uuid.uuid4().hex[:10]}", {"endpoint": hub.url}, {"min_commit_interval": 0}


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _manager(directory: Path, store=None, keep_last: int = 1, every: int = 1) -> CheckpointManager:
    url, options, remote_options = store or (None, None, None)
    return CheckpointManager(
        directory,
        save_every_n_steps=every,
        keep_last=keep_last,
        remote=url,
        storage_options=options,
        remote_options=remote_options,
        handle_sigterm=False,
    )


def session(directory: Path, steps: int, store=None, keep_last: int = 1, every: int = 1, **resume_kw):
    """One training session: resume, train ``steps`` more optimizer steps, each save committed (and mirrored)
    before the next step; returns
    (ResumeInfo or None, final global step, the weights at that step)."""
    model, opt = _model()
    with _manager(directory, store, keep_last, every) as mgr:
        mgr.register(model=model, optimizer=opt)
        info = mgr.resume(**resume_kw)
        start = info.global_step if info else 0
        for step in range(start + 1, start + steps + 1):
            model(torch.randn(2, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if mgr.step(step, epoch=0, batch_idx=step - 1):
                assert mgr.wait(timeout=120)  # each save mirrored before the next: none is coalesced away
    return info, start + steps, {k: v.clone() for k, v in model.state_dict().items()}


def resumed_weights(directory: Path, store=None) -> tuple[int, dict[str, torch.Tensor]]:
    model, opt = _model()
    with _manager(directory, store) as mgr:
        mgr.register(model=model, optimizer=opt)
        info = mgr.resume()
    assert info is not None
    return info.global_step, model.state_dict()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # tensor data, past the safetensors header
    path.write_bytes(bytes(data))


def flip_remote(store, name: str) -> None:
    remote = open_remote(store[0], store[1], **(store[2] or {}))
    rel = f"{name}/model.safetensors"
    data = bytearray(remote.read_bytes(rel, max_size=1 << 30))
    data[-3] ^= 0x01
    remote.write_bytes(rel, bytes(data))
    remote.close()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def remote_names(store) -> tuple[list[str], list[str], Latest | None]:
    """(checkpoints the store holds, the quarantined ones among them, LATEST)."""
    remote = open_remote(store[0], store[1], **(store[2] or {}))
    try:
        names = sorted(remote.list_checkpoints())
        return names, sorted(quarantine.read_index(remote)), remote.read_latest()
    finally:
        remote.close()


# ---- local --------------------------------------------------------------------------------------------------------
def test_keep_last_1_damaged_newest_local_checkpoint_new_checkpoints_survive(tmp_path, caplog):
    ck = tmp_path / "ck"
    session(ck, 15, every=5)  # saves 5, 10, 15; keeps 15
    assert [c.name for c in local.list_checkpoints(ck)] == ["checkpoint-step-15"]
    flip_a_byte(ck / "checkpoint-step-15" / "model.safetensors")

    with caplog.at_level(logging.WARNING, logger="syncckpt"), pytest.raises(NoValidCheckpoint) as err:
        session(ck, 1)
    assert "checkpoint-step-15" in str(err.value) and "SHA-256 mismatch" in str(err.value)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("No valid checkpoint in")]
    assert len(summary) == 1 and "checkpoint-step-15 (local)" in summary[0] and "SHA-256 mismatch" in summary[0]
    assert [q.name for q in quarantine.list_local(ck)] == ["checkpoint-step-15"]  # kept aside, not deleted
    # The same command again still refuses: quarantined checkpoints count until the user decides.
    with pytest.raises(NoValidCheckpoint, match="quarantined earlier"):
        session(ck, 1)

    info, _, at_8 = session(ck, 8, start_fresh_if_damaged=True)
    assert info is None
    assert [c.name for c in local.list_checkpoints(ck)] == ["checkpoint-step-8"]  # not deleted as it landed
    assert resumed_weights(ck)[0] == 8 and same(resumed_weights(ck)[1], at_8)
    assert [q.name for q in quarantine.list_local(ck)] == ["checkpoint-step-15"]


def test_keep_last_2_falls_back_and_the_damaged_checkpoint_takes_no_slot(tmp_path):
    ck = tmp_path / "ck"
    _, _, _ = session(ck, 15, keep_last=2, every=5)  # keeps 10 and 15
    flip_a_byte(ck / "checkpoint-step-15" / "model.safetensors")
    info, end, weights = session(ck, 3, keep_last=2)
    assert info.global_step == 10 and end == 13
    assert [c.name for c in local.list_checkpoints(ck)] == ["checkpoint-step-12", "checkpoint-step-13"]
    assert resumed_weights(ck)[0] == 13 and same(resumed_weights(ck)[1], weights)


def test_resume_from_an_older_valid_checkpoint_is_not_refused_because_of_a_damaged_newer_one(tmp_path):
    ck = tmp_path / "ck"
    session(ck, 15, keep_last=3, every=5)
    shutil.copytree(ck, tmp_path / "copy")
    flip_a_byte(ck / "checkpoint-step-15" / "model.safetensors")
    info, _, _ = session(ck, 2, keep_last=3, path=ck / "checkpoint-step-10")
    assert info.global_step == 10
    assert [q.name for q in quarantine.list_local(ck)] == ["checkpoint-step-15"]
    # A valid newer checkpoint still blocks it, as before.
    with pytest.raises(Exception, match="newer checkpoints of an earlier run.*checkpoint-step-15"):
        session(tmp_path / "copy", 1, keep_last=3, path=tmp_path / "copy" / "checkpoint-step-10")


def test_the_refusal_to_go_back_names_every_newer_checkpoint_at_once(tmp_path):
    """Not only the newest valid one: the user moving that aside should not be refused again for the next."""
    ck = tmp_path / "ck"
    session(ck, 15, keep_last=3, every=5)  # keeps 5, 10 and 15
    with pytest.raises(SyncCkptError) as refused:
        session(ck, 1, keep_last=3, path=ck / "checkpoint-step-5")
    assert f"{ck}: checkpoint-step-15 (newer there too: checkpoint-step-10)" in str(refused.value)


def test_a_checkpoint_that_is_not_ours_is_never_quarantined(tmp_path):
    # resume(path) of another folder (a read-only input, someone's run) verifies but never moves anything there.
    other = tmp_path / "input"
    session(other, 10, keep_last=2, every=5)
    flip_a_byte(other / "checkpoint-step-10" / "model.safetensors")
    before = sorted(p.name for p in other.iterdir())
    info, _, _ = session(tmp_path / "ck", 1, path=other)
    assert info.global_step == 5
    assert sorted(p.name for p in other.iterdir()) == before


def test_verification_is_not_repeated_at_every_step(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    session(ck, 10, keep_last=2, every=5)
    flip_a_byte(ck / "checkpoint-step-10" / "model.safetensors")
    reads: list[str] = []
    real = local.read_verified
    monkeypatch.setattr(local, "read_verified", lambda path, m: reads.append(Path(path).name) or real(path, m))
    session(ck, 20, keep_last=2)  # resume, then 20 steps with a save at each
    assert reads == ["checkpoint-step-10", "checkpoint-step-5"]  # resume only: the damaged one, then the winner
    reads.clear()
    session(ck, 1, keep_last=2)
    assert reads == ["checkpoint-step-25"]  # the quarantined checkpoint is never hashed again


# ---- remote -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("store", STORES, indirect=True)
def test_damaged_newest_remote_checkpoint_with_an_empty_local_dir(store, tmp_path, caplog):
    session(tmp_path / "writer", 15, store, keep_last=2, every=5)  # the remote keeps 10 and 15
    flip_remote(store, "checkpoint-step-15")

    with caplog.at_level(logging.WARNING, logger="syncckpt"):
        info, end, weights = session(tmp_path / "fresh1", 3, store, keep_last=2)  # a new machine
    assert info.global_step == 10 and info.source != "local" and end == 13
    assert any("Quarantined" in r.getMessage() and "checkpoint-step-15" in r.getMessage() for r in caplog.records)
    names, held, latest = remote_names(store)
    assert held == ["checkpoint-step-15"]
    assert names == ["checkpoint-step-12", "checkpoint-step-13", "checkpoint-step-15"]  # kept aside, no slot taken
    assert latest is not None and latest.name == "checkpoint-step-13"

    step, restored = resumed_weights(tmp_path / "fresh2", store)  # another new machine
    assert step == 13 and same(restored, weights)


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_every_remote_checkpoint_damaged_needs_an_explicit_fresh_start(store, tmp_path):
    session(tmp_path / "writer", 10, store, every=5)  # the remote keeps only 10
    flip_remote(store, "checkpoint-step-10")
    with pytest.raises(NoValidCheckpoint, match=r"checkpoint-step-10 \(remote\)"):
        session(tmp_path / "fresh1", 1, store)
    _, held, latest = remote_names(store)
    assert held == ["checkpoint-step-10"] and latest is None  # LATEST named it: gone, nothing valid to name

    info, _, weights = session(tmp_path / "fresh2", 3, store, start_fresh_if_damaged=True)
    assert info is None
    names, _, latest = remote_names(store)
    assert names == ["checkpoint-step-10", "checkpoint-step-3"] and latest.name == "checkpoint-step-3"
    step, restored = resumed_weights(tmp_path / "fresh3", store)
    assert step == 3 and same(restored, weights)


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
def test_a_damaged_local_checkpoint_resumes_from_the_remotes_valid_copy(store, tmp_path):
    ck = tmp_path / "ck"
    _, _, at_10 = session(ck, 10, store, every=5)
    flip_a_byte(ck / "checkpoint-step-10" / "model.safetensors")
    damaged = (ck / "checkpoint-step-10" / "model.safetensors").read_bytes()
    step, restored = resumed_weights(ck, store)
    assert step == 10 and same(restored, at_10)
    [q] = quarantine.list_local(ck)  # the damaged local copy is kept aside untouched, not repaired in place
    assert (Path(q.where) / "model.safetensors").read_bytes() == damaged
    assert local.verify(ck / "checkpoint-step-10")  # the verified remote copy was pulled beside it
    assert remote_names(store)[1] == []  # the remote copy is fine: nothing quarantined there


@pytest.mark.parametrize("store", ["file"], indirect=True)
def test_a_quarantined_remote_copy_is_replaced_when_a_valid_local_copy_is_mirrored(store, tmp_path):
    ck = tmp_path / "ck"
    session(ck, 10, store, keep_last=2, every=5)
    shutil.copytree(ck, tmp_path / "backup")
    flip_remote(store, "checkpoint-step-10")
    session(tmp_path / "fresh", 0, store, keep_last=2)  # resumes 5 from the remote, quarantines its 10
    assert remote_names(store)[1] == ["checkpoint-step-10"]
    shutil.rmtree(ck)
    shutil.copytree(tmp_path / "backup", ck)
    step, _ = resumed_weights(ck, store)  # the local 10 is valid: resumed, and mirrored over the damaged copy
    assert step == 10
    names, held, latest = remote_names(store)
    assert held == [] and "checkpoint-step-10" in names and latest.name == "checkpoint-step-10"
    remote = open_remote(store[0], store[1])
    search = resume.find_resumable(tmp_path / "verify", remote, quarantine_damaged=False)
    remote.close()
    assert search.found.candidate.name == "checkpoint-step-10" and not search.damaged


def test_find_resumable_reports_each_damaged_checkpoint_once(tmp_path):
    ck = tmp_path / "ck"
    session(ck, 10, keep_last=2, every=5)
    for name in ("checkpoint-step-5", "checkpoint-step-10"):
        flip_a_byte(ck / name / "model.safetensors")
    search = resume.find_resumable(ck)
    assert search.found is None and search.nothing_valid
    assert [d.name for d in search.damaged] == ["checkpoint-step-10", "checkpoint-step-5"]
    assert all(d.quarantined for d in search.damaged)
    again = resume.find_resumable(ck)
    assert again.damaged == [] and [q.name for q in again.quarantined] == ["checkpoint-step-10", "checkpoint-step-5"]
    assert again.damage_report().count("quarantined earlier") == 2


def test_latest_is_repointed_only_when_it_names_the_removed_checkpoint(tmp_path):
    remote = open_remote((tmp_path / "run").as_uri())
    remote.write_bytes(LATEST_NAME, Latest("checkpoint-step-9", 9, "0" * 64).to_bytes())
    resume.repoint_latest(remote, "checkpoint-step-3", [])
    assert remote.read_latest().name == "checkpoint-step-9"
    resume.repoint_latest(remote, "checkpoint-step-9", [])
    assert remote.read_latest() is None


# ---- a read-only input: a Kaggle Dataset made from a previous session's checkpoints ---------------------------
def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under ``root`` with its size, mtime and bytes: what 'writes nothing there' compares."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("damaged_newest", [False, True])
def test_resume_from_a_read_only_copy_under_kaggle_input_writes_nothing_there(
    tmp_path, monkeypatch, caplog, damaged_newest
):
    # session 1 trained and saved steps 3 and 6; its checkpoints became a Dataset version, attached read-only
    model, opt = _model()
    with _manager(tmp_path / "session1", keep_last=2, every=3) as mgr:
        mgr.register(model=model, optimizer=opt)
        weights = {}
        for step in range(1, 7):
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            mgr.step(step, batch_idx=step - 1)
            weights[step] = model.weight.detach().clone()
        mgr.wait()
    kaggle_input = tmp_path / "kaggle" / "input"
    dataset = kaggle_input / "my-run-checkpoints"
    shutil.copytree(tmp_path / "session1", dataset)
    if damaged_newest:
        target = dataset / "checkpoint-step-6" / "model.safetensors"
        data = bytearray(target.read_bytes())
        data[-3] ^= 1
        target.write_bytes(bytes(data))
    before = _tree(kaggle_input)
    for p in dataset.rglob("*"):  # read-only as Kaggle mounts it (root ignores the bits: the tree check decides)
        p.chmod(0o555 if p.is_dir() else 0o444)

    # session 2 on Kaggle: an empty /kaggle/working, the Dataset under (a fake) /kaggle/input
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("SYNCCKPT_SESSION_START", str(time.time()))  # a fresh session: its deadline is 12 h away
    monkeypatch.setattr("syncckpt.env.KAGGLE_INPUT", kaggle_input)
    caplog.set_level(logging.WARNING, logger="syncckpt")
    model2, opt2 = _model()
    with _manager(tmp_path / "working", keep_last=2, every=1) as mgr:
        mgr.register(model=model2, optimizer=opt2)
        info = mgr.resume()
        expected = 3 if damaged_newest else 6
        assert info is not None and info.global_step == expected and info.source == "input"
        assert info.path == str(dataset / f"checkpoint-step-{expected}")  # loaded in place: no copy, no download
        assert torch.equal(model2.weight, weights[expected])
        mgr.step(expected + 1, batch_idx=expected)
        mgr.wait()
        assert mgr.list_local() == [f"checkpoint-step-{expected + 1}"]  # new checkpoints go to the working dir
    if damaged_newest:
        assert any("checkpoint-step-6" in r.getMessage() and "SHA-256" in r.getMessage() for r in caplog.records)
    for p in dataset.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    assert _tree(kaggle_input) == before  # nothing written, renamed, quarantined or cleaned up there
