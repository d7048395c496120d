"""SyncCheckpointCallback and resume_checkpoint with a real transformers.Trainer (tiny BERT from a config).

The main test SIGKILLs a Trainer job right after it mirrored checkpoint-4, then resumes in a fresh, empty
output directory from the remote alone.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from hf_trainer_job import StepLog, build_trainer  # noqa: E402
from transformers import TrainerCallback, TrainerState, TrainingArguments  # noqa: E402

from syncckpt import local  # noqa: E402
from syncckpt.integrations.transformers import STAGE_DIR, SyncCheckpointCallback, resume_checkpoint  # noqa: E402
from syncckpt.remote import open_remote  # noqa: E402

JOB = Path(__file__).parent / "e2e" / "hf_trainer_job.py"


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """The in-process runs are tiny: two intra-op threads on two shared cores run them slower than one."""


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONUNBUFFERED"] = "1"
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def _run_until(args: list[str], stop_line: str, timeout: float = 120) -> tuple[list[str], int]:
    """Start the job, read its output line by line and SIGKILL it as soon as it prints ``stop_line``."""
    p = subprocess.Popen(
        [sys.executable, str(JOB), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    lines: list[str] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if lines[-1] == stop_line:
                os.kill(p.pid, signal.SIGKILL)
                break
        lines.extend((p.communicate(timeout=timeout)[0] or "").splitlines())
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return lines, p.returncode


def _remote_checkpoints(url: str, storage_options: dict | None = None) -> list[str]:
    r = open_remote(url, storage_options)
    try:
        return sorted(r.list_checkpoints(), key=lambda n: int(n.rsplit("-", 1)[1]))
    finally:
        r.close()


class _MirroredBeforeNextStep(TrainerCallback):
    def __init__(self, sync: SyncCheckpointCallback) -> None:
        self.sync = sync

    def on_save(self, args, state, control, **kwargs):
        assert self.sync.wait(60), "the checkpoint was not mirrored within 60 s"


def test_sigkill_after_checkpoint_4_then_resume_from_remote_in_empty_dir(tmp_path, caplog):
    remote = (tmp_path / "remote").as_uri()
    lines, rc = _run_until(
        ["--output-dir", str(tmp_path / "session1"), "--remote", remote, "--max-steps", "10", "--hold-at-step", "5"],
        stop_line="HOLD step 5",
    )
    assert rc == -signal.SIGKILL, "\n".join(lines[-30:])
    mirrored = [ln for ln in lines if "Mirrored checkpoint-4" in ln]
    assert mirrored, "\n".join(lines[-30:])
    assert lines.index(mirrored[0]) < lines.index("HOLD step 5")
    assert _remote_checkpoints(remote) == ["checkpoint-2", "checkpoint-4"]

    out = tmp_path / "session2"  # a new machine: nothing local
    caplog.set_level(logging.INFO, logger="syncckpt")
    path = resume_checkpoint(remote, out)
    assert path == str(out / "checkpoint-4")
    assert "pulled from" in caplog.text
    assert local.verify(Path(path))[0].global_step == 4

    # The killed session left its lease behind; its process is gone, so the new session takes the run over.
    # Each save waits until it is mirrored: hashing that falls behind would skip a superseded checkpoint (by design),
    # and the remote's rotation below is checked over every one of them.
    steps, sync = StepLog(), SyncCheckpointCallback(remote)
    trainer = build_trainer(str(out), [sync, steps, _MirroredBeforeNextStep(sync)], max_steps=10)
    trainer.train(resume_from_checkpoint=path)
    assert steps.steps[0] == 5, steps.steps
    assert steps.steps == list(range(5, 11))
    assert trainer.state.global_step == 10
    names = _remote_checkpoints(remote)
    assert len(names) <= 2 and names == ["checkpoint-8", "checkpoint-10"]
    assert open_remote(remote).read_latest().name == "checkpoint-10"
    assert not (tmp_path / "remote" / "LEASE").exists()
    assert not (out / STAGE_DIR).exists()


@pytest.mark.parametrize("store", ["file", "s3"])
def test_remote_mirrors_rotation_and_keeps_best(tmp_path, request, caplog, store):
    if store == "s3":
        pytest.importorskip("s3fs")
        remote, options = request.getfixturevalue("s3_remote_url"), request.getfixturevalue("s3_storage_options")
    else:
        remote, options = (tmp_path / "remote").as_uri(), None
    scores = iter([1.0])

    def compute_metrics(_):  # the first evaluation (step 2) stays the best one
        return {"score": next(scores, 0.0)}

    out = tmp_path / "out"
    trainer = build_trainer(
        str(out),
        [SyncCheckpointCallback(remote, storage_options=options)],
        max_steps=8,
        save_total_limit=2,
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    local_names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert local_names == ["checkpoint-2", "checkpoint-8"]
    assert _remote_checkpoints(remote, options) == ["checkpoint-2", "checkpoint-8"]

    # A local copy at least as new as the remote's is used as it is (after verification)...
    (out / "checkpoint-99").mkdir()  # a folder the Trainer was writing when the session died: no manifest
    (out / "checkpoint-99" / "model.safetensors").write_bytes(b"half")
    caplog.set_level(logging.INFO, logger="syncckpt")
    assert resume_checkpoint(remote, out, options) == str(out / "checkpoint-8")
    assert "(global step 8, local)" in caplog.text

    # ...and a damaged one is replaced by the remote copy.
    weights = out / "checkpoint-8" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    caplog.clear()
    assert resume_checkpoint(remote, out, options) == str(out / "checkpoint-8")
    assert "SHA-256 mismatch" in caplog.text and "pulled from" in caplog.text
    assert weights.read_bytes() == good


def test_callback_does_nothing_on_other_processes(tmp_path):
    out = tmp_path / "out"
    ckpt = out / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    remote_dir = tmp_path / "remote"
    args = TrainingArguments(output_dir=str(out), report_to=[], use_cpu=True, save_total_limit=1)
    state = TrainerState(global_step=2, epoch=0.5, is_world_process_zero=False, is_local_process_zero=True)
    cb = SyncCheckpointCallback(remote_dir.as_uri())
    for event in (cb.on_train_begin, cb.on_step_end, cb.on_save, cb.on_train_end):
        event(args, state, None)
    assert not remote_dir.exists()
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors"]
    assert not (out / STAGE_DIR).exists()
    assert cb.status()["started"] is False


def test_resume_checkpoint_with_empty_remote_returns_none(tmp_path):
    assert resume_checkpoint((tmp_path / "remote").as_uri(), tmp_path / "out") is None
    assert resume_checkpoint("memory://syncckpt-test-empty/run", tmp_path / "out") is None


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="on_upload_error"):
        SyncCheckpointCallback("memory://x/run", on_upload_error="ignore")
    with pytest.raises(ValueError, match="keep_last"):
        SyncCheckpointCallback("memory://x/run", keep_last=0)


def test_o1_skip_refuses_an_epoch_the_accumulation_does_not_divide_before_touching_the_remote(tmp_path):
    remote = tmp_path / "remote"
    sync = SyncCheckpointCallback(remote.as_uri())
    # 64 samples in batches of 8: 8 batches per epoch, not a multiple of 3
    trainer = build_trainer(str(tmp_path / "out"), [sync], sampler_of=sync, gradient_accumulation_steps=3)
    with pytest.raises(ValueError, match=r"batches per epoch \(8\) to be a multiple of gradient_accumulation_steps"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not remote.exists()
