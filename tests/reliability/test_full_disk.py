"""A full disk during a local save (ENOSPC): the previous checkpoint stays intact, training continues, a warning
says checkpoints are not being saved, and saving resumes by itself once space returns.

The checkpoint folder lives on a real 2 MB tmpfs (``mount -t tmpfs``) filled up with a filler file, so the
failure is the kernel's own ENOSPC, wherever in the save it strikes. Where mounting is not permitted (an
unprivileged CI runner) the test falls back to a simulated full disk: ``syncckpt.local.write_file`` is
monkeypatched to raise ``OSError(ENOSPC)`` while the "disk" is full; the printed figures say which one ran.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from syncckpt import CheckpointManager, local


class _Tmpfs:
    """A real small file system; ``fill()`` writes a filler file until the kernel says ENOSPC."""

    kind = "real tmpfs (2 MB, kernel ENOSPC)"

    def __init__(self, mountpoint: Path) -> None:
        self.root = mountpoint
        self.filler = mountpoint / "filler.bin"

    @classmethod
    def mount(cls, mountpoint: Path) -> _Tmpfs | None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        try:
            p = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return cls(mountpoint) if p.returncode == 0 else None

    def fill(self) -> int:
        written = 0
        with open(self.filler, "wb", buffering=0) as f:  # unbuffered: close() has nothing left to flush
            chunk = b"\0" * 4096
            try:
                while True:
                    written += f.write(chunk) or 0
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        return written

    def free(self) -> None:
        self.filler.unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], capture_output=True, timeout=30)


class _Simulated:
    """No mount permission: the write path raises ENOSPC while ``full``."""

    kind = "simulated (mount not permitted: syncckpt.local.write_file raises ENOSPC)"

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.full = False
        real = local.write_file

        def write_file(folder, rel, chunks):
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / rel))
            return real(folder, rel, chunks)

        monkeypatch.setattr(local, "write_file", write_file)

    def fill(self) -> int:
        self.full = True
        return 0

    def free(self) -> None:
        self.full = False

    def unmount(self) -> None:
        pass


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = _Tmpfs.mount(tmp_path / "small-disk") or _Simulated(tmp_path / "small-disk", monkeypatch)
    d.root.mkdir(parents=True, exist_ok=True)
    yield d
    d.unmount()


def test_enospc_keeps_the_previous_checkpoint_and_saving_resumes(disk, caplog):
    ck = disk.root / "ck"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))  # ~100 KB a save
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(ck, save_every_n_steps=2, keep_last=1, handle_sigterm=False)
    mgr.register(model=model, optimizer=opt)
    steps_done = 0
    saves: dict[int, bool] = {}

    def train(upto: int) -> None:
        nonlocal steps_done
        while steps_done < upto:
            model(torch.randn(16, 64)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            steps_done += 1
            if mgr.step(steps_done):
                assert mgr.wait(60)  # the writer finished (committed or gave up) before we look
                saves[steps_done] = f"checkpoint-step-{steps_done}" in mgr.list_local()

    try:
        with caplog.at_level(logging.INFO, logger="syncckpt"):
            train(2)
            assert mgr.list_local() == ["checkpoint-step-2"]
            kept = (ck / "checkpoint-step-2" / "model.safetensors").read_bytes()

            filled = disk.fill()
            train(8)  # saves at 4, 6, 8 hit the full disk; training goes on
            full_warnings = [r.getMessage() for r in caplog.records if "not being saved" in r.getMessage()]
            assert mgr.list_local() == ["checkpoint-step-2"], mgr.list_local()
            manifest, files = local.verify(ck / "checkpoint-step-2")  # intact, byte for byte
            assert files["model.safetensors"] == kept and manifest.global_step == 2
            leftovers = [p.name for p in ck.iterdir() if p.name.startswith(".")]
            status = mgr.status()

            disk.free()
            train(12)
            again = [r.getMessage() for r in caplog.records if "saved again" in r.getMessage()]
        newest = sorted(mgr.list_local(), key=lambda n: int(n.rsplit("-", 1)[1]))[-1]
        local.verify(ck / newest)
    finally:
        mgr.close()
        shutil.rmtree(ck, ignore_errors=True)

    print(f"\n[full-disk] disk: {disk.kind}; filler {filled} bytes")
    print(f"[full-disk] saves (step -> committed): {saves}; training steps run: {steps_done}")
    print(f"[full-disk] warning while full: {full_warnings[:1]}")
    print(f"[full-disk] status while full: save_error={status['save_error']!r}; leftovers in the folder: {leftovers}")
    print(f"[full-disk] after space returned: {again[:1]}; newest checkpoint {newest} verifies")
    assert steps_done == 12
    assert [s for s, ok in saves.items() if not ok] == [4, 6, 8]
    assert saves[10] and saves[12]
    assert full_warnings and "checkpoint-step-4" in full_warnings[0]
    assert status["save_error"] and "No space left" in status["save_error"]
    assert again, "no log line says that checkpoints are being saved again"
    assert newest == "checkpoint-step-12"
