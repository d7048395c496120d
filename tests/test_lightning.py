"""The Lightning integration (SyncCkptIO + its callback) with the real lightning package, tiny models, CPU.

The main test SIGKILLs a Lightning job mid-epoch after a checkpoint reached moto S3, deletes its folder, and resumes
in a new session (the test's own process, the job's same fit) with ``trainer.fit(ckpt_path="last")`` under poisoned
pickle/torch.load: bit-identical to an uninterrupted run, no skipped sample loaded, no file written is a pickle.
Nothing is mocked.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from syncckpt import ResumableSampler  # noqa: E402
from syncckpt.errors import StateNotSerializable, UnsafeCheckpoint  # noqa: E402
from syncckpt.integrations.lightning import SyncCkptIO  # noqa: E402

JOB = Path(__file__).parent / "e2e" / "lightning_job.py"
README = Path(__file__).resolve().parents[1] / "README.md"
HEAVY = os.environ.get("SYNCCKPT_HEAVY", "") not in ("", "0")
sys.path.insert(0, str(JOB.parent))
import lightning_job  # noqa: E402
from lightning_job import ACCUM, BATCH, EPOCHS, SAMPLES  # noqa: E402
from procs import run_until  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """The in-process runs are tiny: two intra-op threads on two shared cores run them slower than one."""


def _job(args: list[str], stop_line: str | None = None, timeout: float = 240) -> tuple[list[str], int]:
    """Run the job; with ``stop_line``, SIGKILL it as soon as it prints that line (it then blocks there)."""
    return run_until([sys.executable, str(JOB), *args], stop_line, timeout)


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], int]:
    """The uninterrupted run (tensors, ``__getitem__`` calls) the exact-resume tests compare with, trained once in
    this process with one torch thread, as the job's (another thread count may sum in another order)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return lightning_job.reference()
    finally:
        torch.set_num_threads(n)


def _is_pickle_or_torch_zip(data: bytes) -> bool:
    pickled = len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5 and data.rstrip().endswith(b".")
    return pickled or data.startswith(b"PK\x03\x04")


def _assert_json_or_safetensors(name: str, data: bytes) -> None:
    assert not _is_pickle_or_torch_zip(data), f"{name} is a pickle"
    try:
        json.loads(data)
        return
    except ValueError:
        pass
    from safetensors.torch import load

    load(data)  # raises unless it is a safetensors file


def _first_step(lines: list[str]) -> re.Match[str]:
    m = next((re.match(r"step (\d+) epoch (\d+) batch (\d+)", ln) for ln in lines if ln.startswith("step ")), None)
    assert m is not None, "\n".join(lines[-30:])
    return m


@pytest.mark.slow
def test_sigkill_mid_epoch_then_fresh_session_resumes_from_s3_bit_identical_without_pickle(
    tmp_path, s3_remote_url, s3_storage_options, reference, caplog
):
    import fsspec

    ck = tmp_path / "ck"
    common = ["--dir", str(ck), "--remote", s3_remote_url, "--storage-options", json.dumps(s3_storage_options)]
    # Checkpoints every 2 optimizer steps; the job holds at step 5 (mid-epoch 0) once step 4's checkpoint is mirrored.
    lines, rc = _job([*common, "--out", str(tmp_path / "x.safetensors"), "--hold-at-step", "5"], "HOLD step 5")
    assert rc == -signal.SIGKILL, "\n".join(lines[-30:])
    assert any("Mirrored checkpoint-step-4 " in ln for ln in lines), "\n".join(lines[-30:])
    shutil.rmtree(ck)  # the session's disk is gone

    # The new session (this process: the job's fit, with pickle and torch.load poisoned throughout).
    caplog.set_level(logging.INFO, logger="syncckpt")
    steps: list[str] = []
    sync = SyncCkptIO(remote=s3_remote_url, storage_options=s3_storage_options, handle_sigterm=False)
    progress = lightning_job.Progress(sync, say=steps.append)
    a, getitem = lightning_job.fit(str(ck), sync, ckpt_path="last", poison=True, progress=progress)
    assert any(r.getMessage().startswith("Pulled checkpoint-step-4 from") for r in caplog.records)
    # It continues at the saved batch: the first step it trains is step 5, ending at micro-batch 9 of epoch 0.
    first = _first_step(steps)
    assert (int(first[1]), int(first[2]), int(first[3])) == (5, 0, 4 * ACCUM + 1)
    b, reference_getitem = reference
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], "model/optimizer differ from the uninterrupted run"
    # No skipped sample was loaded: the 4 * ACCUM batches before the checkpoint are not read again.
    assert getitem == EPOCHS * SAMPLES - 4 * ACCUM * BATCH
    assert reference_getitem == EPOCHS * SAMPLES

    # save_top_k=1 rotation, mirrored: the bucket keeps exactly the one checkpoint the folder keeps, the last step.
    fs = fsspec.filesystem("s3", **s3_storage_options)
    last = f"checkpoint-step-{EPOCHS * SAMPLES // BATCH // ACCUM}"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("checkpoint-")) == [last]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(s3_remote_url) if "/checkpoint-" in p) == [last]

    written = {p: p.read_bytes() for p in ck.rglob("*") if p.is_file()}
    written.update({k: fs.cat_file(k) for k in fs.find(s3_remote_url)})
    assert any(str(k).endswith("model.safetensors") for k in written)
    for name, data in written.items():
        _assert_json_or_safetensors(str(name), data)


class _MirroredBeforeNextStep(L.Callback):
    """Each optimizer step starts once every checkpoint so far is mirrored: the uploader skips a step checkpoint
    a newer one supersedes before its upload began (by design), and a test listing the remote wants them all.
    (Lightning runs ModelCheckpoint after the other callbacks: this waits for the saves of the steps before.)"""

    def __init__(self, sync: SyncCkptIO) -> None:
        self.sync = sync

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert self.sync.wait(60), "checkpoints were not mirrored within 60 s"


def _tiny_fit(
    directory: Path, sync: SyncCkptIO, max_steps: int, ckpt_path: str | None = None, callbacks=(), **mc
) -> L.Trainer:
    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g))
    loader = DataLoader(ds, batch_size=4, sampler=ResumableSampler(ds, batch_size=4, seed=1))
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=directory,
        plugins=[sync],
        callbacks=[ModelCheckpoint(dirpath=directory, every_n_train_steps=2, **mc), sync.callback, *callbacks],
    )
    trainer.fit(Tiny(), loader, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow
def test_corrupted_newest_remote_checkpoint_falls_back_to_previous_with_warning_naming_the_file(
    tmp_path, s3_remote_url, s3_storage_options, caplog
):
    import fsspec

    sync = SyncCkptIO(remote=s3_remote_url, storage_options=s3_storage_options, handle_sigterm=False)
    _tiny_fit(tmp_path / "a", sync, max_steps=4, callbacks=[_MirroredBeforeNextStep(sync)], save_top_k=-1)
    fs = fsspec.filesystem("s3", **s3_storage_options)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(s3_remote_url) if "checkpoint-step-" in p)
    assert names == ["checkpoint-step-2", "checkpoint-step-4"]
    bad = f"{s3_remote_url}/checkpoint-step-4/model.safetensors"
    data = bytearray(fs.cat_file(bad))
    data[-1] ^= 0xFF  # same size, one flipped byte
    fs.pipe_file(bad, bytes(data))

    caplog.set_level(logging.INFO, logger="syncckpt")
    sync = SyncCkptIO(remote=s3_remote_url, storage_options=s3_storage_options, handle_sigterm=False, takeover=True)
    trainer = _tiny_fit(tmp_path / "b", sync, max_steps=6, ckpt_path=s3_remote_url, save_top_k=-1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-step-4" in w and "model.safetensors" in w for w in warnings), warnings
    assert any(
        "Resuming from checkpoint: " in r.getMessage() and "checkpoint-step-2" in r.getMessage() for r in caplog.records
    )
    assert trainer.global_step == 6


@pytest.mark.slow
def test_last_without_a_remote_resumes_locally_and_rotation_keeps_what_save_top_k_keeps(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="syncckpt")
    top2 = dict(save_top_k=2, monitor="step", mode="max")
    _tiny_fit(tmp_path, SyncCkptIO(handle_sigterm=False), max_steps=5, **top2)

    def folders() -> list[str]:
        return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))

    assert folders() == ["checkpoint-step-2", "checkpoint-step-4"]
    trainer = _tiny_fit(tmp_path, SyncCkptIO(handle_sigterm=False), max_steps=8, ckpt_path="last", **top2)
    assert any(f"Resuming from checkpoint: {tmp_path / 'checkpoint-step-4'}" in r.getMessage() for r in caplog.records)
    assert trainer.global_step == 8
    # the old session's pointers came back with the checkpoint, so its checkpoints rotate out as Lightning says
    assert folders() == ["checkpoint-step-6", "checkpoint-step-8"]
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == [
        "epoch=0-step=6.ckpt",
        "epoch=0-step=8.ckpt",
        "last.syncckpt.ckpt",
    ]


def test_value_neither_tensor_nor_json_raises_naming_its_key_path(tmp_path):
    sync = SyncCkptIO(handle_sigterm=False)
    checkpoint = {
        "global_step": 1,
        "epoch": 0,
        "state_dict": {"w": torch.ones(2)},
        "hyper_parameters": {"act": object()},
    }
    with pytest.raises(StateNotSerializable, match=r"lightning\.hyper_parameters\.act"):
        sync.save_checkpoint(checkpoint, tmp_path / "epoch=0-step=1.ckpt")
    assert not (tmp_path / "epoch=0-step=1.ckpt").exists()
    sync.teardown()


def test_a_torch_pickle_ckpt_is_refused_without_being_unpickled(tmp_path, monkeypatch):
    ckpt = tmp_path / "epoch=0-step=1.ckpt"
    torch.save({"state_dict": {}}, ckpt)

    def refuse(*a, **k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(UnsafeCheckpoint, match="not a syncckpt pointer"):
        SyncCkptIO(handle_sigterm=False).load_checkpoint(ckpt)


def _readme_cell() -> str:
    section = README.read_text().split("\n## Lightning\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)[0]


@pytest.mark.slow
def test_readme_lightning_cell_runs_as_written_and_resumes_from_the_bucket(
    tmp_path, monkeypatch, s3_server, s3_remote_url, s3_storage_options, caplog
):
    cell = _readme_cell()
    assert 'remote="s3://my-bucket/runs/lit-1"' in cell
    cell = cell.replace("s3://my-bucket/runs/lit-1", s3_remote_url)  # the only change: the test bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_storage_options["client_kwargs"]["endpoint_url"])
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="syncckpt")
    exec(compile(cell, "README.md Lightning cell", "exec"), {"__name__": "readme"})
    assert any(r.getMessage().startswith("Mirrored checkpoint-step-") for r in caplog.records)
    shutil.rmtree(tmp_path / "checkpoints")  # a new session: the same cell again
    caplog.clear()
    exec(compile(cell, "README.md Lightning cell", "exec"), {"__name__": "readme"})
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Pulled checkpoint-step-") for m in messages), messages
    assert any(m.startswith("Resuming from checkpoint: ") for m in messages), messages


@pytest.mark.slow
@pytest.mark.skipif(not HEAVY, reason="two more Lightning processes; SYNCCKPT_HEAVY=1 runs it")
def test_sigterm_mid_accumulation_saves_and_mirrors_at_the_next_step_then_resumes_bit_identical(tmp_path, reference):
    remote = (tmp_path / "bucket" / "run").as_uri()
    ck = tmp_path / "ck"
    # SIGTERM as step 7's accumulation window starts (step 6 is a ModelCheckpoint save; 7 is not).
    lines, rc = _job(["--dir", str(ck), "--remote", remote, "--out", str(tmp_path / "x"), "--sigterm-at-step", "6"])
    text = "\n".join(lines)
    assert rc == 143, text[-3000:]
    assert "Mirrored checkpoint-step-7 " in text and "SIGTERM: checkpoint saved and mirrored; exiting" in text
    shutil.rmtree(ck)
    out = tmp_path / "resumed.safetensors"
    lines, rc = _job(["--dir", str(ck), "--remote", remote, "--out", str(out), "--ckpt-path", remote])
    assert rc == 0, "\n".join(lines[-30:])
    assert _first_step(lines)[1] == "8"
    a, b = load_file(str(out)), reference[0]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


class _StepClock(L.Callback):
    """A fake wall clock reading 100 s per optimizer step, advanced before the plugin's step-boundary check."""

    def __init__(self) -> None:
        self.now = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.now = trainer.global_step * 100.0


def test_the_session_deadline_saves_mirrors_and_stops_the_run_before_it(tmp_path, caplog):
    """deadline= on SyncCkptIO: at 600 s, leaving 300 s for a save never timed and no margin, a last checkpoint is
    taken at step 3 (ModelCheckpoint saves every 2), mirrored, and the run exits 143."""
    from syncckpt.deadline import Deadline

    clock = _StepClock()
    remote = (tmp_path / "remote").as_uri()
    deadline = Deadline(at=600.0, why="a test limit", margin=0.0, clock=lambda: clock.now)
    sync = SyncCkptIO(remote=remote, handle_sigterm=False, deadline=deadline)
    caplog.set_level(logging.INFO, logger="syncckpt")
    with pytest.raises(SystemExit) as ended:
        _tiny_fit(tmp_path / "a", sync, max_steps=20, callbacks=[clock], save_top_k=-1)
    assert ended.value.code == 143
    mirrored = sorted(p.name for p in (tmp_path / "remote").iterdir() if p.name.startswith("checkpoint-step-"))
    assert mirrored[-1] == "checkpoint-step-3", mirrored
    assert "saving checkpoint-step-3 now" in caplog.text
    assert "Session deadline: checkpoint saved and mirrored; exiting" in caplog.text


def test_ddp_spawn_gets_the_one_process_refusal_not_a_pickling_error(tmp_path):
    """ddp_spawn pickles the Trainer to start its processes; that used to end in "TypeError: cannot pickle
    '_thread.lock' object" from multiprocessing, where strategy="ddp" gets a clear refusal at setup."""
    out = subprocess.run(
        [sys.executable, str(JOB), "--dir", str(tmp_path / "ck"), "--out", str(tmp_path / "out"), "--spawn"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("syncckpt.errors.ConfigError: SyncCkptIO runs in one process for now"), out.stderr
    assert "cannot pickle" not in out.stderr, out.stderr
