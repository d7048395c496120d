"""syncckpt.integrations.accelerate with the real accelerate package: a killed ``Accelerator`` job resumes from the
bucket bit-identical without unpickling, a damaged newest checkpoint falls back, the resumed pass reads no skipped
sample (for every loader ``prepare`` makes), Accelerate's own ``save_state`` folders are mirrored and pulled as
written, and the README's Accelerate cell runs as written.

The 2-process kill/resume (``accelerate launch --multi_gpu --num_processes 2``: on a CPU, that is the launch path
that starts two gloo processes; ``--cpu`` alone starts one) takes ~50 s and runs under SYNCCKPT_HEAVY=1.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import DataLoaderDispatcher, prepare_data_loader
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent / "e2e"))
from procs import assert_same_tensors, env  # noqa: E402
from servers import rendezvous_port  # noqa: E402

from syncckpt import ResumableSampler  # noqa: E402
from syncckpt.cli import main as cli_main  # noqa: E402
from syncckpt.integrations.accelerate import SyncCheckpointer, adopt_save_state  # noqa: E402
from syncckpt.remote import open_remote  # noqa: E402
from syncckpt.watch import watch  # noqa: E402

JOB = Path(__file__).parent / "e2e" / "accelerate_job.py"
README = Path(__file__).resolve().parents[1] / "README.md"
HEAVY = os.environ.get("SYNCCKPT_HEAVY", "") not in ("", "0")
SAMPLES, BATCH, ACCUM = 96, 4, 2  # accelerate_job.py's data


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each test (and the suite's other Accelerate users) starts clean."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class Indexed(Dataset):
    """Yields each sample's own index; counts the reads."""

    def __init__(self, n: int = 40) -> None:
        self.n, self.reads = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads.append(i)
        return torch.tensor([float(i)])


# ---- the job under a kill ---------------------------------------------------------------------------------------
def _command(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(JOB)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc)]
    launch += ["--main_process_port", str(rendezvous_port())]  # two jobs may run side by side
    return [*launch, "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", str(JOB)]


def _start(cmd: list[str], log: Path | None = None) -> subprocess.Popen:
    """Start the job; its output is piped, or written to ``log`` (a job nobody reads while it runs)."""
    out = subprocess.PIPE if log is None else log.open("w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env())


def _finish(p: subprocess.Popen, log: Path | None = None, timeout: float = 240) -> str:
    out = p.communicate(timeout=timeout)[0] if log is None else (p.wait(timeout), log.read_text())[1]
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-6000:]}"
    return out


def _sigkill_tree(pid: int) -> list[psutil.Process]:
    """SIGKILL ``pid`` and every process below it (torchrun starts the ranks in their own sessions, so a process
    group kill would miss them): the VM is gone, launcher and ranks alike."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return procs


def _run_until_paused_then_sigkill(cmd: list[str], nproc: int, timeout: float = 240) -> list[str]:
    """Start the job; once every rank printed PAUSED, SIGKILL it with all its processes."""
    p = _start(cmd)
    lines: list[str] = []
    killed: list[psutil.Process] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if sum("PAUSED" in ln for ln in lines) == nproc:
                killed = _sigkill_tree(p.pid)
                break
        p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            killed = _sigkill_tree(p.pid)
            p.wait()
        psutil.wait_procs(killed, timeout=30)  # every rank is gone before the next session starts
    assert p.returncode == -signal.SIGKILL, lines[-20:]
    return lines


def _no_pickles(folder: Path) -> list[str]:
    """Files under ``folder`` that are not JSON or safetensors, or that start like a pickle or a torch.save zip."""
    bad = []
    for f in folder.rglob("*"):
        if f.is_file():
            head = f.read_bytes()[:2]
            if f.suffix not in (".json", ".safetensors") or head[:1] == b"\x80" or head == b"PK":
                bad.append(str(f.relative_to(folder)))
    return bad


HEAVY_ONLY = pytest.mark.skipif(not HEAVY, reason="~50 s; SYNCCKPT_HEAVY=1 runs it")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "loader"),
    [(1, "shard"), pytest.param(2, "shard", marks=HEAVY_ONLY), pytest.param(2, "dispatcher", marks=HEAVY_ONLY)],
)
def test_sigkilled_job_resumes_from_the_bucket_at_the_saved_batch_bit_identical_without_pickle(
    nproc, loader, tmp_path, s3_remote_url, s3_storage_options
):
    def job(*args: str) -> list[str]:
        return [*_command(nproc), *(["--dispatch"] if loader == "dispatcher" else []), *args]

    ref = ["--ckpt-dir", str(tmp_path / "ref-ck"), "--out", str(tmp_path / "ref.st"), "--reads", str(tmp_path / "ref")]
    ref_log = tmp_path / "uninterrupted.log"
    uninterrupted = _start(job(*ref), ref_log)  # side by side with the run that is killed
    try:
        ck = tmp_path / "ck"
        args = ["--ckpt-dir", str(ck), "--out", str(tmp_path / "out.st"), "--reads", str(tmp_path / "res")]
        args += ["--remote", s3_remote_url, "--storage-options", json.dumps(s3_storage_options)]
        # every 5 steps, paused (and killed) at step 6: the newest mirrored checkpoint is step 5, mid-epoch 0
        lines = _run_until_paused_then_sigkill(job(*args, "--pause-at", "6"), nproc)
        assert any("Mirrored checkpoint-step-5" in ln for ln in lines), lines[-20:]
        shutil.rmtree(ck)  # the session's disk is gone
        out = _finish(
            _start(job(*args, "--poison-pickle"))
        )  # pickle.load/loads/Unpickler, torch.load raise in resume()
        _finish(uninterrupted, ref_log)
    finally:
        if uninterrupted.poll() is None:
            _sigkill_tree(uninterrupted.pid)
            uninterrupted.wait()
    assert "Pulled checkpoint-step-5" in out, out[-3000:]
    assert_same_tensors(tmp_path / "ref.st", tmp_path / "out.st")  # model and AdamW tensors, bit for bit

    for rank in range(nproc):
        ref = json.loads((tmp_path / f"ref-rank{rank}.json").read_text())
        res = json.loads((tmp_path / f"res-rank{rank}.json").read_text())
        assert res["num_processes"] == nproc
        # 5 optimizer steps of 2 batches: the resumed pass starts after the 10th batch of epoch 0
        assert res["resumed"] == {"epoch": 0, "batch_idx": 9, "step": 5}
        if loader == "dispatcher":  # the main process reads every rank's batches, the others none
            share, skipped = (2 * SAMPLES, 10 * BATCH * nproc) if rank == 0 else (0, 0)
        else:
            share, skipped = 2 * SAMPLES // nproc, 10 * BATCH
        assert ref["reads"] == share
        assert res["reads"] == share - skipped  # no skipped sample was read
    assert _no_pickles(ck) == []
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    remote_files = fs.find(s3_remote_url.removeprefix("s3://"))
    assert any(f.endswith("/model.safetensors") for f in remote_files)
    for f in remote_files:  # the bucket too: JSON, safetensors, and the JSON LATEST/LEASE markers
        head = fs.cat_file(f, start=0, end=2)
        assert f.endswith((".json", ".safetensors", "/LATEST", "/LEASE")) and head[:1] != b"\x80" and head != b"PK", f


# ---- in-process ---------------------------------------------------------------------------------------------------
def _tiny_run(accelerator: Accelerator, directory: Path, remote: str, options: dict, steps: int) -> SyncCheckpointer:
    torch.manual_seed(0)
    ds = Indexed(32)
    loader = DataLoader(ds, batch_size=4, sampler=ResumableSampler(ds, batch_size=4, seed=1, num_replicas=1, rank=0))
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    kw = {"every_n_steps": 2, "keep_last": 2, "handle_sigterm": False}
    ckpt = SyncCheckpointer(accelerator, directory, remote=remote, storage_options=options, **kw)
    ckpt.register(model=model, optimizer=opt, dataloader=loader)
    ckpt.resume()
    for i, x in enumerate(loader):
        if i == steps:
            break
        accelerator.backward(model(x).pow(2).mean())
        opt.step()
        opt.zero_grad()
        ckpt.step(epoch=0, batch_idx=i)
    return ckpt


@pytest.mark.slow
def test_corrupted_newest_remote_checkpoint_falls_back_to_the_previous_with_a_warning_naming_the_file(
    tmp_path, s3_remote_url, s3_storage_options, caplog
):
    accelerator = Accelerator(cpu=True)
    _tiny_run(accelerator, tmp_path / "a", s3_remote_url, s3_storage_options, steps=4).close()
    remote = open_remote(s3_remote_url, s3_storage_options)
    assert sorted(remote.list_checkpoints()) == ["checkpoint-step-2", "checkpoint-step-4"]
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    target = s3_remote_url.removeprefix("s3://") + "/checkpoint-step-4/model.safetensors"
    data = bytearray(fs.cat_file(target))
    data[-1] ^= 0xFF  # same size, one flipped bit in the tensor bytes
    fs.pipe_file(target, bytes(data))

    caplog.set_level(logging.WARNING, logger="syncckpt")
    ckpt = _tiny_run(accelerator, tmp_path / "b", s3_remote_url, s3_storage_options, steps=0)
    assert ckpt.global_step == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-step-4" in m and "model.safetensors" in m for m in warned), warned
    ckpt.close()


def _loader(kind: str, rank: int, ds: Indexed) -> DataLoader:
    sampler = ResumableSampler(ds, batch_size=2, shuffle=True, seed=3, num_replicas=1, rank=0)
    plain = DataLoader(ds, batch_size=2, sampler=sampler)
    if kind == "two-process shard":  # what prepare() gives rank `rank` of 2: a BatchSamplerShard
        return prepare_data_loader(plain, num_processes=2, process_index=rank)
    dispatch = kind == "dispatcher"
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=dispatch))
    loader = accelerator.prepare(plain)
    assert isinstance(loader, DataLoaderDispatcher) == dispatch
    return loader


@pytest.mark.parametrize("kind", ["shard", "dispatcher", "two-process shard"])
def test_resumed_pass_starts_at_the_saved_batch_and_reads_no_skipped_sample(kind, tmp_path):
    """Three sessions over one epoch of 20 batches: saved after batch 2, resumed and saved again after batch 6
    (a checkpoint taken on a resumed pass), resumed again: each pass yields the uninterrupted run's batches from
    there and reads only those samples."""
    for rank in range(2 if kind == "two-process shard" else 1):
        full = [b.flatten().tolist() for b in _loader(kind, rank, Indexed())]
        start = 0
        for stop in (2, 6, None):
            ds = Indexed()
            loader = _loader(kind, rank, ds)
            ckpt = SyncCheckpointer(
                Accelerator(cpu=True), tmp_path / f"r{rank}", every_n_steps=None, handle_sigterm=False
            )
            ckpt.register(dataloader=loader)
            info = ckpt.resume()
            assert (info.epoch, info.batch_idx + 1) == (0, start) if start else info is None
            seen = []
            for i, batch in enumerate(loader, start=start):
                seen.append(batch.flatten().tolist())
                ckpt.step(epoch=0, batch_idx=i)
                if i == stop:
                    ckpt.manager.save(ckpt.global_step, epoch=0, batch_idx=i)
                    break
            assert seen == full[start : None if stop is None else stop + 1]
            # what was read is the rest of the epoch's order from the resumed batch on: the batches trained here,
            # then at most the two a loader reads ahead; nothing of the skipped batches
            rest = [int(x) for b in full[start:] for x in b]
            assert ds.reads == rest[: len(ds.reads)]
            assert len(seen) * 2 <= len(ds.reads) <= (len(seen) + 2) * 2
            ckpt.close()
            start = None if stop is None else stop + 1


def test_register_refuses_a_loader_resume_could_not_skip_exactly(tmp_path):
    ckpt = SyncCheckpointer(Accelerator(cpu=True), tmp_path, handle_sigterm=False)
    ds = Indexed()
    with pytest.raises(TypeError, match="its sampler is RandomSampler"):
        ckpt.register(dataloader=DataLoader(ds, batch_size=2, shuffle=True))
    twice = DataLoader(ds, batch_size=2, sampler=ResumableSampler(ds, batch_size=2, num_replicas=2, rank=0))
    with pytest.raises(ValueError, match="num_replicas=1"):
        ckpt.register(dataloader=prepare_data_loader(twice, num_processes=2, process_index=0))
    other = DataLoader(ds, batch_size=4, sampler=ResumableSampler(ds, batch_size=2))
    with pytest.raises(ValueError, match="batch_size=2"):
        ckpt.register(dataloader=other)
    ckpt.close()


def test_save_state_folders_are_mirrored_and_pulled_byte_for_byte(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = accelerator.prepare(model, opt)
    out = tmp_path / "out"
    accelerator.save_state(str(out / "checkpoint-7"))  # Accelerate's own format (its optimizer and RNG are pickles)
    manifest = adopt_save_state(out / "checkpoint-7")
    assert manifest.global_step == 7 and manifest.extra["source"] == "accelerate.save_state"

    url = (tmp_path / "bucket" / "run").as_uri()
    assert watch(out, url, once=True, settle=0).mirrored == ["checkpoint-7"]  # what `syncckpt watch out URL` does
    assert cli_main(["pull", url, str(tmp_path / "back")]) == 0
    back = tmp_path / "back" / "checkpoint-7"
    original = sorted(p.relative_to(out / "checkpoint-7") for p in (out / "checkpoint-7").rglob("*") if p.is_file())
    assert sorted(p.relative_to(back) for p in back.rglob("*") if p.is_file()) == original
    for rel in original:
        assert (back / rel).read_bytes() == (out / "checkpoint-7" / rel).read_bytes()
    accelerator.load_state(str(back))  # loading stays Accelerate's business


def _readme_cell() -> str:
    text = README.read_text()
    section = text.split("\n## Accelerate\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"^```python\n(.*?)^```", section, re.S | re.M).group(1)


@pytest.mark.slow
def test_readme_accelerate_cell_runs_as_written(
    tmp_path, monkeypatch, s3_server, s3_storage_options, s3_remote_url, caplog
):
    cell = _readme_cell()
    assert "s3://my-bucket/runs/accel-1" in cell
    cell = cell.replace("s3://my-bucket/runs/accel-1", s3_remote_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)  # the cell uses the default credential chain
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="syncckpt")
    exec(compile(cell, "README.md ## Accelerate", "exec"), {"__name__": "readme"})
    assert open_remote(s3_remote_url, s3_storage_options).list_checkpoints()
    shutil.rmtree(tmp_path / "checkpoints")  # a new session: the cell again resumes from the bucket
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    exec(compile(cell, "README.md ## Accelerate", "exec"), {"__name__": "readme"})
    assert any("Pulled checkpoint-" in r.getMessage() for r in caplog.records)
