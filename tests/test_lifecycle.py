"""lifecycle.py: Ctrl-C (SIGINT) takes a last checkpoint at the next step, then raises KeyboardInterrupt there;
a second Ctrl-C stops at once. Real signals, sent to this process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from syncckpt import CheckpointManager, local
from syncckpt.format import decode_checkpoint


def train(mgr, model, opt, steps, interrupt_after=None, interrupts=1):
    for step in range(1, steps + 1):
        model(torch.randn(2, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step == interrupt_after:
            for _ in range(interrupts):
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, on this (the main) thread
        mgr.step(step, epoch=0, batch_idx=step - 1)


def objects():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


@pytest.fixture
def default_sigint():
    # conftest gives every test Python's handler, what a notebook kernel and python have
    yield
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # close() put it back


def test_ctrl_c_saves_a_last_checkpoint_at_the_next_step_then_raises(tmp_path, caplog, default_sigint):
    model, opt = objects()
    remote = (tmp_path / "bucket").as_uri()
    with caplog.at_level(logging.WARNING, logger="syncckpt"):
        with CheckpointManager(tmp_path / "ck", save_every_n_steps=1000, remote=remote) as mgr:
            mgr.register(model=model, optimizer=opt)
            with pytest.raises(KeyboardInterrupt):
                train(mgr, model, opt, 20, interrupt_after=7)
            # Ctrl-C came after step 7's optimizer step: step(7) is the next consistent point, saved there
            assert mgr.list_local() == ["checkpoint-step-7"]
            assert "checkpoint-step-7" in mgr.status()["mirrored"]
            manifest, files = local.verify(tmp_path / "ck" / "checkpoint-step-7")
            stored = decode_checkpoint(files, "checkpoint-step-7").states["model"]
            assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
            # The kernel lives on: the same manager trains again and is interrupted again.
            with pytest.raises(KeyboardInterrupt):
                for step in range(8, 12):
                    if step == 10:
                        os.kill(os.getpid(), signal.SIGINT)
                    mgr.step(step, epoch=0, batch_idx=step - 1)
            assert mgr.list_local() == ["checkpoint-step-10"]
    assert "Interrupted: saving a last checkpoint at the next step" in caplog.text
    assert "Interrupted: checkpoint-step-7 saved and mirrored; run again to resume from it" in caplog.text
    model2, opt2 = objects()
    with CheckpointManager(tmp_path / "fresh", remote=remote) as mgr:  # a new session, from the mirror
        mgr.register(model=model2, optimizer=opt2)
        assert mgr.resume().global_step == 10


def test_a_second_ctrl_c_stops_at_once(tmp_path, default_sigint):
    model, opt = objects()
    with CheckpointManager(tmp_path, save_every_n_steps=1000) as mgr:
        mgr.register(model=model, optimizer=opt)
        with pytest.raises(KeyboardInterrupt):
            train(mgr, model, opt, 20, interrupt_after=3, interrupts=2)
        assert mgr.list_local() == []  # stopped inside step 3, before any step boundary


def test_handle_interrupt_off_leaves_ctrl_c_alone(tmp_path, default_sigint):
    model, opt = objects()
    with CheckpointManager(tmp_path, save_every_n_steps=1000, handle_interrupt=False) as mgr:
        mgr.register(model=model, optimizer=opt)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            train(mgr, model, opt, 20, interrupt_after=3)
        assert mgr.list_local() == []


def test_a_manager_built_again_without_closing_the_first_handles_ctrl_c(tmp_path, default_sigint):
    """A notebook cell run twice: the first manager is never closed and its handler still holds SIGINT. The new
    manager must handle Ctrl-C (it was swallowed by the stale one, which never steps), and closing it hands back
    Python's default, not the stale handler."""
    model, opt = objects()
    stale = CheckpointManager(tmp_path / "first", save_every_n_steps=1000, handle_sigterm=False)
    stale.register(model=model, optimizer=opt)
    sigterm_before = signal.getsignal(signal.SIGTERM)
    with CheckpointManager(tmp_path / "second", save_every_n_steps=1000) as mgr:
        mgr.register(model=model, optimizer=opt)
        with pytest.raises(KeyboardInterrupt):
            train(mgr, model, opt, 10, interrupt_after=4)
        assert mgr.list_local() == ["checkpoint-step-4"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == sigterm_before
    stale.close()


AT_EXIT = """
import logging, sys
from syncckpt.errors import SyncCkptError
from syncckpt.lifecycle import Lifecycle
logging.basicConfig(level=logging.INFO)
def flush(timeout):
    print("flush", timeout, flush=True)
    if sys.argv[1] == "fails":
        raise SyncCkptError("upload to s3://b/run failed")
    return sys.argv[1] == "done"
life = Lifecycle(flush=flush, grace_period=7, exit_timeout=3, mirrored=True, handle_sigterm=False,
                 on_exit=lambda: print("closed", flush=True), status=lambda: {"pending": ["checkpoint-step-4"]})
"""


@pytest.mark.parametrize("outcome", ["done", "pending", "fails"])
def test_at_interpreter_exit_the_owner_is_flushed_warned_about_and_closed(outcome):
    """The one at-exit path of the manager, the Trainer callback and the Lightning plugin: flush for
    ``exit_timeout``, a warning naming what is still pending, then the owner's close; a failed mirror is one
    logged line, not an atexit traceback."""
    root = str(Path(__file__).resolve().parents[1])  # this checkout's package, as the jobs of tests/e2e get it
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", AT_EXIT, outcome], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "flush 3" in out.stdout  # exit_timeout, not the grace period
    assert ("closed" in out.stdout) == (outcome != "fails"), out.stdout
    pending = "Exiting with checkpoint work still pending after 3s: {'pending': ['checkpoint-step-4']}"
    assert (pending in out.stderr) == (outcome == "pending"), out.stderr
    if outcome == "fails":
        assert "ERROR:syncckpt:At exit: upload to s3://b/run failed" in out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr


@pytest.mark.parametrize("bad", [-1, 0, float("nan"), float("inf"), "60", True])
def test_a_grace_period_that_is_not_a_positive_number_of_seconds_is_refused_in_one_line(tmp_path, bad) -> None:
    from syncckpt import CheckpointManager
    from syncckpt.errors import ConfigError

    with pytest.raises(ConfigError, match="grace_period must be a positive number of seconds"):
        CheckpointManager(tmp_path, grace_period=bad, handle_sigterm=False)
