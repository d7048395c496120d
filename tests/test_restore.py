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
