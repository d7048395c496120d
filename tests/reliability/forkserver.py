"""Start many short training processes cheaply: a server that imported torch once forks one child per trial.

Spawning a fresh interpreter costs 1.5-4 s on a busy 2-core machine (importing torch, s3fs); a crash trial
itself takes well under a second. The server process (``python forkserver.py``) imports the heavy third-party
modules, then for each JSON command on its stdin forks a child that imports ``syncckpt`` and the job *after* the
fork, with the command's environment (so ``SYNCCKPT_FAILPOINT`` is read by the child as in a fresh process), and
runs ``crash_job.main(argv)``. The child's output comes back through the server's stdout, one line at a time,
prefixed with ``| ``; then a JSON line with the child's exit status (``-9`` after a SIGKILL).

The children are real processes: a test kills them by pid with real signals, exactly as it would kill a spawned
interpreter. The server starts no thread before forking (forking a threaded process is unsafe).

The test side is :class:`ForkServer`::

    with ForkServer() as server:
        run = server.run(["--ckpt-dir", d], kill_when=lambda lines: 0.0 if len(lines) > 10 else None)
        assert run.died_by_sigkill
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a job process: unbuffered output, the repository importable, no inherited failpoint."""
    e = dict(os.environ)
    e.pop("SYNCCKPT_FAILPOINT", None)
    e["PYTHONUNBUFFERED"] = "1"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(extra or {})
    return e


@dataclass
class Run:
    """What one child did: its output lines, exit status, and whether the test killed it."""

    lines: list[str] = field(default_factory=list)
    rc: int | None = None
    killed_by_test: bool = False
    pid: int = 0
    seconds: float = 0.0

    @property
    def died_by_sigkill(self) -> bool:
        return self.rc == -signal.SIGKILL

    @property
    def failpoint_fired(self) -> bool:
        """SIGKILLed without the test sending it: the child killed itself at its failpoint."""
        return self.died_by_sigkill and not self.killed_by_test


class ForkServer:
    """Client of the fork server; one child at a time. Use as a context manager."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env or child_env(),
            cwd=str(HERE),
        )
        ready = self._readline()
        if ready.strip() != '{"ready": true}':
            self.close()
            raise RuntimeError(f"fork server did not start: {ready!r}")

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def run(
        self,
        argv: list[str],
        env: dict[str, str | None] | None = None,
        kill_when: Callable[[list[str]], float | None] | None = None,
        timeout: float = 120.0,
    ) -> Run:
        """Fork a child running ``crash_job.main(argv)``; read its lines; SIGKILL it once ``kill_when(lines)``
        returns a number (after that many seconds, to place the kill at a random instant within a phase).

        ``timeout`` is a watchdog only: a child still alive then is killed and the test fails on ``rc``.
        """
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env or {}}) + "\n")
        self.proc.stdin.flush()
        head = json.loads(self._readline())
        run = Run(pid=head["pid"])
        t0 = time.monotonic()
        watchdog = threading.Timer(timeout, self._kill_quietly, args=(run.pid,))
        watchdog.daemon = True
        watchdog.start()
        try:
            while True:
                line = self._readline()
                if not line:
                    raise RuntimeError(f"fork server died; child output: {run.lines[-20:]}")
                if line.startswith("| "):
                    run.lines.append(line[2:].rstrip("\n"))
                    if kill_when is not None and not run.killed_by_test:
                        delay = kill_when(run.lines)
                        if delay is not None:
                            if delay > 0:
                                time.sleep(delay)  # places the kill at a random instant; not a synchronisation
                            run.killed_by_test = True
                            self._kill_quietly(run.pid)
                    continue
                run.rc = json.loads(line)["exit"]
                break
        finally:
            watchdog.cancel()
        run.seconds = time.monotonic() - t0
        return run

    @staticmethod
    def _kill_quietly(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone; the server has not reaped it yet only while it still relays output

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the server side ---------------------------------------------------------------------------------------------
def _serve() -> None:
    # Heavy third-party imports happen once, here; syncckpt and the job are imported by each child after fork.
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch
    import torch.utils.data  # noqa: F401
    import tqdm.auto  # noqa: F401

    try:
        import fsspec  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        pass
    torch.set_num_threads(1)  # the children share 2 cores with the test process and moto
    _warm_up(torch)
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        r, w = os.pipe()
        out.flush()
        pid = os.fork()
        if pid == 0:
            _child(r, w, cmd)  # never returns
        os.close(w)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        with os.fdopen(r, "rb") as f:
            for data in f:
                out.write("| " + data.decode("utf-8", "replace").rstrip("\n") + "\n")
                out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()


def _warm_up(torch) -> None:  # noqa: ANN001
    """One optimizer step of each kind the job uses: the first AdamW imports torch._dynamo (1-3 s)."""
    from torch.utils.data import DataLoader, TensorDataset

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu")
    for (xb,) in DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2):
        scaler.scale(model(xb).sum()).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()


def _child(r: int, w: int, cmd: dict) -> None:
    rc = 1
    try:
        os.close(r)
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(w)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        for k, v in cmd["env"].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        import crash_job

        rc = crash_job.main(cmd["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        sys.path.insert(0, str(HERE))
        _serve()
    else:
        sys.exit("usage: forkserver.py --serve")
