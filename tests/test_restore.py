"""restore.py: what resume tells a person, and the resume hooks any registered object can use."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from syncckpt import CheckpointManager

SESSION = textwrap.dedent(
    """
    import logging, sys, torch
    from syncckpt import CheckpointManager
    if sys.argv[2] == "logging":
        logging.basicConfig(level=logging.INFO, format="LOG %(message)s", stream=sys.stdout)
    with CheckpointManager(sys.argv[1], handle_sigterm=False) as mgr:
        mgr.register(model=torch.nn.Linear(2, 2))
        if mgr.resume() is None:
            mgr.save(3, epoch=0, batch_idx=2)
    """
)


def run_session(directory, mode: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", SESSION, str(directory), mode], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_without_any_logging_set_up_resume_still_says_what_it_did(tmp_path):
    # A notebook cell that never configured logging used to see nothing at all.
    first = run_session(tmp_path, "bare")
    assert first.splitlines() == [f"syncckpt: no checkpoint found in {tmp_path}; starting from scratch"]
    second = run_session(tmp_path, "bare")
    assert second.splitlines() == [
        f"syncckpt: resuming from {tmp_path}/checkpoint-step-3 (global step 3): epoch 1 after 3 batches"
    ]


def test_with_logging_configured_only_the_log_says_it(tmp_path):
    run_session(tmp_path, "bare")
    out = run_session(tmp_path, "logging")
    assert "syncckpt: resuming" not in out and f"LOG Resuming from checkpoint: {tmp_path}/checkpoint-step-3" in out


class Position:
    """Any object can take part in resume through the hooks, as ResumableSampler does."""

    def __init__(self):
        self.saved, self.hooked = None, []

    def state_dict(self):
        return {"kind": "position"}

    def load_state_dict(self, state):
        self.saved = state

    def checkpoint_position(self, epoch, batch_idx):
        return {"at": [epoch, batch_idx]}

    def on_resumed_pass(self, callback):
        self.hooked.append(callback)


def test_resume_hooks_save_the_position_and_run_at_the_resumed_pass(tmp_path):
    torch.manual_seed(0)
    with CheckpointManager(tmp_path, handle_sigterm=False) as mgr:
        mgr.register(model=torch.nn.Linear(2, 2), position=Position())
        mgr.save(5, epoch=2, batch_idx=7)
        expected = torch.rand(3)  # what the global RNG gives right after the save
    pos = Position()
    with CheckpointManager(tmp_path, handle_sigterm=False) as mgr:
        mgr.register(model=torch.nn.Linear(2, 2), position=pos)
        mgr.resume()
    assert pos.saved == {"kind": "position", "at": [2, 7]}
    assert len(pos.hooked) == 1  # the RNG is re-applied when the resumed pass begins
    torch.rand(5)  # e.g. the DataLoader drawing its worker seed
    pos.hooked[0]()
    assert torch.equal(torch.rand(3), expected)


# ---- per-rank state: which copy each rank loads (the rule itself; tests/distributed/test_per_rank_data.py runs it
# under torchrun). A rank and a world size are all the rule reads of the job, so a namespace stands in for Dist.
def _ranks_view(rank: int, world_size: int, saved_by: int, batch_idx: int, states=None):
    import types
    from pathlib import Path

    from syncckpt import ShuffleBuffer
    from syncckpt.manifest import Manifest
    from syncckpt.restore import _this_ranks

    class Stream:  # a ShuffleBuffer needs a source with state
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

        def __iter__(self):
            return iter(())

    objects = {"model": torch.nn.Linear(1, 1), "loader": ShuffleBuffer(Stream(), 2)}
    kind = "step" if batch_idx >= 0 else "epoch"
    manifest = Manifest("checkpoint-step-4", kind, 4, 0, batch_idx, files=[], world_size=saved_by)
    states = states or {"model": {"w": 0}, "loader": {"who": 0}, "loader-rank1": {"who": 1}}
    dist = types.SimpleNamespace(rank=rank, world_size=world_size)
    return _this_ranks(objects, states, manifest, Path("ck"), dist)


def test_each_rank_loads_its_own_copy_of_per_rank_state():
    assert _ranks_view(0, 2, saved_by=2, batch_idx=3)["loader"] == {"who": 0}
    assert _ranks_view(1, 2, saved_by=2, batch_idx=3)["loader"] == {"who": 1}
    assert _ranks_view(1, 2, saved_by=2, batch_idx=3)["model"] == {"w": 0}  # replicated: rank 0's


def test_per_rank_state_mid_epoch_refuses_another_world_size_but_an_epoch_boundary_takes_any():
    import pytest

    from syncckpt.errors import StateMismatch

    with pytest.raises(StateMismatch, match=r"\['loader'\] hold each rank's own data position mid-epoch, saved by 2"):
        _ranks_view(0, 1, saved_by=2, batch_idx=3)
    with pytest.raises(StateMismatch, match=r"saved by 1 rank\(s\); resume with 1 \(now 3\)"):
        _ranks_view(2, 3, saved_by=1, batch_idx=3)
    assert _ranks_view(2, 3, saved_by=2, batch_idx=-1)["loader"] == {"who": 0}  # the next pass starts afresh


def test_a_checkpoint_without_other_ranks_copies_loads_rank_0s_with_a_warning(caplog):
    old = {"model": {"w": 0}, "loader": {"who": 0}}  # saved before syncckpt kept one per rank
    assert _ranks_view(1, 2, saved_by=2, batch_idx=3, states=old)["loader"] == {"who": 0}
    assert "holds no state of 'loader' for rank 1" in caplog.text


def test_a_name_ending_like_another_ranks_copy_cannot_be_registered():
    import pytest

    from syncckpt.snapshot import check_object_name

    with pytest.raises(ValueError, match="not end in -rankN"):
        check_object_name("loader-rank1")
    check_object_name("rank1-loader")
