"""An S3 outage during training: the loop keeps its speed (it never waits on the network), uploads fail and are
retried, and once the store is back mirroring resumes by itself; the bucket ends holding the final checkpoint.

The outage is real network behaviour: a proxy between s3fs and the moto server resets every connection."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from syncckpt import CheckpointManager
from syncckpt.remote import open_remote
from syncckpt.remote.retry import RetryPolicy

pytestmark = pytest.mark.slow


def train_steps(mgr, model, opt, steps, start):
    """Time ``steps`` training steps; with ``mgr`` None the same steps without checkpointing (the baseline)."""
    times = []
    for step in range(start, start + steps):
        t0 = time.perf_counter()
        loss = model(torch.randn(64, 256)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mgr is not None:
            mgr.step(step, epoch=0, batch_idx=step - 1)
        times.append(time.perf_counter() - t0)
    return times


def test_outage_keeps_training_speed_and_mirroring_resumes(
    tmp_path, fault_proxy, fault_s3_storage_options, s3_remote_url, s3_storage_options
):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A short retry policy so the uploader gives up on an attempt within a second (the default rides out
    # several minutes of trouble before it reports a failure).
    fast = RetryPolicy(attempts=2, initial_wait=0.05, max_wait=0.1, max_total=2)
    mgr = CheckpointManager(
        tmp_path / "ck",
        save_every_n_steps=10,
        keep_last=2,
        remote=s3_remote_url,
        storage_options=fault_s3_storage_options,
        handle_sigterm=False,
        remote_options={"retry": fast},
    )
    mgr.register(model=model, optimizer=opt)
    before = train_steps(mgr, model, opt, 60, 1)
    assert mgr.wait(timeout=120)
    fault_proxy.down()
    # Train on until the uploader felt the outage, in blocks that alternate with plain steps (no step() call): the
    # baseline of the speed check shares the outage's time and the machine's load (the suite runs on 2 workers;
    # a baseline taken before the outage read a busy neighbour as a slowdown).
    during, plain, step = [], [], 61
    while mgr.status()["upload_failures"] < 2 and step < 5000:
        during += train_steps(mgr, model, opt, 10, step)
        plain += train_steps(None, model, opt, 10, step + 10)
        step += 20
    failures_during = mgr.status()["upload_failures"]
    fault_proxy.up()
    last = step + 59
    after = train_steps(mgr, model, opt, 60, step)
    assert mgr.wait(timeout=180), mgr.status()
    status = mgr.status()
    mgr.close()

    med_before, med_during, med_plain = (statistics.median(t) for t in (before, during, plain))
    print(
        f"\noutage: median step {med_before * 1e3:.2f} ms before, {med_during * 1e3:.2f} ms during the outage "
        f"against {med_plain * 1e3:.2f} ms without step() in the blocks between (x{med_during / med_plain:.2f}), "
        f"{statistics.median(after) * 1e3:.2f} ms after; "
        f"upload failures {status['upload_failures']}, "
        f"connections refused {fault_proxy.counts}; mirrored {status['mirrored']}"
    )
    final = f"checkpoint-step-{last // 10 * 10}"
    assert failures_during >= 2, "the outage was not felt by the uploader"
    assert med_during <= 1.5 * med_plain, "training slowed down during the outage"
    assert status["last_committed"] == final
    assert final in status["mirrored"] and not status["pending"] and status["uploading"] is None
    # every checkpoint committed after the store came back was mirrored or superseded by a newer one
    after_names = {f"checkpoint-step-{s}" for s in range(step // 10 * 10 + 10, last + 1, 10)}
    # (mirrored_history: "mirrored" lists only what retention has not deleted from the remote since)
    assert after_names <= set(status["mirrored_history"]) | set(status["skipped"])
    direct = open_remote(s3_remote_url, s3_storage_options)  # straight to moto, no proxy
    assert direct.read_latest().name == final
    remote_names = direct.list_checkpoints()
    assert final in remote_names and len(remote_names) == 2  # keep_last=2 applied remotely too
    manifest, _ = direct.read_manifest(final)
    direct.download_checkpoint(final, manifest, tmp_path / "verify")  # digests checked
