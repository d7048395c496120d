"""The transformers Trainer under SIGTERM and Ctrl-C, and its O(1) mid-epoch resume, with the real Trainer.

The main test sends a real SIGTERM to a Trainer job mirrored to S3 (moto) mid-epoch, checks the last checkpoint
reached the bucket and the exit status is 143 within the grace period, wipes the local disk and resumes from the
bucket in-process: model and optimizer end bit-identical to an uninterrupted run (shuffle, dropout,
gradient_accumulation_steps=2, AdamW, warmup + linear decay, bf16 autocast), no skipped sample is read, and no
pickle is opened while syncckpt finds, pulls and verifies the checkpoint. fp16 is not used: transformers 5.24
accepts ``fp16=True`` on CPU, but it creates no GradScaler and trains bit-for-bit as fp32, so it would test
nothing; bf16 autocast does change the numerics on CPU.

Under ``SYNCCKPT_HEAVY=1``: the same with a job-wide SIGTERM and DataLoader workers, two ranks under torchrun,
and the Trainer's own skip counted for comparison.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("s3fs")

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from hf_trainer_job import CountingDataset, build_trainer  # noqa: E402
from procs import env  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from syncckpt.integrations.transformers import SyncCheckpointCallback, resume_checkpoint  # noqa: E402
from syncckpt.lease import LEASE_NAME  # noqa: E402
from syncckpt.remote import open_remote  # noqa: E402

pytestmark = pytest.mark.slow

JOB = Path(__file__).with_name("hf_trainer_job.py")
HEAVY = os.environ.get("SYNCCKPT_HEAVY", "") not in ("", "0")
GRACE_S = 30.0
MAX_STEPS = 24  # 3 epochs of 64 samples in 16 batches of 4, 8 optimizer steps each
BATCH, ACCUM = 4, 2
HOLD_AT = 10  # the job blocks at step 10 until it has seen the SIGTERM: the callback saves at step 11, mid-epoch 1
# The same Trainer in the job and in this process (build_trainer); save_steps=4 so step 11 is the signal's save.
TRAINER = {
    "batch_size": BATCH,
    "gradient_accumulation_steps": ACCUM,
    "warmup_steps": 3,
    "save_steps": 4,
    "bf16": True,
    "picklefree": True,  # PicklefreeTrainer: no file the job writes is a pickle, the resume loads none
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The model is tiny: two intra-op threads on two shared cores run it several times slower than one. The job
    runs with one thread too (a different thread count may sum in another order: not bit-identical)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every bit-identical comparison of this module is made against (trained once, here,
    with one torch thread as the job: another thread count may sum in another order)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(tmp_path_factory.mktemp("trainer-reference") / "out")[0]
    finally:
        torch.set_num_threads(n)


def _train(
    out: Path,
    resume: str | None = None,
    o1: bool = True,
    remote: str | None = None,
    options: dict | None = None,
    extra: dict | None = None,
) -> tuple[object, CountingDataset, float]:
    """One in-process run over a fresh counting dataset: (trainer, dataset, seconds to the first trained batch)."""
    data = CountingDataset(64, seed=1)
    remote = remote or (out.parent / f"{out.name}-mirror").as_uri()
    sync = SyncCheckpointCallback(remote, storage_options=options, handle_sigterm=False, handle_interrupt=False)
    first = _FirstBatch()
    trainer = build_trainer(
        str(out),
        [sync, first],
        max_steps=MAX_STEPS,
        train_dataset=data,
        sampler_of=sync if o1 else None,
        **{**TRAINER, **(extra or {})},
    )
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return trainer, data, first.at - t0


class _FirstBatch(TrainerCallback):
    """When the first micro-batch of this run starts training (the skip, if any, is done by then)."""

    at = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.at = self.at or time.perf_counter()


def _assert_bit_identical(a, b) -> None:
    ma, mb = a.model.state_dict(), b.model.state_dict()
    assert [k for k in ma if not torch.equal(ma[k], mb[k])] == []
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["state"].keys() == ob["state"].keys() and oa["param_groups"] == ob["param_groups"]
    for i, sa in oa["state"].items():
        assert all(torch.equal(sa[k], ob["state"][i][k]) for k in sa), f"optimizer state of parameter {i} differs"
    assert a.lr_scheduler.state_dict() == b.lr_scheduler.state_dict()
    # every step's logged loss, learning rate, grad norm and epoch (the summary's timings and mean differ)
    assert [h for h in a.state.log_history if "loss" in h] == [h for h in b.state.log_history if "loss" in h]


def _refuse(*a, **k):
    raise AssertionError("a pickle was opened while syncckpt found, pulled and verified the checkpoint")


def _run_job_and_sigterm(args: list[str], whole_group: bool) -> tuple[list[str], int, float]:
    """Start the job, SIGTERM it (or, as SLURM and torchrun do, its whole process group) once it holds at
    HOLD_AT, read it to its end: (lines, exit status, seconds from the signal to the exit)."""
    p = subprocess.Popen(
        [sys.executable, str(JOB), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
        start_new_session=True,
    )
    lines: list[str] = []
    sent = None
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if sent is None and lines[-1] == f"HOLD step {HOLD_AT}":
                sent = time.monotonic()
                os.killpg(p.pid, signal.SIGTERM) if whole_group else os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert sent is not None, "\n".join(lines[-30:])
    return lines, p.returncode, time.monotonic() - sent


def _sigterm_then_resume(tmp_path, url, options, monkeypatch, extra: dict, reference, whole_group: bool = False):
    """The job is SIGTERMed mid-epoch: checkpoint-11 mirrored, exit 143 in time; the disk is wiped; the bucket
    resumes bit-identical to the uninterrupted ``reference`` (trained without ``extra``). Returns (resumed trainer,
    its dataset, seconds to exit, seconds to the resumed run's first batch)."""
    session = tmp_path / "session1"
    args = ["--output-dir", str(session), "--remote", url, "--storage-options", json.dumps(options)]
    args += ["--max-steps", str(MAX_STEPS), "--hold-at-step", str(HOLD_AT), "--hold-until-sigterm", "--o1-skip"]
    args += ["--grace-period", str(GRACE_S), "--trainer-args", json.dumps({**TRAINER, **extra})]
    lines, rc, took = _run_job_and_sigterm(args, whole_group)
    text = "\n".join(lines[-40:])
    assert rc == 143, text
    assert took < GRACE_S, text
    assert f"SIGTERM seen at step {HOLD_AT}" in lines
    assert any("Mirrored checkpoint-11 " in ln for ln in lines), text
    assert any("SIGTERM: checkpoint saved and mirrored; exiting" in ln for ln in lines), text
    assert "LOG step 12" not in lines, "the job trained past the step after the signal"
    remote = open_remote(url, options)
    try:
        assert remote.read_latest().name == "checkpoint-11"
        with pytest.raises(FileNotFoundError):
            remote.stat(LEASE_NAME)  # released at the exit: the next session needs no takeover
    finally:
        remote.close()
    shutil.rmtree(session)  # the machine is gone

    out = tmp_path / "session2"
    with monkeypatch.context() as poisoned:  # finding, pulling, verifying and the whole resumed training
        for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
            poisoned.setattr(module, name, _refuse)
        path = resume_checkpoint(url, out, options)
        assert path == str(out / "checkpoint-11")
        pulled = {p.name for p in Path(path).iterdir()}
        assert {"optimizer.safetensors", "scheduler.safetensors", "rng_state.safetensors"} <= pulled, pulled
        resumed, data, first_batch_s = _train(out, resume=path, remote=url, options=options, extra=extra)
    _assert_bit_identical(reference, resumed)
    written = [p for p in out.rglob("*") if p.is_file()]  # what was pulled and what the resumed run wrote
    assert written and [p.name for p in written if not _json_or_safetensors(p)] == []
    return resumed, data, took, first_batch_s


def _json_or_safetensors(path: Path) -> bool:
    """The file parses as JSON or loads as safetensors (which holds no pickle): so it is not a pickle."""
    try:
        json.loads(path.read_bytes())
        return True
    except ValueError:
        pass
    try:
        load_file(str(path))
        return True
    except Exception:
        return False


def test_sigterm_mid_epoch_mirrors_a_last_checkpoint_exits_143_and_the_bucket_resumes_bit_identical(
    tmp_path, s3_remote_url, s3_storage_options, monkeypatch, reference
):
    resumed, data, took, first_batch_s = _sigterm_then_resume(
        tmp_path, s3_remote_url, s3_storage_options, monkeypatch, {}, reference
    )
    # Reads: the rest of epoch 1 in the saved order (no skipped sample), then epoch 2; nothing else.
    trained = (11 - 8) * ACCUM * BATCH
    order = SyncCheckpointCallback("memory://order/run").train_sampler(data, resumed.args)
    order.set_epoch(1)
    assert data.reads[: 64 - trained] == list(order)[trained:]
    assert len(data.reads) == (MAX_STEPS - 11) * ACCUM * BATCH
    print(
        f"\nSIGTERM to exit 143: {took:.2f} s; O(1) resume: {len(data.reads)} samples read, first batch after "
        f"{first_batch_s * 1000:.0f} ms"
    )


@pytest.mark.skipif(not HEAVY, reason="a second job and two more Trainer runs; SYNCCKPT_HEAVY=1 runs it")
def test_a_job_wide_sigterm_with_dataloader_workers_still_saves_mirrors_and_resumes_bit_identical(
    tmp_path, s3_remote_url, s3_storage_options, monkeypatch, reference
):
    # DataLoader workers change nothing the model sees: the run without them is the reference
    workers = {"dataloader_num_workers": 2}
    _sigterm_then_resume(tmp_path, s3_remote_url, s3_storage_options, monkeypatch, workers, reference, whole_group=True)


@pytest.mark.skipif(not HEAVY, reason="two ranks under torchrun; SYNCCKPT_HEAVY=1 runs it")
def test_under_torchrun_every_rank_saves_at_the_same_step_after_sigterm_and_rank_0_mirrors_it(tmp_path):
    remote = (tmp_path / "remote").as_uri()
    args = ["--output-dir", str(tmp_path / "out"), "--remote", remote, "--max-steps", str(MAX_STEPS)]
    args += ["--hold-at-step", "5", "--hold-until-sigterm", "--grace-period", str(GRACE_S)]
    args += ["--trainer-args", json.dumps({"batch_size": BATCH, "save_steps": 4})]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(JOB)]
    p = subprocess.Popen([*launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    lines: list[str] = []
    sent = None
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if sent is None and lines.count("HOLD step 5") == 2:  # both ranks wait at step 5 for the signal
                sent = time.monotonic()
                os.kill(p.pid, signal.SIGTERM)  # torchrun passes it on to every rank, as on a preempted node
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.terminate()  # torchrun stops its ranks
            p.wait(timeout=60)
    took = time.monotonic() - (sent or 0)
    text = "\n".join(lines[-40:])
    assert sent is not None and took < GRACE_S, text
    assert lines.count("SIGTERM seen at step 5") == 2, text
    assert "LOG step 7" not in lines, "a rank trained past the step after the signal"
    assert sum("SIGTERM: checkpoint saved and mirrored; exiting" in ln for ln in lines) == 1, text  # rank 0
    assert sum("SIGTERM: checkpoint saved; exiting" in ln for ln in lines) == 1, text  # rank 1
    store = open_remote(remote)
    assert store.read_latest().name == "checkpoint-6"
    store.close()


def test_ctrl_c_saves_and_mirrors_at_the_next_step_then_the_same_callback_resumes(tmp_path):
    remote = (tmp_path / "remote").as_uri()
    sync = SyncCheckpointCallback(remote, handle_sigterm=False, handle_interrupt=True)

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C (the notebook's stop button sends SIGINT)

    trainer = build_trainer(str(tmp_path / "out"), [CtrlC(), sync], max_steps=10, save_steps=4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    store = open_remote(remote)
    assert store.read_latest().name == "checkpoint-5"  # saved at the step the interrupt arrived in, mirrored
    store.close()
    path = resume_checkpoint(remote, tmp_path / "out")
    assert path == str(tmp_path / "out" / "checkpoint-5")
    trainer.train(resume_from_checkpoint=path)  # same notebook kernel, same callback
    assert trainer.state.global_step == 10
    assert open_remote(remote).read_latest().name == "checkpoint-10"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back at the end


@pytest.mark.skipif(not HEAVY, reason="three more Trainer runs, a comparison only; SYNCCKPT_HEAVY=1 runs it")
def test_native_trainer_skip_reads_no_skipped_sample_either_for_a_map_style_dataset(tmp_path, reference):
    """The comparison the README quotes: accelerate's skip_first_batches (the Trainer's own skip) draws the
    skipped batches' indices without loading them, so a map-style dataset reads the same samples either way.
    Printed for the comparison, not asserted: whether the Trainer's own resume ends bit-identical too."""
    stop = tmp_path / "first"

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 11:
                control.should_save = control.should_training_stop = True

    data = CountingDataset(64, seed=1)
    sync = SyncCheckpointCallback((stop / "mirror").as_uri(), handle_sigterm=False, handle_interrupt=False)
    build_trainer(str(stop), [sync, StopAt()], max_steps=MAX_STEPS, train_dataset=data, **TRAINER).train()
    native, native_data, native_s = _train(tmp_path / "native", resume=str(stop / "checkpoint-11"), o1=False)
    o1, o1_data, o1_s = _train(tmp_path / "o1", resume=str(stop / "checkpoint-11"))
    assert len(native_data.reads) == len(o1_data.reads) == (MAX_STEPS - 11) * ACCUM * BATCH
    _assert_bit_identical(reference, o1)
    try:
        _assert_bit_identical(reference, native)
        native_exact = "bit-identical"
    except AssertionError as e:
        native_exact = f"not bit-identical ({str(e).splitlines()[0]})"
    print(f"\nfirst batch after: native skip {native_s * 1000:.0f} ms, O(1) skip {o1_s * 1000:.0f} ms")
    print(f"the Trainer's own resume: {native_exact}; with the callback's sampler: bit-identical")
