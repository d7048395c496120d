"""What a person sees while one of syncckpt's own bars is drawn (issue 18): log lines print above the bar, never
into it.

A real terminal (tmux, the pane captured with ``capture-pane``) runs a script that shows two of syncckpt's bars
while another thread logs through ``logging.getLogger("syncckpt")``, as the uploader and the writer do: the
ResumableLoader's count-fallback skip bar (it stays on the screen) and the bar of a pull from a ``file://`` run
(``leave=False``: the screen is captured while it is open). Every log line is handed to the other thread while the
bar is on the screen, and the script waits until it is written (no timing involved). The store's CLI bars
(``store.progress_bar``) come from the same helper (``syncckpt._bars.progress``).
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import uuid

import pytest
from test_screen import BAR, LOG

from syncckpt._bars import progress

pytestmark = pytest.mark.slow

LINES = 8  # log lines per bar

JOB = r"""
import logging, queue, subprocess, sys, threading
from pathlib import Path

import torch

from syncckpt import CheckpointManager
from syncckpt.data import ResumableLoader
from syncckpt.pull import pull
from syncckpt.remote import open_remote

tmux_server, shown, go, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s", force=True)
log = logging.getLogger("syncckpt")
asks, said = queue.Queue(), queue.Queue()


def chatter():  # another thread, logging while a bar is drawn
    while True:
        line = asks.get()
        log.info(line)
        said.put(line)


threading.Thread(target=chatter, daemon=True).start()


def say(line):  # the other thread logs this line now, and this one waits until it is written
    asks.put(line)
    said.get()


class Stream:  # no state: the resumed pass reads the trained batches again, behind the skip bar
    def __iter__(self):
        for i in range(2 * n):
            if i < n:
                say(f"skip line {i}")
            yield i


loader = ResumableLoader(Stream())
loader.load_state_dict({"skip_by_count": True, "position": {"epoch": 0, "batch_idx": n - 1}})
assert list(loader) == list(range(n, 2 * n))

url = (Path.cwd() / "bucket" / "run").as_uri()
with CheckpointManager("ck", save_every_n_steps=None, remote=url, handle_sigterm=False) as mgr:
    mgr.register(model=torch.nn.Linear(64, 64))
    mgr.save(1, batch_idx=0)
    assert mgr.wait(60)
remote = open_remote(url)
download = remote.download_checkpoint


def download_while_logging(name, manifest, dest, progress, **kwargs):
    for i in range(n):
        say(f"pull line {i}")
    # the pull bar is open (it is erased when the pull ends): the test captures the screen now
    subprocess.run(["tmux", "-L", tmux_server, "wait-for", "-S", shown], check=True)
    subprocess.run(["tmux", "-L", tmux_server, "wait-for", go], check=True)
    return download(name, manifest, dest, progress=progress, **kwargs)


remote.download_checkpoint = download_while_logging
pull(remote, "checkpoint-step-1", Path("pulled"))
remote.close()
"""


def capture(tmux: list[str], target: str) -> list[str]:
    # -J joins lines the terminal wrapped; -S - includes the scrollback
    screen = subprocess.run(
        [*tmux, "capture-pane", "-p", "-J", "-S", "-", "-t", target], check=True, capture_output=True, text=True
    ).stdout
    return screen.splitlines()


def assert_shown_apart(lines: list[str], bar: str, logged: str) -> None:
    mixed = [line for line in lines if BAR.search(line) and LOG.search(line)]
    assert not mixed, "log lines printed into a progress bar:\n" + "\n".join(mixed)
    # not vacuous: the bar is on the screen, and so is every line logged while it was drawn, each on its own
    assert any(BAR.search(line) and bar in line for line in lines), "\n".join(lines)
    for i in range(LINES):
        alone = [line for line in lines if LOG.search(line) and line.rstrip().endswith(f"{logged} {i}")]
        assert len(alone) == 1, "\n".join(lines)


def test_log_lines_from_another_thread_print_above_syncckpts_bars_never_into_them(tmp_path):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed to capture the terminal screen")
    (tmp_path / "job.py").write_text(JOB)
    server, tag = f"syncckpt-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    shown, go, done = f"shown-{tag}", f"go-{tag}", f"done-{tag}"
    tmux = ["tmux", "-L", server]  # a server of its own: nothing shared with a user's tmux
    # after the job (also one that failed before the pull), the shell signals both channels, so no wait below
    # hangs; the pane stays open (until kill-server) so that the screen can be captured
    after = (
        f"tmux -L {server} wait-for -S {shown}; tmux -L {server} wait-for -S {done}; tmux -L {server} wait-for {tag}"
    )
    command = f"cd {tmp_path} && {sys.executable} job.py {server} {shown} {go} {LINES}; echo EXIT=$?; {after}"
    subprocess.run([*tmux, "new-session", "-d", "-s", server, "-x", "120", "-y", "40", command], check=True)
    try:
        subprocess.run([*tmux, "wait-for", shown], check=True, timeout=120)
        during_pull = capture(tmux, server)
        subprocess.run([*tmux, "wait-for", "-S", go], check=True, timeout=10)
        subprocess.run([*tmux, "wait-for", done], check=True, timeout=60)
        final = capture(tmux, server)
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    assert "EXIT=0" in final, "\n".join(final)
    assert_shown_apart(final, "syncckpt: skipping trained batches", "skip line")
    assert_shown_apart(during_pull, "pull checkpoint-step-1", "pull line")


def test_overlapping_bars_put_the_console_handlers_back_as_they_were(capsys):
    # two bars open at once (as from two threads), closed first-opened first: the handlers come back unchanged
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("syncckpt")
    log.addHandler(console)
    before = list(log.handlers), list(logging.getLogger().handlers)
    try:
        first = progress(total=1, file=io.StringIO(), disable=False)
        second = progress(total=1, file=io.StringIO(), disable=False)
        first.__enter__()
        second.__enter__()
        log.info("below the handler's level")
        log.warning("above the bars")
        first.__exit__(None, None, None)
        assert console not in log.handlers  # the second bar is still open
        second.__exit__(None, None, None)
        assert (list(log.handlers), list(logging.getLogger().handlers)) == before
    finally:
        log.removeHandler(console)
    assert capsys.readouterr().err == "WARNING above the bars\n"  # same level and formatter while redirected
