"""What a person sees while the demo trains (issue 18): no log line is ever printed into a progress bar.

Two real screens: a terminal (the README's demo command under tmux, the pane captured with ``capture-pane``) and a
notebook (the trainer's ``main()`` in a cell of a real Jupyter kernel through nbclient, its output rendered the way
a notebook front end renders a stream: a carriage return starts the line again). Both assertions are on that
captured screen, not on a log file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_hallucination.py"
DEMO = ["--demo-data", "--data-dir", "data", "--checkpoint-dir", "ck", "--save-every-n-batches", "10", "--epochs", "1"]
BAR = re.compile(r"\d+%\|")  # tqdm's "37%|███▋      |"
LOG = re.compile(r" - (INFO|WARNING|ERROR) - ")  # the trainer's log format


def assert_no_log_inside_a_bar(lines: list[str]) -> None:
    mixed = [line for line in lines if BAR.search(line) and LOG.search(line)]
    assert not mixed, "log lines printed into a progress bar:\n" + "\n".join(mixed)
    # not vacuous: the screen shows the bar and the checkpoint lines that used to land inside it
    assert any(BAR.search(line) and "epoch 1/1" in line for line in lines), "\n".join(lines)
    assert sum("Checkpoint committed: checkpoint-step-" in line for line in lines) >= 5, "\n".join(lines)


def render_stream(text: str) -> list[str]:
    """A stream as a notebook shows it: within a line, a carriage return starts it again."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def test_the_demo_in_a_terminal_never_prints_a_log_line_into_the_progress_bar(tmp_path):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed to capture the terminal screen")
    session, channel = f"syncckpt-{uuid.uuid4().hex[:8]}", f"done-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", session]  # a server of its own: nothing shared with a user's tmux
    # the pane stays open after the demo (until kill-server below), so the screen can be captured
    signal_done = f"tmux -L {session} wait-for -S {channel}; tmux -L {session} wait-for never-{channel}"
    command = f"cd {tmp_path} && {sys.executable} {SCRIPT} {' '.join(DEMO)}; echo EXIT=$?; {signal_done}"
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "120", "-y", "40", command], check=True)
    try:
        subprocess.run([*tmux, "wait-for", channel], check=True, timeout=300)  # the command signals its end
        # -J joins lines the terminal wrapped; -S - includes the scrollback
        screen = subprocess.run(
            [*tmux, "capture-pane", "-p", "-J", "-S", "-", "-t", session], check=True, capture_output=True, text=True
        ).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    lines = screen.splitlines()
    assert "EXIT=0" in lines, screen
    assert_no_log_inside_a_bar(lines)


def test_the_demo_in_a_notebook_cell_never_prints_a_log_line_into_the_progress_bar(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    cell = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('train_hallucination', {str(SCRIPT)!r})\n"
        "trainer = importlib.util.module_from_spec(spec)\n"
        "sys.modules['train_hallucination'] = trainer\n"
        "spec.loader.exec_module(trainer)\n"
        f"print('EXIT', trainer.main({DEMO!r}))\n"
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = nb.cells[0].outputs
    stderr = "".join(o["text"] for o in outputs if o.get("output_type") == "stream" and o["name"] == "stderr")
    stdout = "".join(o["text"] for o in outputs if o.get("output_type") == "stream" and o["name"] == "stdout")
    assert "EXIT 0" in stdout, outputs
    assert_no_log_inside_a_bar(render_stream(stderr) + render_stream(stdout))
