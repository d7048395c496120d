"""Run training subprocesses and kill them with real signals at moments chosen from their output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import NoReturn

import torch
from safetensors.torch import load_file

TINY = Path(__file__).with_name("tiny_train.py")


def say(line: str) -> None:
    """A job's output line in one write. ``print`` writes the text and the newline separately, so a log record
    from a background thread (the writer's "Checkpoint committed") can land between them and the test never sees
    the line it waits for; several ranks on one pipe interleave the same way."""
    os.write(1, (line + "\n").encode())


def end_job(status: int) -> NoReturn:
    """End a torchrun job's rank once its ``main`` returned: flush, then leave without the interpreter's teardown.

    torch's gloo worker threads outlive ``destroy_process_group`` (a ProcessGroup goes only with its last
    reference, and some stay referenced from torch itself), and one can still be dropping the last collectives'
    tensors while the interpreter finalizes: taking the GIL then ends that thread inside a destructor,
    "terminate called without an active exception" and SIGABRT after all of the job's output (seen twice in
    fsdp_job's rank 1; pytorch PR 179291 describes the same race). The teardown also costs seconds per rank on two
    busy cores. What it would wait for is checked here instead: a non-daemon thread still running is a thread the
    code under test leaked, and fails the job.
    """
    leaked = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if leaked:
        say(f"non-daemon threads still running at exit: {', '.join(leaked)}")
        status = status or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def env(**extra: str) -> dict[str, str]:
    """This process's environment for a job: unbuffered output, this checkout first on PYTHONPATH, ``extra`` set."""
    e = dict(os.environ, **extra)
    e["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parents[2])
    e["PYTHONPATH"] = root + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_until(cmd: list[str], stop_line: str | None = None, timeout: float = 240) -> tuple[list[str], int]:
    """Run ``cmd``; with ``stop_line``, SIGKILL it as soon as it prints that line (it then blocks there). Returns
    its output lines and exit status."""
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=env()
    )
    lines: list[str] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if stop_line is not None and lines[-1] == stop_line:
                os.kill(p.pid, signal.SIGKILL)
                break
        lines.extend((p.communicate(timeout=timeout)[0] or "").splitlines())
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return lines, p.returncode


def run_to_end(args: list[str], timeout: float = 240) -> str:
    """Run the tiny job to completion; return its output (fails the test on a non-zero exit)."""
    p = subprocess.run([sys.executable, str(TINY), *args], capture_output=True, text=True, timeout=timeout, env=env())
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def run_and_kill(args: list[str], kill_when, sig: int = signal.SIGKILL, timeout: float = 240) -> tuple[list[str], int]:
    """Start the job, read its output line by line, send ``sig`` as soon as ``kill_when(lines)`` is true.

    Returns the lines read and the exit status. Synchronises on the process's own output, never on sleeps.
    """
    p = subprocess.Popen(
        [sys.executable, str(TINY), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env()
    )
    lines: list[str] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if kill_when(lines):
                os.kill(p.pid, sig)
                break
        rest = p.communicate(timeout=timeout)[0] or ""
        lines.extend(rest.splitlines())
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return lines, p.returncode


#: the writer's log line for a commit: the checkpoint's name, then its global step
COMMITTED = re.compile(r"Checkpoint committed: (\S+) \(global step (\d+)")


def commits(lines: list[str]) -> list[tuple[str, int]]:
    """(name, global step) of every checkpoint the process logged as committed, in order."""
    return [(m.group(1), int(m.group(2))) for ln in lines if (m := COMMITTED.search(ln))]


def committed(lines: list[str]) -> list[str]:
    """Checkpoint names the process logged as committed, in order."""
    return [name for name, _ in commits(lines)]


def assert_same_tensors(a: str | Path, b: str | Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    diff = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not diff, f"tensors differ from the uninterrupted run: {diff[:10]}"
