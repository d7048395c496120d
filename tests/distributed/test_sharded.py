"""syncckpt.sharded: FSDP2/DTensor state through torch.distributed.checkpoint, pickle-free.

In-process tests cover the format and its checks with plain tensors. The slow tests run ``sharded_job.py`` under
torchrun (gloo, CPU): save from 2 ranks (from a background thread, while training continues), resume in world size
2 and 1 bit for bit with unpickling poisoned, and a rank SIGKILLed mid-save leaving nothing loadable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from syncckpt.errors import CheckpointCorrupt, StateMismatch, StateNotSerializable, UnsafeCheckpoint, UnsupportedFormat
from syncckpt.sharded import (
    ShardedSaveFailed,
    has_dtensors,
    load_shards,
    read_index,
    save_shards,
    snapshot_shards,
)

JOB = Path(__file__).with_name("sharded_job.py")
_spec = importlib.util.spec_from_file_location("sharded_job", JOB)
_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_job)
no_unpickling = _job.no_unpickling


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "model.w": torch.randn(4, 3, generator=g),
        "model.half": torch.randn(5, generator=g).to(torch.bfloat16),
        "optim.step": torch.tensor(7.0),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 2),
    }


def _targets(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def _edit_index(folder: Path, edit) -> None:
    path = folder / "dcp" / "index.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# ------------------------------------------------------------------------------------------------ in-process


def test_roundtrip_plain_tensors_never_unpickles(tmp_path):
    state = _state()
    assert not has_dtensors(state)
    files = save_shards(state, tmp_path)
    assert files == ["dcp/shard-00000-of-00001.safetensors", "dcp/index.json"]
    assert sorted(p.name for p in (tmp_path / "dcp").iterdir()) == ["index.json", "shard-00000-of-00001.safetensors"]
    targets = _targets(state)
    with no_unpickling():
        load_shards(targets, tmp_path)
    for k, v in state.items():
        assert targets[k].dtype == v.dtype and torch.equal(targets[k], v), k
    index = read_index(tmp_path / "dcp")
    assert index["model.w"].size == (4, 3) and index["model.half"].dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # no process group, off the main thread
def test_snapshot_is_isolated_from_later_updates(tmp_path):
    state = _state()
    snap = snapshot_shards(state)
    assert snapshot_shards(snap) is snap
    before = state["model.w"].clone()
    state["model.w"].add_(1.0)  # the training thread moves on
    with ThreadPoolExecutor(max_workers=1) as writer:  # the writer thread's part, as CheckpointManager runs it
        fut = writer.submit(save_shards, snap, tmp_path)
        assert fut.result(timeout=60)[-1] == "dcp/index.json"
    targets = _targets(state)
    load_shards(targets, tmp_path)
    assert torch.equal(targets["model.w"], before)


def test_refuses_non_tensors_and_partial_folders(tmp_path):
    with pytest.raises(StateNotSerializable, match="lr"):
        save_shards({"w": torch.ones(2), "lr": 0.1}, tmp_path)  # type: ignore[dict-item]
    assert not (tmp_path / "dcp" / "index.json").exists()
    save_shards({"w": torch.ones(2)}, tmp_path)
    with pytest.raises(ShardedSaveFailed, match="fresh folder"):
        save_shards({"w": torch.ones(2)}, tmp_path)
    with pytest.raises(CheckpointCorrupt, match="missing"):
        load_shards({"w": torch.ones(2)}, tmp_path / "nowhere")


def test_targets_must_fit(tmp_path):
    state = _state()
    save_shards(state, tmp_path)
    t = _targets(state)
    t["model.w"] = torch.zeros(3, 4)
    with pytest.raises(StateMismatch, match="model.w"):
        load_shards(t, tmp_path)
    t = _targets(state)
    t["model.half"] = torch.zeros(5)  # float32 where bfloat16 was saved: no silent cast
    with pytest.raises(StateMismatch, match="bfloat16"):
        load_shards(t, tmp_path)
    t = _targets(state)
    t["extra"] = torch.zeros(1)
    with pytest.raises(StateMismatch, match="extra: not in the checkpoint"):
        load_shards(t, tmp_path)
    t = _targets(state)
    del t["ids"]
    with pytest.raises(StateMismatch, match="ids: in the checkpoint but not among the targets"):
        load_shards(t, tmp_path)
    load_shards(t, tmp_path, strict=False)
    assert torch.equal(t["model.w"], state["model.w"])


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda d: d.update(version=99), UnsupportedFormat, "version"),
        (lambda d: d["files"][0].update(path="../x.safetensors"), UnsafeCheckpoint, "bad shard file name"),
        (lambda d: d["tensors"]["model.w"]["chunks"][0]["sizes"].__setitem__(0, 3), CheckpointCorrupt, "elements"),
        (lambda d: d["tensors"]["model.w"]["chunks"][0]["sizes"].__setitem__(0, 9), UnsafeCheckpoint, "exceeds"),
        (
            lambda d: (
                d["tensors"]["model.w"]["chunks"].append(d["tensors"]["model.w"]["chunks"][0])
                or d["tensors"]["model.w"].update(size=[8, 3])
            ),
            CheckpointCorrupt,
            "overlap",
        ),
        (lambda d: d["tensors"]["model.w"].update(dtype="object"), CheckpointCorrupt, "dtype"),
        (lambda d: d["tensors"]["model.w"]["size"].__setitem__(0, True), UnsafeCheckpoint, "int"),
    ],
)
def test_index_is_verified(tmp_path, edit, error, match):
    state = _state()
    save_shards(state, tmp_path)
    _edit_index(tmp_path, edit)
    with pytest.raises(error, match=match):
        load_shards(_targets(state), tmp_path)


def test_shards_are_verified_against_the_index(tmp_path):
    state = _state()
    save_shards(state, tmp_path)
    shard = tmp_path / "dcp" / "shard-00000-of-00001.safetensors"
    tensors = load_file(str(shard))
    tensors["model.w"] = torch.zeros(2, 3)  # a shard that disagrees with the index
    save_file(
        tensors,
        str(shard),
        metadata={"DCP_SHARDING_INFO": json.dumps({k: {"saved_offsets": [0] * v.dim()} for k, v in tensors.items()})},
    )
    with pytest.raises(CheckpointCorrupt, match="shape"):
        load_shards(_targets(state), tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointCorrupt, match="missing"):
        load_shards(_targets(state), tmp_path)


def test_hf_storage_reader_can_read_the_shards(tmp_path):
    """Same header convention as torch's HuggingFaceStorageWriter: its reader (no index, globbing) reads our files."""
    import torch.distributed.checkpoint as dcp

    if not hasattr(dcp, "HuggingFaceStorageReader"):
        pytest.skip("torch without HuggingFaceStorageReader")
    state = {k: v for k, v in _state().items() if k != "mask"}  # HF's dtype table has no bool
    save_shards(state, tmp_path)
    targets = _targets(state)
    with pytest.warns(UserWarning):
        dcp.load(targets, storage_reader=dcp.HuggingFaceStorageReader(str(tmp_path / "dcp")), no_dist=True)
    assert all(torch.equal(targets[k], v) for k, v in state.items())


# ------------------------------------------------------------------------------------------------ torchrun

slow = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    e.pop("SYNCCKPT_FAILPOINT", None)
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_job(args: list[str], nproc: int, timeout: float = 120, **env: str) -> tuple[str, int]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--monitor-interval=0.1",
        str(JOB),
        *args,
    ]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(**env), start_new_session=True
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    return out, p.returncode


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    out, rc = run_job(["save", "--folder", str(d / "ck"), "--ref", str(d / "ref.safetensors")], nproc=2)
    assert rc == 0, out[-4000:]
    files = {int(rank): json.loads(listed) for rank, listed in re.findall(r"^SAVE_RETURNED (\d+) (\[.*\])$", out, re.M)}
    assert sorted(files) == [0, 1], out[-4000:]
    return d, files


@slow
def test_two_ranks_write_their_own_shards(saved):
    d, files = saved
    assert files[0] == ["dcp/shard-00000-of-00002.safetensors", "dcp/index.json"]
    assert files[1] == ["dcp/shard-00001-of-00002.safetensors"]
    on_disk = sorted(f"dcp/{p.name}" for p in (d / "ck" / "dcp").iterdir())
    assert on_disk == sorted(files[0] + files[1])
    index = read_index(d / "ck" / "dcp")
    w = index["model.a.weight"]
    assert w.size == (7, 5) and sorted((c.offsets, c.sizes, c.file) for c in w.chunks) == [
        ((0, 0), (4, 5), "shard-00000-of-00002.safetensors"),
        ((4, 0), (3, 5), "shard-00001-of-00002.safetensors"),
    ]
    # a replicated plain tensor is written once
    assert len(index["model.scale"].chunks) == 1


@slow
@pytest.mark.parametrize("world", [2, 1])
def test_resume_bit_identical(saved, world):
    d, _ = saved
    out, rc = run_job(["load", "--folder", str(d / "ck"), "--ref", str(d / "ref.safetensors")], nproc=world)
    assert rc == 0, out[-4000:]
    assert "LOAD_OK 26" in out


@slow
def test_consolidate_into_plain_tensors_without_torch_distributed(saved):
    """The 2-rank FSDP checkpoint loads into ordinary full tensors in a plain process (no process group)."""
    d, _ = saved
    ref = load_file(str(d / "ref.safetensors"))
    index = read_index(d / "ck" / "dcp")
    assert index.keys() == ref.keys()
    targets = {k: torch.full(e.size, 7, dtype=e.dtype) for k, e in index.items()}
    with no_unpickling():
        load_shards(targets, d / "ck")
    bad = [k for k in ref if targets[k].dtype != ref[k].dtype or not torch.equal(targets[k], ref[k])]
    assert not bad


@slow
def test_rank_dying_mid_save_commits_nothing(tmp_path):
    out, rc = run_job(
        ["save", "--folder", str(tmp_path / "ck"), "--ref", str(tmp_path / "ref.safetensors")],
        nproc=2,
        SHARDED_DIE_RANK="1",
    )
    assert rc != 0
    assert "SAVE_RETURNED" not in out, out[-4000:]
    assert "Signal 9 (SIGKILL) received by PID" in out, out[-4000:]  # rank 1 at the failpoint, not a bug
    dcp_dir = tmp_path / "ck" / "dcp"
    assert (dcp_dir / "shard-00001-of-00002.safetensors").exists()  # rank 1 died after writing its shard
    assert not (dcp_dir / "index.json").exists()
    with pytest.raises(CheckpointCorrupt, match="never completed"):
        load_shards({"model.a.weight": torch.zeros(7, 5)}, tmp_path / "ck")
