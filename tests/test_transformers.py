"""SyncCheckpointCallback and resume_checkpoint with a real transformers.Trainer (tiny BERT from a config).

The README's Trainer cell runs as written in a job that is SIGKILLed once checkpoint-20 is mirrored to S3 (moto);
the same cell then resumes in a fresh, empty output directory from the bucket alone.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from hf_trainer_job import build_trainer  # noqa: E402
from procs import run_until  # noqa: E402
from transformers import TrainerCallback, TrainerState, TrainingArguments  # noqa: E402

from syncckpt.integrations.transformers import STAGE_DIR, SyncCheckpointCallback, resume_checkpoint  # noqa: E402
from syncckpt.lease import LEASE_NAME  # noqa: E402
from syncckpt.remote import open_remote  # noqa: E402

JOB = Path(__file__).parent / "e2e" / "hf_trainer_job.py"
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    """The in-process runs are tiny: two intra-op threads on two shared cores run them slower than one."""


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


def _readme_cell() -> str:
    section = README.read_text().split("\n## transformers Trainer\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)[0]


# Runs the README cell in a job held once checkpoint-20 is mirrored, until the test kills it. The cell's text is
# unchanged: the harness only swaps in a callback subclass that holds, and turns on syncckpt's INFO log lines.
_HELD_CELL = """
import logging, sys, threading
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s", force=True)
import syncckpt.integrations.transformers as integration

class Held(integration.SyncCheckpointCallback):
    def on_save(self, args, state, control, **kwargs):
        result = super().on_save(args, state, control, **kwargs)
        if state.global_step == 20:
            assert self.wait(60), "checkpoint-20 was not mirrored within 60 s"
            print("HOLD", flush=True)
            threading.Event().wait()
        return result

integration.SyncCheckpointCallback = Held
exec(compile(open(sys.argv[1]).read(), "README.md Trainer cell", "exec"), {"__name__": "readme"})
"""


@pytest.mark.slow
def test_readme_trainer_cell_runs_as_written_and_a_new_session_resumes_from_the_bucket(
    tmp_path, monkeypatch, s3_server, s3_remote_url, s3_storage_options, caplog
):
    cell = _readme_cell()
    assert 'REMOTE = "s3://my-bucket/runs/bert-1"' in cell
    cell = cell.replace("s3://my-bucket/runs/bert-1", s3_remote_url)  # the only change: the test bucket
    (tmp_path / "cell.py").write_text(cell)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_storage_options["client_kwargs"]["endpoint_url"])
    monkeypatch.chdir(tmp_path)
    # SIGKILLed once it holds: the session dies with checkpoint-20 in the bucket
    lines, _ = run_until([sys.executable, "-c", _HELD_CELL, str(tmp_path / "cell.py")], stop_line="HOLD")
    assert "HOLD" in lines, "\n".join(lines[-30:])
    shutil.rmtree(tmp_path / "out")  # a new session on an empty disk: the same cell, in this process
    caplog.set_level(logging.INFO, logger="syncckpt")
    session: dict = {"__name__": "readme"}
    exec(compile(cell, "README.md Trainer cell", "exec"), session)
    assert "Pulled checkpoint-20 from " in caplog.text, caplog.text
    assert "Resuming from checkpoint: out/checkpoint-20 (global step 20, pulled from " in caplog.text
    assert "is no longer running" in caplog.text  # the killed session's lease is taken over
    assert session["trainer"].state.global_step == 40
    names = _remote_checkpoints(s3_remote_url, s3_storage_options)
    assert len(names) <= 2 and names[-1] == "checkpoint-40", names  # save_total_limit=2, mirrored remotely
    store = open_remote(s3_remote_url, s3_storage_options)
    try:
        assert store.read_latest().name == "checkpoint-40"
        with pytest.raises(FileNotFoundError):
            store.stat(LEASE_NAME)  # released at the end
    finally:
        store.close()
    assert not (tmp_path / "out" / STAGE_DIR).exists()
    assert not [p.name for p in (tmp_path / "out").rglob("*") if p.suffix in (".pt", ".pth", ".bin")]


def test_a_corrupted_newest_remote_checkpoint_falls_back_to_the_previous_with_a_warning_naming_the_file(
    tmp_path, s3_remote_url, s3_storage_options, caplog
):
    sync = SyncCheckpointCallback(
        s3_remote_url, storage_options=s3_storage_options, handle_sigterm=False, handle_interrupt=False
    )
    out = str(tmp_path / "a")
    trainer = build_trainer(out, [sync], max_steps=4, save_steps=2, save_total_limit=None, picklefree=True)
    trainer.train()
    assert _remote_checkpoints(s3_remote_url, s3_storage_options) == ["checkpoint-2", "checkpoint-4"]
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    target = s3_remote_url.removeprefix("s3://") + "/checkpoint-4/model.safetensors"
    data = bytearray(fs.cat_file(target))
    data[-1] ^= 0xFF  # same size, one flipped bit in the tensor bytes
    fs.pipe_file(target, bytes(data))

    caplog.set_level(logging.WARNING, logger="syncckpt")
    path = resume_checkpoint(s3_remote_url, tmp_path / "fresh", s3_storage_options)
    assert path == str(tmp_path / "fresh" / "checkpoint-2")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-4" in m and "model.safetensors" in m for m in warned), warned


class _StepClock(TrainerCallback):
    """A fake wall clock that reads 100 s per optimizer step (set before SyncCheckpointCallback's on_step_end)."""

    def __init__(self) -> None:
        self.now = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.now = state.global_step * 100.0


def test_the_session_deadline_saves_mirrors_and_stops_the_trainer_before_it(tmp_path, caplog):
    """deadline= on the callback: at 600 s, leaving 300 s for a save that was never timed and no margin, the Trainer
    saves checkpoint-3 at step 3 (its own saves are every 50 steps), it is mirrored, and the run exits 143."""
    from syncckpt.deadline import Deadline

    clock = _StepClock()
    remote = (tmp_path / "remote").as_uri()
    deadline = Deadline(at=600.0, why="a test limit", margin=0.0, clock=lambda: clock.now)
    sync = SyncCheckpointCallback(remote, deadline=deadline, handle_interrupt=False)
    trainer = build_trainer(str(tmp_path / "out"), [clock, sync], max_steps=20, save_steps=50)
    caplog.set_level(logging.INFO, logger="syncckpt")
    with pytest.raises(SystemExit) as ended:
        trainer.train()
    assert ended.value.code == 143
    assert trainer.state.global_step == 3
    assert _remote_checkpoints(remote) == ["checkpoint-3"]
    assert "Session deadline" in caplog.text and "saving checkpoint-step-3 now" in caplog.text
    assert "Session deadline: checkpoint saved and mirrored; exiting" in caplog.text
